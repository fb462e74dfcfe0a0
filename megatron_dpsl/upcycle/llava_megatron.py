"""A Megatron-Core ``LLaVAModel`` ``torch_dist`` checkpoint as an upcycling source.

The language model is read by :class:`~megatron_dpsl.upcycle.readers.MegatronDenseSource` (its key
prefix is ``language_model.``, found from the word embeddings); every ``vision_model.*`` and
``vision_projection.*`` entry (tensors and ``_extra_state`` objects) is copied with its stored
global shape, so the ViT and projector are bit for bit the source's under any TP/PP layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_dpsl.upcycle.dcp_io import parse_object_name
from megatron_dpsl.upcycle.llava import (
    LM_PREFIX,
    PASSTHROUGH_ROOTS,
    LlavaSource,
    vision_info,
)
from megatron_dpsl.upcycle.pieces import Piece


def open_dist_llava(lm) -> LlavaSource | None:
    """``lm``: the opened language-model source; None if the checkpoint is not a LLaVA."""
    if not lm.prefix.endswith(LM_PREFIX):
        return None
    outer = lm.prefix[: -len(LM_PREFIX)]
    tensors = {
        k[len(outer) :]: (k, tuple(size), dtype)
        for k, (size, dtype) in lm._dcp.tensor_entries().items()
        if k.startswith(outer) and k[len(outer) :].startswith(PASSTHROUGH_ROOTS)
    }
    objects: dict[str, list] = {}
    for name in lm._dcp.object_entries():
        key, offset, shape = parse_object_name(name)
        if key.startswith(outer) and key[len(outer) :].startswith(PASSTHROUGH_ROOTS):
            objects.setdefault(key[len(outer) :], []).append((name, offset, shape))
    shapes = {k: size for k, (_, size, _) in tensors.items()}
    vision = vision_info(shapes, lm.info.args, lm.step_dir)
    reader = lm._dcp

    def tensor(key):
        fqn, size, dtype = tensors[key]

        def produce(meta: bool) -> list[Piece]:
            if meta:
                return [Piece(key, torch.empty(size, dtype=dtype, device="meta"))]
            return [Piece(key, reader.read({key: (fqn, (0,) * len(size), size)}, {})[0][key])]

        return produce

    def obj(key):
        shards = objects[key]

        def produce(meta: bool) -> list[Piece]:
            payloads = reader.read({}, {name: name for name, _, _ in shards})[1]
            return [
                Piece(key, payloads[name], is_object=True, obj_shape=shape, obj_offset=offset)
                for name, offset, shape in shards
            ]

        return produce

    passthrough = {k: tensor(k) for k in tensors} | {k: obj(k) for k in objects}
    return LlavaSource(lm, passthrough, vision, kind="megatron-llava")


def open_megatron(src: Path, activation: str | None = None):
    """A Megatron checkpoint: a LLaVA (``torch_dist``, or the legacy per-rank ``torch`` format) as a
    :class:`LlavaSource`, else a dense GPT ``torch_dist`` source."""
    from megatron_dpsl.upcycle.legacy import is_legacy_checkpoint
    from megatron_dpsl.upcycle.readers import MegatronDenseSource, resolve_step_dir

    step_dir, _ = resolve_step_dir(Path(src))
    if is_legacy_checkpoint(step_dir) and not (step_dir / "metadata.json").is_file():
        from megatron_dpsl.upcycle.llava_legacy import open_legacy_llava

        return open_legacy_llava(step_dir, Path(src), activation)
    lm = MegatronDenseSource(src, activation=activation)
    return open_dist_llava(lm) or lm
