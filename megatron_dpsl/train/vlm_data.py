"""Procedural vision-language data for the CPU VLM demonstration: shapes, colours and positions.

No download and no files: sample ``i`` of a split is a pure function of ``(seed, split, i)``
(``numpy.random.default_rng``), so every rank, run and machine sees the same rows. A sample is one
of

* **caption** (45 %): a 32×32 RGB image of one or two shapes (circle, square, triangle, cross; six
  colours; four quadrants) and ``<image> describe : a red circle top left and a blue square bottom
  right <eos>``; the loss covers the caption after ``:``;
* **question** (50 %): the same kind of image and ``<image> what colour is the circle ? red <eos>``,
  ``what shape is top left ? circle`` or ``where is the red circle ? top left``; the loss covers the
  answer (the tokens after ``?``);
* **text** (5 %, no image): ``count : three four five six <eos>``, which exercises LLaVA's text-only
  path (the row is right-padded where other rows hold image embeddings).

Token ids are word indices in ``VOCAB``; the image is the single ``IMAGE_TOKEN_INDEX`` (-200,
LLaVA's default) at position 0, which ``LLaVAModel`` replaces by the image's ``img_seq_len``
embeddings. Rows are padded to ``TEXT_LENGTH`` tokens with ``<pad>`` (loss mask 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_TOKEN_INDEX = -200  # megatron.core.models.multimodal.llava_model.DEFAULT_IMAGE_TOKEN_INDEX
IMAGE_SIZE = 32  # pixels per side; four 16×16 quadrants
TEXT_LENGTH = 16  # tokens per row, the image token included
COLOURS = (
    ("red", (0.9, 0.1, 0.1)),
    ("green", (0.1, 0.8, 0.2)),
    ("blue", (0.15, 0.3, 0.95)),
    ("yellow", (0.95, 0.9, 0.1)),
    ("purple", (0.6, 0.2, 0.8)),
    ("white", (0.95, 0.95, 0.95)),
)
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
NUMBERS = (
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
KINDS = ("caption", "question", "text")
KIND_PROBS = (0.45, 0.50, 0.05)
VOCAB = (
    (
        "<pad>",
        "<eos>",
        "describe",
        "count",
        ":",
        "?",
        "a",
        "and",
        "what",
        "is",
        "the",
        "where",
    )
    + ("colour", "shape")
    + tuple(name for name, _ in COLOURS)
    + SHAPES
    + ("top", "bottom", "left", "right")
    + NUMBERS
)
PAD, EOS = 0, 1
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
_SPLIT_CODE = {"train": 0, "valid": 1}


@dataclass(frozen=True)
class Sample:
    """One row: text ids ``[TEXT_LENGTH]`` (``IMAGE_TOKEN_INDEX`` first when there is an image),
    the first target index (loss from there to ``<eos>``), the kind and the image ``[3, H, W]`` or
    None."""

    tokens: tuple[int, ...]
    target_start: int
    kind: str
    image: np.ndarray | None


def image_seq_length(patch_dim: int, drop_class_token: bool) -> int:
    """Embeddings per image in the language model: CLIP's patches, plus its class token unless
    dropped (``megatron.core.models.vision.clip_vit_model.get_num_image_embeddings`` for one
    tile)."""
    return (IMAGE_SIZE // patch_dim) ** 2 + (0 if drop_class_token else 1)


def _ids(words: list[str]) -> list[int]:
    return [WORD_ID[w] for w in words]


def _shape_mask(shape: str, rng: np.random.Generator) -> np.ndarray:
    """``[16, 16]`` bool mask of ``shape`` in one quadrant, jittered by up to 2 pixels."""
    oy, ox = rng.integers(1, 4, size=2)
    y, x = np.mgrid[0:16, 0:16]
    y, x = y - oy - 5.5, x - ox - 5.5  # centre of a 12×12 box at the offset
    if shape == "circle":
        return y**2 + x**2 <= 5.5**2
    if shape == "square":
        return (np.abs(y) <= 4.5) & (np.abs(x) <= 4.5)
    if shape == "triangle":
        return (y >= -5) & (y <= 5) & (np.abs(x) <= (y + 5) / 2)
    return ((np.abs(y) <= 1.5) & (np.abs(x) <= 5.5)) | ((np.abs(x) <= 1.5) & (np.abs(y) <= 5.5))


def render(objects: list[tuple[int, int, int]], rng: np.random.Generator) -> np.ndarray:
    """``[3, 32, 32]`` float32 in [-1, 1]: each ``(colour, shape, position)`` drawn in its quadrant
    on dark noise."""
    image = rng.normal(0.1, 0.05, size=(3, IMAGE_SIZE, IMAGE_SIZE))
    for colour, shape, position in objects:
        qy, qx = 16 * (position // 2), 16 * (position % 2)
        mask = _shape_mask(SHAPES[shape], rng)
        rgb = np.asarray(COLOURS[colour][1])[:, None]
        image[:, qy : qy + 16, qx : qx + 16][:, mask] = rgb
    return (2.0 * np.clip(image, 0.0, 1.0) - 1.0).astype(np.float32)


def _draw_objects(rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """One or two objects with distinct colours, shapes and quadrants (so every question has one
    answer)."""
    n = int(rng.integers(1, 3))
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    return [(int(c), int(s), int(p)) for c, s, p in zip(colours, shapes, positions)]


def _describe(obj: tuple[int, int, int]) -> list[str]:
    colour, shape, position = obj
    return ["a", COLOURS[colour][0], SHAPES[shape], *POSITIONS[position]]


def _caption(objects) -> tuple[list[str], list[str]]:
    """(prompt, caption); objects in reading order (by quadrant), so the caption is a function of
    the image."""
    objects = sorted(objects, key=lambda obj: obj[2])
    words = _describe(objects[0])
    for obj in objects[1:]:
        words += ["and"] + _describe(obj)
    return ["describe", ":"], words


def _question(objects, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(prompt, answer) for one of the three question types about a random object of the image."""
    colour, shape, position = objects[int(rng.integers(len(objects)))]
    kind = int(rng.integers(3))
    if kind == 0:
        return ["what", "colour", "is", "the", SHAPES[shape], "?"], [COLOURS[colour][0]]
    if kind == 1:
        return ["what", "shape", "is", *POSITIONS[position], "?"], [SHAPES[shape]]
    return ["where", "is", "the", COLOURS[colour][0], SHAPES[shape], "?"], list(POSITIONS[position])


