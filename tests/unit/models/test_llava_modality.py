"""``megatron_dpsl.models.llava_modality``: the layout arithmetic and the row → group mapping (no
Megatron).

The layout's agreement with ``LLaVAModel``'s own splice is tested on a real model with marker
embeddings (tests/unit/models/test_vlm.py); these tests pin the parts the model does not reach:
0.19's shard padding, pipeline padding, and the group mapping's rules.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dpsl.models.llava_modality import ModalityGroups, llava_token_layout

IMG = -200


def _layout(**kw):
    input_ids = torch.tensor([[1, IMG, 2], [3, 4, 5]])
    args = dict(img_seq_len=3, image_token_index=IMG, max_sequence_length=16)
    args.update(kw)
    return llava_token_layout(input_ids, torch.tensor([2]), **args)


def test_layout_by_hand():
    # row 0: text, 2 tiles x 3 rows, text = 8 rows; row 1: 3 text rows, then 5 padding rows
    layout = _layout()
    assert layout.is_image.int().tolist() == [[0, 1, 1, 1, 1, 1, 1, 0], [0] * 8]
    assert layout.is_pad.int().tolist() == [[0] * 8, [0, 0, 0, 1, 1, 1, 1, 1]]


def test_shard_padding_pipeline_padding_and_truncation():
    padded = _layout(shard_factor=6)  # 0.19 pads 8 rows to 12 (zeros, label -100)
    assert (
        padded.is_pad.shape == (2, 12)
        and padded.is_pad[:, 8:].all()
        and not padded.is_image[:, 8:].any()
    )
    assert _layout(pad_to_max_length=True).is_pad.shape == (2, 16)
    cut = _layout(max_sequence_length=4)
    assert cut.is_image.int().tolist() == [[0, 1, 1, 1], [0] * 4]


def test_group_ids_modality_task_and_task_only():
    layout = _layout()
    img, pad = layout.is_image, layout.is_pad
    ids = ModalityGroups().group_ids(layout)
    assert torch.equal(ids, torch.where(img, 0, 1))
    ids = ModalityGroups(vision=0, text=1, num_tasks=3).group_ids(layout, torch.tensor([2, 0]))
    assert ids[0].tolist() == [3, 0, 0, 0, 0, 0, 0, 3] and ids[1][~pad[1]].tolist() == [1, 1, 1]
    ids = ModalityGroups(vision=None, text=0, num_tasks=2).group_ids(layout, torch.tensor([1, 0]))
    assert ids[0].tolist() == [1] * 8  # image rows take their sample's task group
    assert ModalityGroups(vision=2, text=0, num_tasks=2).num_groups == 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(vision=1, text=1), "vision group 1 is also a text group"),
        (dict(vision=2, text=1, num_tasks=2), "vision group 2 is also a text group"),
        (dict(text=-1), r"ModalityGroups.text: must be an int >= 0"),
        (dict(num_tasks=0), r"ModalityGroups.num_tasks: must be an int >= 1"),
    ],
)
def test_bad_groups_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModalityGroups(**kwargs)


def test_bad_task_ids_are_refused():
    layout = _layout()
    with pytest.raises(ValueError, match="num_tasks=2 needs task ids per sample"):
        ModalityGroups(num_tasks=2).group_ids(layout)
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 2\), got \[0, 2\]"):
        ModalityGroups(num_tasks=2).group_ids(layout, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="task ids give 3 samples, the batch has 2"):
        ModalityGroups(num_tasks=2).group_ids(layout, torch.tensor([0, 1, 1]))
