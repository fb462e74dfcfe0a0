"""The DPSL loss: Cramér–von Mises distance of each expert's routing probabilities to the
Dirichlet prior's Beta marginal (the paper's Eq. 4), without λ.

Pure tensor math: no process groups, no Megatron. Shape legend: B tokens, E experts, G token
groups; ``probs`` ``[B, E]`` (``[num_tokens, num_experts]``), ``alpha`` ``[E]`` or ``[G, E]``.

For every (group g, expert k) "row", the valid tokens of group g are sorted by ``probs[:, k]`` and

    L_k = sum_g (1/B_g) sum_{j=1..B_g} (j/B_g - I_{p_(j)}(alpha_gk, A_g - alpha_gk))^2,   A_g =
    sum_k alpha_gk.

Implementations (``impl=`` or $MEGATRON_DPSL_LOSS_IMPL; "auto" picks the fused one for CUDA
float32/bf16/fp16 when Triton imports): ``dpsl_triton.py`` (one sort + Triton kernels), and the
torch path here (CPU, float64, accelerators without Triton). The torch path (O(num_tokens *
num_experts) memory, no B x B intermediate):
  1. rank (``dpsl_inputs.py``: validation, the row layout; ``ranking.py``: the sorts; ties keep
     token order). CPU: per
     group (tokens selected on the host) and per expert, a stable 1-D sort of the float32 bit
     patterns of the contiguous [E, B] transpose. Accelerators: a branch-free, fixed-shape path (one
     [E, B] sort, or one 1-D int64 key sort (row << 30 | bits) with groups/padding; no host sync).
  2. the Beta CDF from a per-alpha ``BetaCDFTable`` (``beta.py``: <= 1e-10 abs in float64, <= 5e-7
     in float32 against SciPy). CPU: each sorted row is split at the table's junctions with
     searchsorted; the bulk uses the interpolant alone, the few tail points one call of the full
     evaluator.
  3. the gradient is the exact derivative of what is computed: the sort permutation is piecewise
     constant, so dL/dp_(j) = -(2/B) (j/B - F(p_(j))) F'(p_(j)), formed in the forward and scattered
     back through the permutation; the backward only scales it by the incoming gradient.
  NaN, +-inf or values outside [0, 1] in non-padding rows give NaN (F is NaN there); padding rows
  are never read into the loss (not even their NaN).
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from megatron_dpsl.losses import dpsl_triton
from megatron_dpsl.losses.dpsl_inputs import RowLayout, row_layout, table_for
from megatron_dpsl.losses.ranking import rank_dense, ranked_cdf, sort_rows

_CHUNK = 1 << 17  # elements per CPU chunk (measured: fewer, larger ops beat cache-sized ones here)
IMPL_ENV = "MEGATRON_DPSL_LOSS_IMPL"
IMPLS = ("auto", "torch", "triton")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _per_expert_loss_cpu(p: torch.Tensor, inputs: RowLayout, need_grad: bool):
    """CPU path: per group and expert, sort the row and split it at the table's junctions.

    The bulk (usually all points) uses the interpolant alone with Python-scalar constants, a row at
    a time (measured faster here than one [E, B] pass or cache-sized chunks); the few points beyond
    the junctions of all rows go through the full evaluator in one call. Data-dependent slicing is
    free on the host. Returns (loss per expert [E], dL_k/dp [B, E] or None).
    """
    table, num_groups, group_ids = inputs
    per_expert = torch.zeros(p.shape[1], dtype=p.dtype)
    if group_ids is None:
        groups = [(0, None)]
        grad = None
    else:
        groups = [(g, torch.nonzero(group_ids == g).squeeze(1)) for g in range(num_groups)]
        grad = torch.zeros_like(p) if need_grad else None  # padding rows keep 0
    for g, sel in groups:
        pg = p if sel is None else p.index_select(0, sel)
        if pg.shape[0] == 0:
            continue  # empty group: contributes 0
        grad_g = _cpu_group(pg, table, g, per_expert, need_grad)
        if grad_g is not None and sel is None:
            grad = grad_g
        elif grad_g is not None:
            grad.index_copy_(0, sel, grad_g)
    if need_grad and grad is None:  # an empty batch: nothing to sort, zero gradient
        grad = torch.zeros_like(p)
    return per_expert, grad


def _cpu_group(pg: torch.Tensor, table, g: int, per_expert: torch.Tensor, need_grad: bool):
    """One group's tokens ``pg`` ``[n, E]``: adds its loss to ``per_expert`` ``[E]`` and returns
    its dL/dp ``[n, E]`` in token order (None without ``need_grad``)."""
    n, num_experts = pg.shape
    pt = pg.t().contiguous()  # [E, n]: each expert's probabilities contiguous
    gs = torch.empty_like(pt) if need_grad else None  # [E, n] in sorted order
    xs, order = [], []  # per expert: sorted row, its permutation
    scale = -2.0 / n  # dL/dF = -(2/B)(j/B - F)
    ranks = torch.arange(1, n + 1, dtype=pg.dtype) / n  # j / B
    tails = []  # (expert, start, stop) beyond the junctions
    has_nan = torch.isnan(pt).any(1).tolist()  # NaN breaks searchsorted; the row's loss is NaN
    for k in range(num_experts):
        if has_nan[k]:
            per_expert[k] = float("nan")
            xs.append(pt[k])
            order.append(torch.arange(n))
            if need_grad:
                gs[k] = float("nan")
            continue
        x, idx = sort_rows(pt[k])
        xs.append(x)
        order.append(idx)
        gs_k = gs[k] if need_grad else None
        acc, lo, hi = _cpu_bulk(x, table, g * num_experts + k, ranks, scale, gs_k)
        tails += [(k, 0, lo), (k, hi, n)]
        per_expert[k] += acc / n
    tails = [t for t in tails if t[2] > t[1]]
    if tails:
        _cpu_tails(tails, xs, ranks, table, g, per_expert, gs, scale)
    if not need_grad:
        return None
    grad_g = torch.empty_like(pg)  # [n, E], token order: scatter each row through its permutation
    for k in range(num_experts):
        grad_g[:, k].scatter_(0, order[k], gs[k])
    return grad_g


def _cpu_bulk(x, table, r: int, ranks, scale: float, gs_k):
    """Sorted row ``x`` ``[n]`` of table row ``r`` between the junctions: (sum of (j/B - F)^2,
    lo, hi) with ``x[:lo]``, ``x[hi:]`` the tails; writes dL/dx into ``gs_k`` (unless None)."""
    lo = int(torch.searchsorted(x, table.x_lo[r : r + 1]))  # x[:lo] < x_lo: lower tail
    hi = max(lo, int(torch.searchsorted(x, table.x_hi[r : r + 1], right=True)))  # x[hi:] > x_hi
    acc = x.new_zeros(())
    for i0 in range(lo, hi, _CHUNK):
        i1 = min(i0 + _CHUNK, hi)
        f, d = table.evaluate_bulk(x[i0:i1], r, gs_k is not None, scale)
        diff = torch.sub(ranks[i0:i1], f, out=f)  # j/B - F
        if gs_k is not None:
            torch.mul(diff, d, out=gs_k[i0:i1])
        acc = acc + torch.dot(diff, diff)
    return acc, lo, hi


def _cpu_tails(tails, xs, ranks, table, g: int, per_expert, gs, scale: float) -> None:
    """Every tail point of group ``g`` through the full evaluator in one call; adds to
    ``per_expert`` and writes dL/dx into ``gs`` (unless None)."""
    n, num_experts = ranks.shape[0], per_expert.shape[0]
    xt = torch.cat([xs[k][i0:i1] for k, i0, i1 in tails])
    kt = torch.cat([torch.full((i1 - i0,), k, dtype=torch.int64) for k, i0, i1 in tails])
    jt = torch.cat([ranks[i0:i1] for k, i0, i1 in tails])
    f, d = table.evaluate(xt, kt + g * num_experts, gs is not None)
    diff = jt - f
    per_expert.index_add_(0, kt, diff * diff / n)
    if gs is not None:
        pieces = (diff * d * scale).split([i1 - i0 for _, i0, i1 in tails])
        for (k, i0, i1), piece in zip(tails, pieces):
            gs[k, i0:i1] = piece


def _per_expert_loss_device(p: torch.Tensor, inputs: RowLayout, need_grad: bool):
    """Accelerator path: branch-free, fixed shapes (no host sync, CUDA-graph friendly)."""
    table, num_groups, group_ids = inputs
    num_tokens, num_experts = p.shape
    cdt = p.dtype
    if group_ids is None:
        x, idx = rank_dense(p)  # [E, B]
        f, d = table.evaluate(x, need_grad=need_grad)
        inv_n = 1.0 / max(num_tokens, 1)
        ranks = torch.arange(1, num_tokens + 1, dtype=cdt, device=p.device) * inv_n
        diff = ranks - f
        out = diff.square().sum(1) * inv_n
        if not need_grad:
            return out, None
        gs = diff * d * (-2.0 * inv_n)
        return out, torch.empty_like(gs).scatter_(1, idx, gs).t()
    r = ranked_cdf(p, inputs, need_grad)
    diff = r.j / r.n - r.f
    w = torch.where(r.valid, 1.0 / r.n, torch.zeros_like(r.n))
    terms = torch.where(r.valid, diff * diff * w, torch.zeros_like(diff))  # padding never NaN
    out = torch.zeros(num_experts, dtype=cdt, device=p.device).index_add_(0, r.expert, terms)
    if not need_grad:
        return out, None
    gs = torch.where(r.valid, diff * r.d * w * -2.0, torch.zeros_like(diff))
    return out, torch.empty_like(gs).scatter_(0, r.perm, gs).view(num_tokens, num_experts)


class _DPSLPerExpert(torch.autograd.Function):
    """probs [B, E] -> the loss per expert [E] (summed over groups), in the compute dtype.

    The forward also forms dL_k/dp [B, E] (scattered back through the sort permutation: the ranks
    are locally constant, so only F(p) carries gradient); the backward only scales it by
    grad_out[k].
    """

    @staticmethod
    def forward(ctx, probs, inputs: RowLayout, need_grad: bool):
        p = probs.detach().to(inputs.table.dtype)
        need_grad = need_grad and probs.requires_grad
        impl = _per_expert_loss_cpu if p.device.type == "cpu" else _per_expert_loss_device
        out, grad = impl(p, inputs, need_grad)
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.in_dtype = probs.dtype
        return out

    @staticmethod
    @once_differentiable  # the saved dL/dp is a constant: no double backward
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype)).to(ctx.in_dtype), None, None


def _per_expert_or_sum(probs, alpha, group_ids, padding_mask, impl: str | None, reduce: bool):
    table, num_groups = table_for(probs, alpha, group_ids, padding_mask)
    need_grad = torch.is_grad_enabled()
    if selected_impl(probs, impl) == "triton":
        return dpsl_triton.FusedDPSL.apply(
            probs, table, num_groups, group_ids, padding_mask, reduce, need_grad
        )
    out = _DPSLPerExpert.apply(
        probs, row_layout(probs, table, num_groups, group_ids, padding_mask), need_grad
    )
    return out.sum() if reduce else out


def selected_impl(probs: torch.Tensor, impl: str | None = None) -> str:
    """ "triton" or "torch": what ``dpsl_loss(probs, ..., impl=impl)`` runs (``impl``, else
    $MEGATRON_DPSL_LOSS_IMPL, else "auto"; module docstring). Raises ValueError for an unusable
    choice."""
    impl = impl if impl is not None else os.environ.get(IMPL_ENV, "auto")
    if impl not in IMPLS:
        raise ValueError(f"dpsl_loss: impl (or ${IMPL_ENV}) must be one of {IMPLS}, got {impl!r}")
    fusable = probs.dtype in _FUSED_DTYPES and 0 < probs.numel() < 2**31
    if impl == "triton":
        if not dpsl_triton.runs_on(probs.device):
            raise ValueError(
                f"dpsl_loss: impl='triton' needs Triton (pip install triton) and a CUDA device, or "
                f"TRITON_INTERPRET=1 for CPU tensors; got {probs.device}. Use impl='torch'"
            )
        if probs.dtype not in _FUSED_DTYPES:
            raise ValueError(
                f"dpsl_loss: impl='triton' takes float32/bfloat16/float16 probs, got {probs.dtype} "
                f"(float64: impl='torch')"
            )
    elif impl == "auto":
        fusable = fusable and probs.is_cuda and dpsl_triton.runs_on(probs.device)
    return (
        "triton" if impl != "torch" and fusable else "torch"
    )  # an empty batch takes the torch path


def dpsl_loss_per_expert(
    probs: torch.Tensor,
    alpha,
    group_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Eq. 4 (without λ) for each expert: ``[num_experts]``, summed over groups. ``dpsl_loss`` sums
    it.

    Same arguments as ``dpsl_loss``. Output dtype float32 (float64 for float64 ``probs``).
    """
    return _per_expert_or_sum(probs, alpha, group_ids, padding_mask, impl, reduce=False)


