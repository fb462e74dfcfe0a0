"""The VLM demonstration's procedural data (megatron_dpsl.train.vlm_data): determinism and layout.

Pure numpy/torch: no Megatron import. The samples must be a function of (seed, split, index) alone,
so every rank and every run of the demonstration sees the same rows; the micro-batches must have the
layout ``LLaVAModel.forward`` takes.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from megatron_dpsl.train import vlm_data
from megatron_dpsl.train.vlm_data import (
    EOS,
    IMAGE_TOKEN_INDEX,
    PAD,
    TEXT_LENGTH,
    VOCAB,
    VLMBatchSampler,
    collate,
    make_sample,
)

IMG_SEQ_LEN = 16  # 8×8 patches of a 32×32 image, class token dropped (the demo's ViT)


def _words(sample):
    return [VOCAB[t] if t >= 0 else "<image>" for t in sample.tokens]


def test_samples_are_a_function_of_seed_split_and_index():
    for index in (0, 1, 57, 1000):
        a, b = make_sample(3, "train", index), make_sample(3, "train", index)
        assert a.tokens == b.tokens and a.kind == b.kind and a.target_start == b.target_start
        assert (a.image is None) == (b.image is None)
        if a.image is not None:
            assert np.array_equal(a.image, b.image)
    # another split or seed draws other rows (held-out images are not training images)
    train = [make_sample(3, "train", i).tokens for i in range(64)]
    assert train != [make_sample(3, "valid", i).tokens for i in range(64)]
    assert train != [make_sample(4, "train", i).tokens for i in range(64)]


def test_row_layout_and_kind_mix():
    samples = [make_sample(0, "train", i) for i in range(2000)]
    kinds = collections.Counter(s.kind for s in samples)
    # 45 / 50 / 5 % (binomial: 4 standard deviations of 2000 draws)
    assert abs(kinds["caption"] / 2000 - 0.45) < 0.045 and abs(kinds["text"] / 2000 - 0.05) < 0.02
    for s in samples:
        assert len(s.tokens) == TEXT_LENGTH
        assert max(s.tokens) < 64  # fits the demo's --vocab-size 64
        has_image = s.kind != "text"
        assert (s.image is not None) == has_image == (s.tokens[0] == IMAGE_TOKEN_INDEX)
        assert s.tokens.count(IMAGE_TOKEN_INDEX) == int(has_image)
        end = s.tokens.index(EOS)
        assert all(t == PAD for t in s.tokens[end + 1 :])
        assert s.target_start < end  # at least one target word before <eos>
        if has_image:
            assert s.image.shape == (3, 32, 32) and s.image.dtype == np.float32
            assert s.image.min() >= -1.0 and s.image.max() <= 1.0


def test_texts_describe_the_image():
    """The caption names each object in reading order; a question's answer is one of the objects."""
    for i in range(300):
        s = make_sample(5, "valid", i)
        words = _words(s)
        if s.kind == "caption":
            assert words[1:3] == ["describe", ":"]
            caption = words[3 : words.index("<eos>")]
            objects = [o for o in " ".join(caption).split(" and ")]
            assert all(len(o.split()) == 5 and o.startswith("a ") for o in objects)
            order = [vlm_data.POSITIONS.index(tuple(o.split()[3:])) for o in objects]
            assert order == sorted(order)
        elif s.kind == "question":
            assert words[s.target_start - 1] == "?"


def test_shapes_are_drawn_in_their_quadrant_with_their_colour():
    rng = np.random.default_rng(0)
    image = vlm_data.render([(0, 1, 3)], rng)  # a red square, bottom right
    red = (image[0] > 0.6) & (image[1] < -0.6) & (image[2] < -0.6)
    ys, xs = np.nonzero(red)
    assert ys.min() >= 16 and xs.min() >= 16 and red.sum() >= 64
    assert not red[:16].any() and not red[:, :16].any()


def test_collate_matches_llava_forward_layout():
    samples = [make_sample(1, "train", i) for i in range(40)]
    assert any(s.image is None for s in samples) and any(s.image is not None for s in samples)
    batch = collate(samples, IMG_SEQ_LEN)
    n_img = sum(s.image is not None for s in samples)
    assert batch["images"].shape == (n_img, 3, 32, 32)
    assert batch["num_image_tiles"].tolist() == [1] * n_img
    assert (
        batch["tokens"].shape
        == batch["labels"].shape
        == batch["loss_mask"].shape
        == (40, TEXT_LENGTH)
    )
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    S = TEXT_LENGTH + IMG_SEQ_LEN - 1  # the image token becomes IMG_SEQ_LEN rows
    assert batch["attention_mask"].shape == (1, 1, S, S)
    assert torch.equal(batch["attention_mask"][0, 0], torch.ones(S, S, dtype=torch.bool).triu(1))
    for row, s in enumerate(samples):
        # the loss covers exactly the predictions of the target words and <eos>
        targets = batch["labels"][row][batch["loss_mask"][row] == 1].tolist()
        assert targets == list(s.tokens[s.target_start : s.tokens.index(EOS) + 1])
    text_only = collate([s for s in samples if s.image is None], IMG_SEQ_LEN)
    assert (
        text_only["images"].shape[0] == 0 and text_only["attention_mask"].shape[-1] == TEXT_LENGTH
    )


@pytest.mark.parametrize("dp_size", [1, 2])
def test_sampler_shards_global_batches_like_megatron(dp_size):
    """Rank r of micro-batch m of iteration t holds samples t·GBS + m·mbs·dp + r·mbs + [0, mbs)."""
    kw = dict(
        img_seq_len=IMG_SEQ_LEN, micro_batch_size=2, global_batch_size=8, dp_size=dp_size, seed=9
    )
    ranks = [VLMBatchSampler("train", dp_rank=r, device="cpu", **kw) for r in range(dp_size)]
    assert ranks[0].num_microbatches == 8 // (2 * dp_size)
    seen = []
    for m in range(ranks[0].num_microbatches):
        for sampler in ranks:
            seen += sampler.micro_batch(3, m)["tokens"].tolist()
    expected = collate([make_sample(9, "train", i) for i in range(24, 32)], IMG_SEQ_LEN)
    assert seen == expected["tokens"].tolist()
