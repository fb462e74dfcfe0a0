"""Turning one dense layer's weights into the pieces of the upcycled layer (keys as Megatron's
MoE ``GPTModel.sharded_state_dict`` names them)."""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from megatron_dpsl.upcycle.pieces import Piece
from megatron_dpsl.upcycle.source import LayerWeights
from megatron_dpsl.upcycle.transforms import (
    ScaleFactors,
    expert_weights,
    init_router,
    shared_expert,
)

EXPERTS = "mlp.experts.experts."
SHARED = "mlp.shared_experts."


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """How to write layer ``layer`` of ``num_layers``.

    ``stacked``: keys ``decoder.layers.<name>`` with a leading layer axis (all layers MoE);
    otherwise ``decoder.layers.<i>.<name>`` (Megatron's non-homogeneous layout).
    """

    layer: int
    num_layers: int
    stacked: bool
    moe: bool
    num_experts: int
    granularity: int
    gated: bool
    scales: ScaleFactors
    router_init: str
    router_std: float
    noise_std: float
    drop_ratio: float
    shared_expert: bool
    router_bias: bool
    seed: int


def _generator(seed: int, *stream: int) -> torch.Generator:
    # one independent stream per (layer, expert): results do not depend on processing order
    digest = hashlib.sha256(repr((seed, *stream)).encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def layer_parts(plan: LayerPlan) -> list:
    """The write units of one layer: ``"base"`` (everything but the routed experts), then each
    expert
    index. Materialising one part at a time keeps one expert, not E, in memory."""
    return ["base", *range(plan.num_experts)] if plan.moe else ["base"]


@dataclasses.dataclass(frozen=True)
class _Slots:
    """Where one layer's pieces go: stacked keys ``decoder.layers.<name>`` with a leading layer
    axis, or Megatron's per-layer keys ``decoder.layers.<i>.<name>`` (objects on a ``(1,)``
    grid)."""

    plan: LayerPlan

    def key(self, name: str) -> str:
        if self.plan.stacked:
            return f"decoder.layers.{name}"
        return f"decoder.layers.{self.plan.layer}.{name}"

    @property
    def lead(self) -> tuple:
        return ((self.plan.layer, self.plan.num_layers),) if self.plan.stacked else ()

    def tensor(self, name: str, data, extra=()) -> Piece:
        return Piece(self.key(name), data, self.lead + extra)

    def obj(self, name: str, payload=None, extra=()) -> Piece:
        shape, offset = ((), ()) if extra or self.plan.stacked else ((1,), (0,))
        return Piece(
            self.key(name),
            payload,
            self.lead + extra,
            is_object=True,
            obj_shape=shape,
            obj_offset=offset,
        )


def layer_pieces(plan: LayerPlan, w: LayerWeights, part="all") -> list[Piece]:
    """Pieces of one output layer: ``part`` is ``"base"``, an expert index, or ``"all"``.

    Shapes: see transforms.py; expert pieces carry the expert axis after the layer axis.
    """
    if part == "all":
        return [p for part_ in layer_parts(plan) for p in layer_pieces(plan, w, part_)]
    slots = _Slots(plan)
    if part != "base":
        return _expert_pieces(slots, w, int(part))
    pieces = [slots.tensor(n, t) for n, t in w.other.items()]
    pieces += [slots.obj(n, p) for n, p in w.other_objects.items()]
    if not plan.moe:
        pieces += [slots.tensor("mlp." + n, t) for n, t in w.mlp.items()]
        return pieces + [
            slots.obj("mlp.linear_fc1._extra_state"),
            slots.obj("mlp.linear_fc2._extra_state"),
        ]
    return pieces + _moe_base_pieces(slots, w)


def _is_meta(w: LayerWeights) -> bool:
    return w.mlp["linear_fc1.weight"].device.type == "meta"


def _expert_pieces(slots: _Slots, w: LayerWeights, e: int) -> list[Piece]:
    """Expert ``e`` of the layer: fc1/fc2 (and biases) ``[1, 1, ...]`` chunks of ``[L, E, ...]``."""
    plan, meta = slots.plan, _is_meta(w)
    ex = expert_weights(
        w.mlp,
        e,
        granularity=plan.granularity,
        gated=plan.gated,
        scales=plan.scales,
        noise_std=0.0 if meta else plan.noise_std,
        drop_ratio=0.0 if meta else plan.drop_ratio,
        generator=None if meta else _generator(plan.seed, plan.layer, e),
    )
    slot = ((e, plan.num_experts),)
    named = {
        "linear_fc1.weight": ex.fc1,
        "linear_fc2.weight": ex.fc2,
        "linear_fc1.bias": ex.fc1_bias,
        "linear_fc2.bias": ex.fc2_bias,
    }
    pieces = [slots.tensor(EXPERTS + n, t, slot) for n, t in named.items() if t is not None]
    return pieces + [
        slots.obj(EXPERTS + "linear_fc1._extra_state", None, slot),
        slots.obj(EXPERTS + "linear_fc2._extra_state", None, slot),
    ]


def _moe_base_pieces(slots: _Slots, w: LayerWeights) -> list[Piece]:
    """An MoE layer's MLP part without the routed experts: pre-MLP norm, router, shared expert."""
    plan, pieces = slots.plan, []
    for n, t in w.mlp.items():
        if n.startswith("linear_fc1.layer_norm_"):
            # The local MoE spec saves the pre-MLP norm as mlp.linear_fc1.layer_norm_* (its
            # sharded_state_dict_keys_map), the TE MoE spec as pre_mlp_layernorm.*; write both so
            # the checkpoint loads under either --transformer-impl (unexpected keys are ignored on
            # load).
            pieces.append(slots.tensor("mlp." + n, t))
            pieces.append(
                slots.tensor("pre_mlp_layernorm." + n[len("linear_fc1.layer_norm_") :], t)
            )
    pieces += _router_pieces(slots, w)
    if plan.shared_expert:
        pieces += [
            slots.tensor(SHARED + n, t) for n, t in shared_expert(w.mlp, plan.scales).items()
        ]
        pieces += [
            slots.obj(SHARED + "linear_fc1._extra_state"),
            slots.obj(SHARED + "linear_fc2._extra_state"),
        ]
    return pieces


def _router_pieces(slots: _Slots, w: LayerWeights) -> list[Piece]:
    """Router weight ``[E, H]`` (meta tensor when planning), and a zero bias ``[E]`` when the
    model has linear biases (Megatron's Router has one then; zero keeps virtual groups tied)."""
    plan = slots.plan
    E, H = plan.num_experts, w.mlp["linear_fc2.weight"].shape[0]
    dtype = w.mlp["linear_fc1.weight"].dtype
    if _is_meta(w):
        router = torch.empty(E, H, dtype=dtype, device="meta")
    else:
        router = init_router(
            plan.router_init,
            num_experts=E,
            granularity=plan.granularity,
            hidden_size=H,
            std=plan.router_std,
            generator=_generator(plan.seed, plan.layer, -1),
            dtype=dtype,
        )
    pieces = [slots.tensor("mlp.router.weight", router)]
    if plan.router_bias:
        bias = torch.zeros(E, dtype=dtype, device=router.device)
        pieces.append(slots.tensor("mlp.router.bias", bias))
    return pieces
