"""Which rows of ``LLaVAModel``'s combined sequence are image embeddings, text or padding.

``LLaVAModel._preprocess_data`` (megatron-core 0.16 and 0.19) replaces each image token of
``input_ids`` (``-200`` by default) by that image's ``num_image_tiles * img_seq_len`` embeddings,
right-pads every row to the longest one, pads to ``language_max_sequence_length`` under pipeline
parallelism and truncates to it; 0.19's ``_process_embedding_token_parallel`` then pads to a
multiple of the SP/CP shard factor (0.16 asserts it is one). The image positions exist only inside
that function, so this module recomputes them from the same inputs, row for row, and maps them to
DPSL token groups::

    layout = llava_token_layout(input_ids, num_image_tiles, img_seq_len=576, image_token_index=-200,
                                max_sequence_length=4096)
    ids = ModalityGroups(vision=0, text=1).group_ids(layout)      # [b, S] long
    # layout.is_pad [b, S]: rows no router loss may count

Shapes: ``b`` batch rows, ``s`` text tokens per row (image tokens included), ``S`` the language
model's combined sequence length. No process groups, no Megatron imports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_TOKEN_INDEX = -200  # Megatron's DEFAULT_IMAGE_TOKEN_INDEX


def check_image_token_index(index: int, vocab_size: int) -> None:
    """A one-line ``ValueError`` when ``index`` is a vocabulary id (those text tokens would become
    images)."""
    if 0 <= index < vocab_size:
        raise ValueError(
            f"image_token_index={index} is a vocabulary id (vocab_size={vocab_size}): text tokens "
            "with "
            "that id would become images; use a negative id (Megatron's default "
            f"{IMAGE_TOKEN_INDEX})"
        )


@dataclass(frozen=True)
class LLaVATokenLayout:
    """Per-row roles of the combined sequence ``LLaVAModel`` gives its language model.

    ``is_image`` and ``is_pad`` are ``[b, S]`` bool and disjoint; every other row is text.
    """

    is_image: torch.Tensor
    is_pad: torch.Tensor


def check_image_inputs(
    input_ids, num_image_tiles, num_tiles_given: int | None, image_token_index: int
):
    """Raise a one-line ``ValueError`` when the images do not match the image tokens of
    ``input_ids``.

    Args:
        input_ids: ``[b, s]`` text ids with one ``image_token_index`` per image.
        num_image_tiles: ``[num_images]`` tiles per image, or ``None`` (no images given).
        num_tiles_given: ``images.shape[0]`` (tiles in the batch), or ``None`` when ``images``
            is None.
        image_token_index: the id standing for an image.
    """
    num_tokens = int((input_ids == image_token_index).sum())
    num_images = 0 if num_image_tiles is None else int(num_image_tiles.numel())
    if num_tokens != num_images:
        raise ValueError(
            f"LLaVA inputs: input_ids hold {num_tokens} image tokens ({image_token_index}) but "
            f"{num_images} images are given (num_image_tiles / images); give one image per image "
            "token"
        )
    if num_images and int((num_image_tiles < 1).sum()):
        raise ValueError(
            f"LLaVA inputs: num_image_tiles must be >= 1 per image, got {num_image_tiles.tolist()}"
        )
    tiles = 0 if num_image_tiles is None else int(num_image_tiles.sum())
    if num_tiles_given is not None and num_tiles_given != tiles:
        raise ValueError(
            f"LLaVA inputs: images hold {num_tiles_given} tiles but num_image_tiles sums to {tiles}"
        )


def llava_token_layout(
    input_ids: torch.Tensor,
    num_image_tiles: torch.Tensor | None,
    *,
    img_seq_len: int,
    image_token_index: int,
    max_sequence_length: int,
    pad_to_max_length: bool = False,
    shard_factor: int = 1,
) -> LLaVATokenLayout:
    """The combined sequence's layout, exactly as ``LLaVAModel`` builds it.

    Args:
        input_ids: ``[b, s]`` text ids, one ``image_token_index`` per image.
        num_image_tiles: ``[num_images]`` int, tiles per image in batch order (``None``: no images).
        img_seq_len: embeddings per tile (``LLaVAModel.img_seq_len``: patches, class token unless
            dropped, tile tags).
        image_token_index: the id standing for an image.
        max_sequence_length: the language model's length: longer rows are truncated.
        pad_to_max_length: pad to ``max_sequence_length`` (``LLaVAModel`` does under pipeline
            parallelism).
        shard_factor: pad the length to a multiple of this (megatron-core 0.19's SP/CP padding:
            ``tp`` with SP, ``2·cp`` with CP, ``2·tp·cp`` with both; 0.16 asserts the length
            already is).
    """
    image_mask = input_ids == image_token_index  # [b, s]
    lens = image_mask.long()
    if num_image_tiles is not None and num_image_tiles.numel():
        lens[image_mask] = num_image_tiles.to(lens.device).long() * img_seq_len - 1
    last_row = (
        torch.cumsum(lens + 1, dim=-1) - 1
    )  # [b, s]: combined row of each token's last embedding
    seq_lens = last_row[:, -1] + 1  # [b]
    length = int(seq_lens.max()) if input_ids.numel() else 0
    if pad_to_max_length:
        length = max(length, max_sequence_length)
    batch = input_ids.shape[0]
    is_text = torch.zeros(batch, length, dtype=torch.bool, device=input_ids.device)
    rows, cols = torch.where(~image_mask)
    is_text[rows, last_row[rows, cols]] = True
    positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
    is_pad = positions >= seq_lens[:, None]
    is_image = ~is_text & ~is_pad
    is_image, is_pad = (
        is_image[:, :max_sequence_length],
        is_pad[:, :max_sequence_length],
    )
    extra = -is_pad.shape[1] % shard_factor
    if extra:
        is_image = torch.nn.functional.pad(is_image, (0, extra), value=False)
        is_pad = torch.nn.functional.pad(is_pad, (0, extra), value=True)
    return LLaVATokenLayout(is_image=is_image, is_pad=is_pad)


def with_valid_lengths(layout: LLaVATokenLayout, cu_seqlens: torch.Tensor) -> LLaVATokenLayout:
    """``layout`` with every row past its sample's valid length flagged as padding.

    Megatron-LM's VLM ``get_batch`` pads the *text* so that the combined sequence divides the SP/CP
    shard factor and passes each sample's valid combined length as ``cu_seqlens_q`` (sbhd
    ``PackedSeqParams``, ``[b + 1]`` cumulative): those padded text rows are no text.

    Args:
        layout: from ``llava_token_layout``, ``[b, S]``.
        cu_seqlens: ``[b + 1]`` int cumulative valid lengths (``cu_seqlens_q``).
    """
    valid = (cu_seqlens[1:] - cu_seqlens[:-1]).to(layout.is_pad.device).long()  # [b]
    if valid.numel() != layout.is_pad.shape[0]:
        raise ValueError(
            f"LLaVA inputs: packed_seq_params.cu_seqlens_q gives {valid.numel()} samples, "
            f"input_ids has {layout.is_pad.shape[0]} rows"
        )
    positions = torch.arange(layout.is_pad.shape[1], device=valid.device)
    is_pad = layout.is_pad | (positions[None, :] >= valid[:, None])
    return LLaVATokenLayout(is_image=layout.is_image & ~is_pad, is_pad=is_pad)


@dataclass(frozen=True, kw_only=True)
class ModalityGroups:
    """How the combined sequence's rows map to DPSL token groups (rows of the ``[G, E]`` prior).

    Modality priors (paper Sec. 3.4): ``vision=0, text=1`` (the default); with the α_b/α_s shortcut
    group g prefers the g-th block of experts, so ``vision=1, text=0`` makes vision prefer the last
    block. Task priors on text (text split by data subset): ``num_tasks=T`` and a per-row task id
    ``t`` in ``[0, T)``: text rows of a sample from subset t get ``text + t``, image rows ``vision``
    (G = 1 + T with ``vision=0, text=1``). Task priors on every token: ``vision=None`` (image rows
    take their sample's text group). Padding rows get ``text``; they are flagged separately and
    excluded.

    Args:
        vision: group of image-embedding rows (tiles, and NVLM tile tags, included), or ``None``.
        text: group of text rows (the first task's group when ``num_tasks > 1``).
        num_tasks: data subsets the text is split by (1: no task split).
    """

    vision: int | None = 0
    text: int = 1
    num_tasks: int = 1

    def __post_init__(self):
        for name in ("text", "num_tasks") + (("vision",) if self.vision is not None else ()):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (name == "num_tasks")
            ):
                raise ValueError(
                    f"ModalityGroups.{name}: must be an int >= {int(name == 'num_tasks')}, got "
                    f"{value!r}"
                )
        if self.vision is not None and self.text <= self.vision < self.text + self.num_tasks:
            raise ValueError(
                f"ModalityGroups: vision group {self.vision} is also a text group "
                f"({self.text}..{self.text + self.num_tasks - 1}); give vision its own id, or "
                "vision=None"
            )

    @property
    def num_groups(self) -> int:
        """G, the number of groups the prior must have (ids lie in ``[0, G)``)."""
        return max(self.vision or 0, self.text + self.num_tasks - 1) + 1

    def group_ids(
        self, layout: LLaVATokenLayout, task_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[b, S]`` long group ids for ``layout``.

        Args:
            layout: from ``llava_token_layout``.
            task_ids: ``[b]`` int data subset of each sample, in ``[0, num_tasks)``; needed when
                ``num_tasks > 1`` (``None`` means subset 0 otherwise).
        """
        batch = layout.is_pad.shape[0]
        if task_ids is None:
            if self.num_tasks > 1:
                raise ValueError(
                    f"ModalityGroups: num_tasks={self.num_tasks} needs task ids per sample "
                    "([batch] int, "
                    "the model's dpsl_task_ids= argument)"
                )
            task_ids = torch.zeros(batch, dtype=torch.long, device=layout.is_pad.device)
        task_ids = torch.as_tensor(task_ids, device=layout.is_pad.device).long().reshape(-1)
        if task_ids.numel() != batch:
            raise ValueError(
                f"ModalityGroups: task ids give {task_ids.numel()} samples, the batch has {batch}"
            )
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.num_tasks):
            raise ValueError(
                f"ModalityGroups: task ids must lie in [0, {self.num_tasks}), got "
                f"{task_ids.tolist()}"
            )
        ids = (self.text + task_ids)[:, None].expand_as(layout.is_pad).clone()
        if self.vision is not None:
            ids[layout.is_image] = self.vision
        ids[layout.is_pad] = self.text
        return ids
