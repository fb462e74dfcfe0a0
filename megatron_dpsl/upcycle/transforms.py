"""The tensor math of upcycling one dense MLP into experts. No process groups, no I/O.

Shapes (Megatron's layout): fc1 ``[R, H]`` with ``R = 2F`` (gate rows, then up rows) for a gated
linear unit, ``R = F`` otherwise; fc2 ``[H, F]``. With granularity G each expert owns ``f = F/G``
intermediate units: fc1 ``[2f, H]`` (its gate slice then its up slice), fc2 ``[H, f]``.
Expert ``e`` gets shard ``e mod G`` (as Megatron's runtime ``upcycling_utils``), so experts
``c*G .. c*G+G-1`` form copy ``c`` of the dense FFN (a "virtual group", He et al. 2024).
"""

from __future__ import annotations

import dataclasses

import torch

WEIGHT_SCALINGS = ("none", "he2024", "exact")
ROUTER_INITS = ("virtual-group", "normal", "zeros")


def split_fc1(tensor: torch.Tensor, granularity: int, gated: bool) -> list[torch.Tensor]:
    """fc1 weight ``[R, H]`` or bias ``[R]`` -> G shards along the intermediate dim.

    With a gated linear unit the gate and up halves are split alike, so shard ``s`` pairs gate unit
    ``i`` with up unit ``i`` (the GLU product stays elementwise per unit).
    """
    if gated:
        gate, up = torch.chunk(tensor, 2, dim=0)
        gates = torch.tensor_split(gate, granularity, dim=0)
        ups = torch.tensor_split(up, granularity, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(gates, ups)]
    return list(torch.tensor_split(tensor, granularity, dim=0))


def split_fc2(weight: torch.Tensor, granularity: int) -> list[torch.Tensor]:
    """fc2 weight ``[H, F]`` -> G shards ``[H, F/G]`` (columns matching ``split_fc1``'s units)."""
    return list(torch.tensor_split(weight, granularity, dim=1))


@dataclasses.dataclass(frozen=True)
class ScaleFactors:
    """Multipliers applied while copying. ``fc1`` scales fc1 weight and bias; ``fc2`` the routed
    experts' fc2 weight; ``fc2_bias`` their fc2 bias; ``shared`` the shared expert's fc2 weight and
    bias."""

    fc1: float = 1.0
    fc2: float = 1.0
    fc2_bias: float = 1.0
    shared: float = 1.0


def weight_scales(
    mode: str,
    *,
    num_experts: int,
    granularity: int,
    topk: int,
    gated: bool,
    activation: str,
    pre_softmax: bool = False,
    shared_expert: bool = False,
) -> ScaleFactors:
    """Scale factors for ``--weight-scaling``.

    ``he2024``: Megatron's runtime rule (arXiv 2410.07524): ``a = G`` (or ``E*G/k`` with pre-softmax
    top-k), multiply fc1 and fc2 weights (and fc1 bias) by ``a**(1/3)`` for GLU / squared ReLU,
    ``a**(1/2)`` otherwise. ``exact``: multiply only the routed fc2 weight by G; with softmax after
    top-k the selected probabilities sum to one, so the MoE output equals the dense FFN output
    (derivation in docs/upcycling.md). With a shared expert both halves are weighted 1/2.
    """
    if mode == "none":
        return ScaleFactors()
    if mode == "he2024":
        act_scale = num_experts * granularity / topk if pre_softmax else float(granularity)
        power = 1 / 3 if (gated or activation == "squared_relu") else 1 / 2
        s = act_scale**power
        return ScaleFactors(fc1=s, fc2=s)
    if mode == "exact":
        half = 0.5 if shared_expert else 1.0
        return ScaleFactors(fc2=granularity * half, fc2_bias=half, shared=half)
    raise ValueError(f"--weight-scaling must be one of {WEIGHT_SCALINGS}, got {mode!r}")


