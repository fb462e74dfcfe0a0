"""Planning a conversion from shapes alone: every output chunk (key, global shape, dtype) grouped in
write units, the parameter counts and the memory and disk the write will need. No weights are read.

A write unit ("group") is ``("global", key)`` one non-layer tensor, ``("objects",)`` the non-layer
objects, or ``(layer, part)`` one part of a layer (``layers.layer_parts``: the non-expert "base",
then each expert).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import torch

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.layers import LayerPlan, layer_parts, layer_pieces
from megatron_dpsl.upcycle.options import UpcycleOptions
from megatron_dpsl.upcycle.pieces import Piece
from megatron_dpsl.upcycle.source import DenseModelInfo, LayerWeights
from megatron_dpsl.upcycle.summary import Counts
from megatron_dpsl.upcycle.transforms import ScaleFactors, weight_scales


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConversionShape:
    """What every layer of this conversion looks like (the options applied to the source)."""

    info: DenseModelInfo
    opts: UpcycleOptions
    moe_layers: list[bool]
    stacked: bool
    scales: ScaleFactors
    router_std: float

    def layer_plan(self, layer: int) -> LayerPlan:
        info, opts = self.info, self.opts
        return LayerPlan(
            layer=layer,
            num_layers=info.num_layers,
            stacked=self.stacked,
            moe=self.moe_layers[layer],
            num_experts=opts.num_experts,
            granularity=opts.granularity,
            gated=info.gated_linear_unit,
            scales=self.scales,
            router_init=opts.router_init,
            router_std=self.router_std,
            noise_std=opts.expert_noise_std,
            drop_ratio=opts.drop_upcycling_ratio,
            shared_expert=opts.shared_expert,
            seed=opts.seed,
            router_bias=bool(getattr(info.args, "add_bias_linear", info.fc2_bias)),
        )


def conversion_shape(info: DenseModelInfo, opts: UpcycleOptions, dense: bool) -> ConversionShape:
    opts.check_source(info)
    moe_layers = [False] * info.num_layers if dense else opts.moe_layers(info.num_layers)
    router_std = opts.router_init_std
    if router_std is None:
        router_std = float(getattr(info.args, "init_method_std", None) or 0.02)
    scales = weight_scales(
        opts.weight_scaling,
        num_experts=opts.num_experts,
        granularity=opts.granularity,
        topk=opts.moe_router_topk,
        gated=info.gated_linear_unit,
        activation=info.activation,
        pre_softmax=opts.moe_router_pre_softmax,
        shared_expert=opts.shared_expert,
    )
    return ConversionShape(
        info=info,
        opts=opts,
        moe_layers=moe_layers,
        stacked=dense or (all(moe_layers) and isinstance(opts.moe_layer_freq, int)),
        scales=scales,
        router_std=router_std,
    )


class LayerCache:
    """The source layer being written (its parts are written back to back: read it once per pass);
    real tensors are checked to be finite, so damaged bytes are never copied."""

    def __init__(self, source):
        self.source, self.key, self.weights = source, None, None

    def get(self, layer: int, meta: bool) -> LayerWeights:
        if self.key != (layer, meta):
            self.weights = None  # release the previous layer before reading the next
            self.weights = self.source.read_layer(layer, meta=meta)
            self.key = (layer, meta)
            if not meta:
                named = {
                    **self.weights.other,
                    **{f"mlp.{n}": t for n, t in self.weights.mlp.items()},
                }
                check_finite(named, f"decoder.layers.{layer}.")
        return self.weights


def check_finite(tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Every float tensor finite, or an error naming the first one that is not."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UpcycleError(f"source tensor {prefix}{name} holds NaN or inf: damaged")


def pieces_for(source, shape: ConversionShape, cache: LayerCache, group, meta: bool) -> list[Piece]:
    """The pieces of write unit ``group`` (meta tensors when ``meta``), under their output keys."""
    if group[0] == "global":
        pieces = source.global_pieces(meta=meta, key=group[1])
        if not meta:
            check_finite({p.key: p.data for p in pieces if not p.is_object}, "")
    elif group[0] == "objects":
        pieces = [p for p in source.global_pieces(meta=True) if p.is_object]
    else:
        layer, part = group
        pieces = layer_pieces(shape.layer_plan(layer), cache.get(layer, meta), part)
    # a LLaVA source yields the language model's keys without their "language_model." prefix
    rename = getattr(source, "output_key", None)
    return [dataclasses.replace(p, key=rename(p.key)) for p in pieces] if rename else pieces


def write_groups(source, shape: ConversionShape) -> list[Hashable]:
    groups = [("global", p.key) for p in source.global_pieces(meta=True) if not p.is_object]
    groups.append(("objects",))
    for layer in range(shape.info.num_layers):
        groups += [(layer, part) for part in layer_parts(shape.layer_plan(layer))]
    return groups


def _count(counts: Counts, shape: ConversionShape, group, pieces: list[Piece], cache: LayerCache):
    for p in pieces:
        # pre_mlp_layernorm.* aliases mlp.linear_fc1.layer_norm_* (see layers.py): count once
        if not p.is_object and ".pre_mlp_layernorm." not in p.key:
            counts.moe_params += p.numel
            counts.dense_params += p.numel if group[0] == "global" else 0
        counts.bytes_planned += p.nbytes
    if isinstance(group[0], int) and group[1] == "base":
        w = cache.get(group[0], True)
        counts.dense_params += sum(t.numel() for t in (*w.other.values(), *w.mlp.values()))
        if shape.moe_layers[group[0]]:
            counts.moe_layers += 1
            counts.inactive_params += (
                shape.opts.num_experts - shape.opts.moe_router_topk
            ) * counts.expert_params
        else:
            counts.dense_layers += 1


def expert_params(info: DenseModelInfo, opts: UpcycleOptions) -> int:
    """Parameters of one routed expert: fc1 ``[2F/G | F/G, H]`` (+ bias), fc2 ``[H, F/G]`` (+
    bias)."""
    F, G, H = info.ffn_hidden_size, opts.granularity, info.hidden_size
    fc1_rows = (2 if info.gated_linear_unit else 1) * F // G
    return fc1_rows * H + H * F // G + fc1_rows * info.fc1_bias + H * info.fc2_bias


def plan_conversion(source, shape: ConversionShape):
    """(planned groups with meta pieces, counts): every chunk's key, shape and dtype, from
    shapes."""
    counts = Counts(expert_params=expert_params(shape.info, shape.opts))
    cache = LayerCache(source)
    planned = []
    for group in write_groups(source, shape):
        pieces = pieces_for(source, shape, cache, group, meta=True)
        planned.append((group, pieces))
        _count(counts, shape, group, pieces, cache)
    counts.peak_bytes = peak_memory(source, planned)
    return planned, counts


def peak_memory(source, planned) -> int:
    """Working memory of the write above the interpreter, an estimate: one source layer (kept while
    its units are written) plus four times the largest write unit (an expert, a layer's base part,
    or a non-layer tensor such as the embedding: the copy read, the copy built, and DCP's
    serialisation of it). Calibrated on ``benchmarks/upcycle_memory.py`` (TinyLlama-1.1B shapes,
    fp32, 2in4): 1.14 GiB by this rule, 1.07 GiB measured (peak RSS above the imports)."""
    unit = max(sum(p.nbytes for p in pieces) for _, pieces in planned)
    layer = source.read_layer(0, meta=True)
    layer_bytes = sum(
        t.numel() * t.element_size() for t in (*layer.other.values(), *layer.mlp.values())
    )
    return layer_bytes + 4 * unit
