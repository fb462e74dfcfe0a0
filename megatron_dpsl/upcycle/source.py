"""What every reader yields: the dense model's shape and its weights, one layer at a time."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Protocol

import torch

from megatron_dpsl.upcycle.pieces import Piece

# The MLP entries a dense Megatron layer holds under ``decoder.layers.[i.]mlp.`` (the pre-MLP norm
# is stored there too: local and TE specs both save it as ``mlp.linear_fc1.layer_norm_*``).
MLP_WEIGHTS = (
    "linear_fc1.weight",
    "linear_fc1.bias",
    "linear_fc2.weight",
    "linear_fc2.bias",
    "linear_fc1.layer_norm_weight",
    "linear_fc1.layer_norm_bias",
)
MLP_OBJECTS = ("linear_fc1._extra_state", "linear_fc2._extra_state")

SUPPORTED_ACTIVATIONS = ("silu", "gelu", "squared_relu", "quick_gelu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseModelInfo:
    """Shape of the dense GPT model being upcycled.

    ``ffn_hidden_size`` is F: fc1 is ``[2F, H]`` (gate rows then up rows) with a gated linear unit,
    ``[F, H]`` without; fc2 is ``[H, F]``. ``args`` is the Megatron-LM argument namespace written
    into the output's ``common.pt`` (read from the source, or built from a HF ``config.json``).
    """

    source_kind: str  # "megatron" or "hf"
    path: Path  # the directory holding the tensors
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    gated_linear_unit: bool
    activation: str
    fc1_bias: bool
    fc2_bias: bool
    dtype: torch.dtype
    args: argparse.Namespace
    iteration: int | None = None


@dataclasses.dataclass
class LayerWeights:
    """One dense transformer layer, keys relative to ``decoder.layers.[i.]``.

    ``other``: every non-MLP tensor (attention, input norm, ...), copied unchanged.
    ``other_objects``: non-MLP ``ShardedObject`` payloads (e.g. ``_extra_state``).
    ``mlp``: ``MLP_WEIGHTS`` entries present, keys without the ``mlp.`` prefix.
    """

    other: dict[str, torch.Tensor]
    other_objects: dict[str, Any]
    mlp: dict[str, torch.Tensor]


class DenseSource(Protocol):
    """A dense checkpoint opened for streaming."""

    info: DenseModelInfo

    def global_pieces(self, meta: bool = False, key: str | None = None) -> list[Piece]:
        """Non-layer entries (embedding, final norm, output layer, ...) as full pieces; with ``key``
        only that tensor."""

    def read_layer(self, layer: int, meta: bool = False) -> LayerWeights:
        """Layer ``layer`` (0-based, global); ``meta=True`` returns meta tensors (shapes only)."""

    def content_hash(self) -> str:
        """sha256 over the source files (names and bytes)."""

    def close(self) -> None: ...