def init_router(
    init: str,
    *,
    num_experts: int,
    granularity: int,
    hidden_size: int,
    std: float,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Router weight ``[E, H]``.

    ``virtual-group``: ``E/G`` rows drawn from N(0, std^2), each repeated G times (consecutive), so
    the G experts of one dense copy always tie and top-k with k a multiple of G selects whole
    copies.
    ``normal``: every row drawn independently. ``zeros``: all logits equal (uniform probabilities).
    """
    if init == "virtual-group":
        rows = torch.randn(num_experts // granularity, hidden_size, generator=generator) * std
        return rows.repeat_interleave(granularity, dim=0).to(dtype)
    if init == "normal":
        return (torch.randn(num_experts, hidden_size, generator=generator) * std).to(dtype)
    if init == "zeros":
        return torch.zeros(num_experts, hidden_size, dtype=dtype)
    raise ValueError(f"--router-init must be one of {ROUTER_INITS}, got {init!r}")


def drop_upcycle_(
    fc1: torch.Tensor, fc2: torch.Tensor, ratio: float, gated: bool, generator: torch.Generator
) -> torch.Tensor:
    """Drop-Upcycling (Nakamura et al., 2025), in place on one expert.

    Picks ``round(ratio * f)`` of the expert's ``f`` intermediate units and re-draws their fc1 rows
    (gate and up) and fc2 columns from N(mean, std^2) of the matrix they belong to (this expert's
    slice: gate, up and down separately). Returns the re-initialised unit indices ``[n]``.
    """
    f = fc2.shape[1]
    n = int(round(ratio * f))
    idx = torch.randperm(f, generator=generator)[:n]
    if n == 0:
        return idx
    mats = list(torch.chunk(fc1, 2, dim=0)) if gated else [fc1]
    for mat in mats:  # views into fc1: rows are units
        mean, std = mat.float().mean(), mat.float().std()
        mat[idx] = (torch.randn(n, mat.shape[1], generator=generator) * std + mean).to(mat.dtype)
    mean, std = fc2.float().mean(), fc2.float().std()
    fc2[:, idx] = (torch.randn(fc2.shape[0], n, generator=generator) * std + mean).to(fc2.dtype)
    return idx


@dataclasses.dataclass
class ExpertWeights:
    """One expert: fc1 ``[2f|f, H]``, fc2 ``[H, f]``, optional biases ``[2f|f]``, ``[H]``."""

    fc1: torch.Tensor
    fc2: torch.Tensor
    fc1_bias: torch.Tensor | None = None
    fc2_bias: torch.Tensor | None = None


def _scaled_copy(t: torch.Tensor, scale: float, compute: torch.dtype) -> torch.Tensor:
    """A fresh ``compute``-dtype copy of ``t`` times ``scale`` (never a view of the source)."""
    out = t.to(compute, copy=True)
    if scale != 1.0:
        out.mul_(scale)
    return out


def _fc1_shard(t: torch.Tensor, s: int, granularity: int, gated: bool) -> torch.Tensor:
    """Shard ``s`` of fc1 weight ``[R, H]`` or bias ``[R]`` (see ``split_fc1``), possibly a view."""
    if gated:
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat(
            [
                torch.tensor_split(gate, granularity, dim=0)[s],
                torch.tensor_split(up, granularity, dim=0)[s],
            ]
        )
    return torch.tensor_split(t, granularity, dim=0)[s]


def expert_weights(
    mlp: dict[str, torch.Tensor],
    e: int,
    *,
    granularity: int,
    gated: bool,
    scales: ScaleFactors,
    noise_std: float = 0.0,
    drop_ratio: float = 0.0,
    generator: torch.Generator | None = None,
) -> ExpertWeights:
    """Expert ``e`` (shard ``e mod G``) from the dense MLP tensors (keys ``linear_fc1.weight``,
    ``linear_fc2.weight``, optional ``.bias``), built alone so only one expert is in memory.

    Math runs in float32 and is cast back to the source dtype; ``generator`` drives this expert's
    Drop-Upcycling and noise. Meta tensors pass through (shapes only) when noise and drop are 0.
    """
    w1, w2 = mlp["linear_fc1.weight"], mlp["linear_fc2.weight"]
    dtype = w1.dtype
    compute = torch.float32 if w1.device.type != "meta" else dtype
    s = e % granularity
    fc1 = _scaled_copy(_fc1_shard(w1, s, granularity, gated), scales.fc1, compute)
    fc2 = _scaled_copy(torch.tensor_split(w2, granularity, dim=1)[s], scales.fc2, compute)
    if drop_ratio > 0:
        drop_upcycle_(fc1, fc2, drop_ratio, gated, generator)
    if noise_std > 0:
        fc1 += torch.randn(fc1.shape, generator=generator) * noise_std
        fc2 += torch.randn(fc2.shape, generator=generator) * noise_std
    b1, b2 = mlp.get("linear_fc1.bias"), mlp.get("linear_fc2.bias")
    return ExpertWeights(
        fc1=fc1.to(dtype),
        fc2=fc2.to(dtype),
        fc1_bias=None
        if b1 is None
        else _scaled_copy(_fc1_shard(b1, s, granularity, gated), scales.fc1, compute).to(dtype),
        fc2_bias=None if b2 is None else _scaled_copy(b2, scales.fc2_bias, compute).to(dtype),
    )


def upcycle_experts(
    mlp: dict[str, torch.Tensor],
    *,
    num_experts: int,
    granularity: int,
    gated: bool,
    scales: ScaleFactors,
    noise_std: float = 0.0,
    drop_ratio: float = 0.0,
    generators: list[torch.Generator] | None = None,
) -> list[ExpertWeights]:
    """All E experts (``expert_weights`` for e = 0..E-1; ``generators[e]`` per expert)."""
    return [
        expert_weights(
            mlp,
            e,
            granularity=granularity,
            gated=gated,
            scales=scales,
            noise_std=noise_std,
            drop_ratio=drop_ratio,
            generator=None if generators is None else generators[e],
        )
        for e in range(num_experts)
    ]


def shared_expert(mlp: dict[str, torch.Tensor], scales: ScaleFactors) -> dict[str, torch.Tensor]:
    """The dense FFN kept whole as the shared expert; fc2 weight and bias times
    ``scales.shared``."""
    out = {k: v for k, v in mlp.items() if k in ("linear_fc1.weight", "linear_fc1.bias")}
    for k in ("linear_fc2.weight", "linear_fc2.bias"):
        if k in mlp:
            t = mlp[k]
            out[k] = t if scales.shared == 1.0 else (t.float() * scales.shared).to(t.dtype)
    return out
