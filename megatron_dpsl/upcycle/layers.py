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
    expert index. Materialising one part at a time keeps one expert, not E, in memory."""
    return ["base", *range(plan.num_experts)] if plan.moe else ["base"]


def layer_pieces(plan: LayerPlan, w: LayerWeights, part="all") -> list[Piece]:
    """Pieces of one output layer: ``part`` is ``"base"``, an expert index, or ``"all"``.

    Shapes: see transforms.py; expert pieces carry the expert axis after the layer axis.
    """
    meta = w.mlp["linear_fc1.weight"].device.type == "meta"
    if plan.stacked:
        key = lambda name: f"decoder.layers.{name}"  # noqa: E731
        lead = ((plan.layer, plan.num_layers),)
        obj_shape, obj_offset = (), ()
    else:
        key = lambda name: f"decoder.layers.{plan.layer}.{name}"  # noqa: E731
        lead = ()
        obj_shape, obj_offset = (1,), (0,)

    def obj(name, payload=None, extra=()):
        shape, offset = (obj_shape, obj_offset) if not extra else ((), ())
        return Piece(
            key(name), payload, lead + extra, is_object=True, obj_shape=shape, obj_offset=offset
        )

    if part == "all":
        return [p for part_ in layer_parts(plan) for p in layer_pieces(plan, w, part_)]
    E, H = plan.num_experts, w.mlp["linear_fc2.weight"].shape[0]
    dtype = w.mlp["linear_fc1.weight"].dtype
    if part != "base":
        e = int(part)
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
        slot = lead + ((e, E),)
        pieces = [
            Piece(key(EXPERTS + "linear_fc1.weight"), ex.fc1, slot),
            Piece(key(EXPERTS + "linear_fc2.weight"), ex.fc2, slot),
        ]
        if ex.fc1_bias is not None:
            pieces.append(Piece(key(EXPERTS + "linear_fc1.bias"), ex.fc1_bias, slot))
        if ex.fc2_bias is not None:
            pieces.append(Piece(key(EXPERTS + "linear_fc2.bias"), ex.fc2_bias, slot))
        pieces.append(obj(EXPERTS + "linear_fc1._extra_state", None, ((e, E),)))
        pieces.append(obj(EXPERTS + "linear_fc2._extra_state", None, ((e, E),)))
        return pieces

    pieces = [Piece(key(n), t, lead) for n, t in w.other.items()]
    pieces += [obj(n, p) for n, p in w.other_objects.items()]
    if not plan.moe:
        pieces += [Piece(key("mlp." + n), t, lead) for n, t in w.mlp.items()]
        pieces += [obj("mlp.linear_fc1._extra_state"), obj("mlp.linear_fc2._extra_state")]
        return pieces
    for n, t in w.mlp.items():
        if n.startswith("linear_fc1.layer_norm_"):
            # The local MoE spec saves the pre-MLP norm as mlp.linear_fc1.layer_norm_* (its
            # sharded_state_dict_keys_map), the TE MoE spec as pre_mlp_layernorm.*; write both so
            # the checkpoint loads under either --transformer-impl (unexpected keys are ignored on
            # load).
            pieces.append(Piece(key("mlp." + n), t, lead))
            pieces.append(
                Piece(key("pre_mlp_layernorm." + n[len("linear_fc1.layer_norm_") :]), t, lead)
            )
    if meta:
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
    pieces.append(Piece(key("mlp.router.weight"), router, lead))
    if (
        plan.router_bias
    ):  # Megatron's Router has a bias with add_bias_linear; zero keeps virtual groups tied
        pieces.append(
            Piece(key("mlp.router.bias"), torch.zeros(E, dtype=dtype, device=router.device), lead)
        )
    if plan.shared_expert:
        for n, t in shared_expert(w.mlp, plan.scales).items():
            pieces.append(Piece(key(SHARED + n), t, lead))
        pieces += [obj(SHARED + "linear_fc1._extra_state"), obj(SHARED + "linear_fc2._extra_state")]
    return pieces
