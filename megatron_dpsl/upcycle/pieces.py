"""The unit the upcycler moves around: one tensor (or object) chunk with its place in a global
tensor."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Piece:
    """A chunk of a sharded checkpoint entry, as Megatron's ``ShardedTensor.from_rank_offsets`` sees
    it.

    ``key`` is the sharded key on disk (e.g.
    ``decoder.layers.mlp.experts.experts.linear_fc1.weight``).
    ``data`` is the tensor without the prepended axes (or a ``ShardedObject`` payload).
    ``prepend`` lists ``(index, count)`` for each leading global axis the chunk is one slot of:
    ``((layer, num_layers), (expert, num_experts))`` gives global shape
    ``[num_layers, num_experts, *data.shape]``.
    For objects, ``obj_shape``/``obj_offset`` add trailing object-grid axes (usually empty).
    """

    key: str
    data: Any
    prepend: tuple[tuple[int, int], ...] = ()
    is_object: bool = False
    obj_shape: tuple[int, ...] = ()
    obj_offset: tuple[int, ...] = ()

    @property
    def global_shape(self) -> tuple[int, ...]:
        lead = tuple(n for _, n in self.prepend)
        if self.is_object:
            return lead + self.obj_shape
        return lead + tuple(self.data.shape)

    @property
    def numel(self) -> int:
        return 0 if self.is_object else int(self.data.numel())

    @property
    def nbytes(self) -> int:
        return 0 if self.is_object else int(self.data.numel() * self.data.element_size())


def describe(piece: Piece) -> str:
    """One line for ``--dry-run``: key, global shape, dtype."""
    if piece.is_object:
        return f"{piece.key}  object{list(piece.global_shape)}"
    dtype = (
        str(piece.data.dtype).replace("torch.", "") if isinstance(piece.data, torch.Tensor) else "?"
    )
    return f"{piece.key}  {list(piece.global_shape)} {dtype}"