def _count(rng: np.random.Generator) -> tuple[list[str], list[str]]:
    length = int(rng.integers(3, 7))
    first = int(rng.integers(0, len(NUMBERS) - length + 1))
    return ["count", ":"], list(NUMBERS[first : first + length])


def make_sample(seed: int, split: str, index: int) -> Sample:
    """Sample ``index`` of ``split`` (``train`` or ``valid``): a pure function of its arguments."""
    rng = np.random.default_rng((seed, _SPLIT_CODE[split], index))
    kind = KINDS[int(rng.choice(len(KINDS), p=KIND_PROBS))]
    if kind == "text":
        prompt, target = _count(rng)
        head, image = [], None
    else:
        objects = _draw_objects(rng)
        prompt, target = _caption(objects) if kind == "caption" else _question(objects, rng)
        head, image = [IMAGE_TOKEN_INDEX], render(objects, rng)
    tokens = head + _ids(prompt + target) + [EOS]
    tokens += [PAD] * (TEXT_LENGTH - len(tokens))
    return Sample(tuple(tokens), len(head) + len(prompt), kind, image)


def collate(samples: list[Sample], img_seq_len: int) -> dict[str, torch.Tensor]:
    """One micro-batch in ``LLaVAModel.forward``'s layout.

    Returns ``images`` ``[n_img, 3, H, W]`` float32, ``tokens``/``labels``/``position_ids`` ``[b,
    L]`` int64 (``labels[j]`` = ``tokens[j + 1]``), ``loss_mask`` ``[b, L]`` float32 (1 on caption,
    answer and count targets), ``num_image_tiles`` ``[n_img]`` int32 (1 each), ``kinds`` ``[b]``
    (index in ``KINDS``), ``attention_mask`` ``[1, 1, S, S]`` bool causal over the combined length
    ``S`` (``L + img_seq_len - 1`` when a row has an image; Megatron's default mask is built on
    "cuda").
    """
    b, L = len(samples), TEXT_LENGTH
    tokens = torch.tensor([s.tokens for s in samples], dtype=torch.long)
    labels = torch.full((b, L), PAD, dtype=torch.long)
    labels[:, :-1] = tokens[:, 1:]
    loss_mask = torch.zeros(b, L)
    for row, s in enumerate(samples):
        end = s.tokens.index(EOS)
        loss_mask[row, s.target_start - 1 : end] = 1.0  # position j predicts token j + 1
    images = [torch.from_numpy(s.image) for s in samples if s.image is not None]
    combined = L + (img_seq_len - 1 if images else 0)
    return {
        "images": torch.stack(images) if images else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE),
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": torch.arange(L).expand(b, -1),
        "num_image_tiles": torch.ones(len(images), dtype=torch.int32),
        "kinds": torch.tensor([KINDS.index(s.kind) for s in samples]),
        "attention_mask": torch.triu(torch.ones(1, 1, combined, combined, dtype=torch.bool), 1),
    }


class VLMBatchSampler:
    """Deterministic micro-batches of one split for one data-parallel rank, laid out like
    ``megatron_dpsl.train.data.BatchSampler`` (global batch ``t`` holds samples ``t·GBS …``)."""

    def __init__(
        self,
        split,
        *,
        img_seq_len,
        micro_batch_size,
        global_batch_size,
        dp_rank,
        dp_size,
        seed,
        device,
    ):
        self.split, self.img_seq_len, self.seed, self.device = (
            split,
            img_seq_len,
            seed,
            device,
        )
        self.mbs, self.gbs, self.dp_rank, self.dp_size = (
            micro_batch_size,
            global_batch_size,
            dp_rank,
            dp_size,
        )
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)

    def micro_batch(self, iteration: int, microbatch: int) -> dict[str, torch.Tensor]:
        first = (
            iteration * self.gbs + microbatch * self.mbs * self.dp_size + self.dp_rank * self.mbs
        )
        samples = [make_sample(self.seed, self.split, i) for i in range(first, first + self.mbs)]
        return {k: v.to(self.device) for k, v in collate(samples, self.img_seq_len).items()}

    def iterator(self, iteration: int) -> Iterator[dict[str, torch.Tensor]]:
        return (self.micro_batch(iteration, m) for m in range(self.num_microbatches))