def dpsl_loss(
    probs: torch.Tensor,
    alpha: torch.Tensor | float | list,
    group_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Eq. 4 without λ: sum over experts k of (1/B) Σ_j (j/B − F_Beta(p_k,(j); α_k, A−α_k))².

    Args:
        probs: ``[num_tokens, num_experts]`` routing probabilities, any float dtype (computed in
            float32, float64 for float64 input). NaN, +-inf or values outside [0, 1] in non-padding
            rows make the loss NaN (never silently dropped).
        alpha: the Dirichlet prior, all > 0 and finite, in the forms the config takes: a number
            or a one-element list/tensor (the symmetric prior), ``[num_experts]`` (one prior) or
            ``[num_groups, num_experts]`` (one prior per token group). A CPU tensor or a list
            avoids a device-to-host copy (the CDF table is cached per alpha).
        group_ids: ``[num_tokens]`` int in ``[0, num_groups)``, each token's group (required with a
            2-D ``alpha`` of more than one row).
        padding_mask: ``[num_tokens]`` bool, True = padding (excluded, Megatron's convention).
        impl: ``"auto"`` (default; or ``$MEGATRON_DPSL_LOSS_IMPL``): the fused Triton kernels for
            CUDA float32/bf16/fp16 ``probs`` when Triton imports, the torch implementation
            otherwise; ``"triton"`` or ``"torch"`` to force one (module docstring).

    Returns:
        Scalar float32 (float64 for float64 ``probs``); with groups, the sum over groups of Eq. 4
        on each group's tokens alone (B = that group's token count). Empty groups contribute 0.

    Raises:
        ValueError: wrong ranks/shapes/dtypes, ``num_experts`` mismatch, alpha <= 0 or NaN, group id
        out of range (checked on the host for CPU tensors, by a device-side assert elsewhere),
        unknown ``impl``.
    """
    return _per_expert_or_sum(probs, alpha, group_ids, padding_mask, impl, reduce=True)
