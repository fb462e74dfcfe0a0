"""Eq. 4 of the DPSL paper (Cramér–von Mises distance to the Dirichlet marginals), without λ.

Pure tensor math: no process groups, no Megatron. Shapes use Megatron's names:
``probs`` ``[num_tokens, num_experts]``, ``alpha`` ``[num_experts]`` or ``[num_groups, num_experts]``.

For every (group g, expert k) "row", the valid tokens of group g are sorted by ``probs[:, k]`` and

    L_k = sum_g (1/B_g) sum_{j=1..B_g} (j/B_g - I_{p_(j)}(alpha_gk, A_g - alpha_gk))^2,   A_g = sum_k alpha_gk.

Pipeline (O(num_tokens * num_experts) memory, no B x B intermediate):
  1. rank. CPU: per group (tokens selected on the host) and per expert, a stable 1-D sort of the float32
     bit patterns of the contiguous [E, B] transpose (non-negative floats order like their bits and 1-D
     int32 sorts take PyTorch's radix path: ~20 ms for B = 73,728, N = 16 against ~130-200 ms for a float
     sort); float64 uses a stable float sort. Accelerators: a branch-free, fixed-shape path (one [E, B]
     sort, or one 1-D int64 key sort (row << 30 | bits) with groups/padding; no host sync).
     Ties keep token order (stable sorts), so ranks and gradients are deterministic.
  2. the Beta CDF from a per-alpha ``BetaCDFTable`` (``beta.py``: <= 1e-10 abs in float64, <= 5e-7 in
     float32 against SciPy). CPU: each sorted row is split at the table's junctions with searchsorted;
     the bulk uses the interpolant alone, the few tail points one call of the full evaluator.
  3. the gradient is the exact derivative of what is computed: the sort permutation is piecewise
     constant, so dL/dp_(j) = -(2/B) (j/B - F(p_(j))) F'(p_(j)), formed in the forward and scattered back
     through the permutation; the backward only scales it by the incoming gradient.
  NaN, +-inf or values outside [0, 1] in non-padding rows give NaN (F is NaN there); padding rows are
  never read into the loss (not even their NaN).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from megatron_dpsl.beta import BetaCDFTable, beta_cdf_table

_CHUNK = 1 << 17  # elements per CPU chunk (measured: fewer, larger ops beat cache-sized ones here)
_VALUE_BITS = 30  # float32 bit patterns of [0, 1] are < 2**30 (1.0 == 0x3F800000)
_MAX_BITS = 0x3F800001  # key for anything above 1.0 (+inf, NaN): F is NaN or 1 there, order is irrelevant


def _check_inputs(probs, alpha, group_ids, padding_mask):
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"dpsl_loss: probs must be a float tensor [num_tokens, num_experts], got {shape}")
    num_tokens, num_experts = probs.shape
    if alpha.dim() not in (1, 2) or alpha.shape[-1] != num_experts or alpha.numel() == 0:
        raise ValueError(
            f"dpsl_loss: alpha must be [num_experts] or [num_groups, num_experts] with num_experts={num_experts} "
            f"(probs.shape[1]), got shape {tuple(alpha.shape)}"
        )
    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor) or group_ids.shape != (num_tokens,) or group_ids.is_floating_point():
            got = f"{group_ids.dtype} {tuple(group_ids.shape)}" if isinstance(group_ids, torch.Tensor) else group_ids
            raise ValueError(f"dpsl_loss: group_ids must be an integer tensor of shape [{num_tokens}], got {got}")
    if padding_mask is not None:
        if not isinstance(padding_mask, torch.Tensor) or padding_mask.shape != (num_tokens,) or padding_mask.dtype != torch.bool:
            got = (
                f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
                if isinstance(padding_mask, torch.Tensor)
                else padding_mask
            )
            raise ValueError(
                f"dpsl_loss: padding_mask must be a bool tensor of shape [{num_tokens}] (True = padding), got {got}"
            )


def _alpha_2d(alpha, num_experts: int) -> torch.Tensor:
    """alpha as a float64 CPU [num_groups, num_experts], validated (> 0, finite)."""
    alpha = torch.as_tensor(alpha).detach()
    a = alpha.double().cpu()
    if not bool(torch.isfinite(a).all()) or not bool((a > 0).all()):
        raise ValueError(f"dpsl_loss: alpha must be finite and > 0, got {a.tolist()}")
    return a.reshape(-1, num_experts)


def _table_for(alpha2d: torch.Tensor, dtype: torch.dtype, device) -> BetaCDFTable:
    """Rows r = g * num_experts + k with (a, b) = (alpha_gk, A_g - alpha_gk)."""
    a = alpha2d
    b = a.sum(-1, keepdim=True) - a
    return beta_cdf_table(a.reshape(-1), b.reshape(-1), dtype, device)


# ----------------------------------------------------------------------------------------------------
# Ranking: which (row, rank j, group size n) every probability gets.
# ----------------------------------------------------------------------------------------------------


def _rank_dense(p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """No groups, no padding (accelerator path). p ``[T, E]`` -> (sorted ``[E, T]``, token index ``[E, T]``)."""
    pt = p.t().contiguous()  # [E, T]: each expert's column becomes a contiguous row
    if pt.dtype == torch.float32:
        vals, idx = torch.sort(pt.view(torch.int32), dim=-1, stable=True)  # bit patterns: see _sort_row
        return vals.view(torch.float32), idx
    return torch.sort(pt, dim=-1, stable=True)


def _rank_ragged(p: torch.Tensor, group_ids: torch.Tensor, num_groups: int):
    """Groups and/or padding (group id ``num_groups`` = padding, ranked last and weighted 0).

    Returns flat ``[T * E]`` tensors: sorted values, flat index into ``p`` (row-major [T, E]), row id
    (g * E + k; >= num_groups * E for padding), rank j (1-based, float), group size n (float).
    """
    num_tokens, num_experts = p.shape
    dev = p.device
    counts = torch.zeros(num_groups + 1, dtype=torch.int64, device=dev)
    counts.index_add_(0, group_ids, torch.ones_like(group_ids))  # no host sync (unlike bincount)
    expert = torch.arange(num_experts, device=dev)
    row_te = group_ids[:, None] * num_experts + expert  # [T, E]
    if p.dtype == torch.float32:
        bits = p.view(torch.int32).clamp(0, _MAX_BITS).long()
        key = (row_te << _VALUE_BITS) | bits
        skey, perm = torch.sort(key.reshape(-1), stable=True)
        row = skey >> _VALUE_BITS
    else:
        # float64: (value, then group) per expert with two stable sorts, laid out expert-major
        vals, order = torch.sort(p.t(), dim=-1, stable=True)  # [E, T]
        g_sorted, order2 = torch.sort(group_ids[order], dim=-1, stable=True)
        order = torch.gather(order, -1, order2)
        perm = (order * num_experts + expert[:, None]).reshape(-1)
        row = (g_sorted * num_experts + expert[:, None]).reshape(-1)
    x = p.reshape(-1)[perm]
    # Start of every row in this layout. Rows appear in increasing row id; with the float64 layout each
    # expert's rows are contiguous, so the start of row (g, k) inside the flat order is computed the same
    # way from the row sizes in that order.
    n_row = counts.repeat_interleave(num_experts) if p.dtype == torch.float32 else None
    if n_row is not None:  # row-major over (g, k): row sizes counts[g]
        start = torch.cumsum(n_row, 0) - n_row
        size = n_row
    else:  # expert-major: row (g, k) starts at k * T + sum_{g' < g} counts[g']
        g_start = torch.cumsum(counts, 0) - counts  # [G + 1]
        start = (expert[None, :] * num_tokens + g_start[:, None]).reshape(-1)  # indexed by g * E + k
        size = counts.repeat_interleave(num_experts)
    pos = torch.arange(perm.numel(), device=dev)
    j = (pos - start[row] + 1).to(x.dtype)
    n = size[row].to(x.dtype)
    return x, perm, row, j, n


# ----------------------------------------------------------------------------------------------------
# Eq. 4 per expert, with its exact gradient.
# ----------------------------------------------------------------------------------------------------


def _sort_row(row: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stable ascending sort of one contiguous row of probabilities: (values, token index)."""
    if row.dtype == torch.float32:
        # Non-negative float32 values order like their int32 bit patterns (negative values and NaN give
        # NaN in the CDF, so their position does not matter); 1-D int sorts take the CPU radix path.
        vals, idx = torch.sort(row.view(torch.int32), stable=True)
        return vals.view(torch.float32), idx
    return torch.sort(row, stable=True)


def _eq4_cpu(p: torch.Tensor, table: BetaCDFTable, num_groups: int, group_ids, need_grad: bool):
    """CPU path: per group and expert, sort the row and split it at the table's junctions.

    The bulk (usually all points) uses the interpolant alone with Python-scalar constants, a row at a
    time (measured faster here than one [E, B] pass or cache-sized chunks); the few points beyond the
    junctions of all rows go through the full evaluator in one call. Data-dependent slicing is free on
    the host. Returns (loss per expert [E], dL_k/dp [T, E] or None).
    """
    num_tokens, num_experts = p.shape
    cdt = p.dtype
    per_expert = torch.zeros(num_experts, dtype=cdt)
    if group_ids is None:
        groups = [(0, None)]
        grad = None
    else:
        groups = [(g, torch.nonzero(group_ids == g).squeeze(1)) for g in range(num_groups)]
        grad = torch.zeros_like(p) if need_grad else None  # padding rows keep 0
    for g, sel in groups:
        pg = p if sel is None else p.index_select(0, sel)
        n = pg.shape[0]
        if n == 0:
            continue  # empty group: contributes 0
        pt = pg.t().contiguous()  # [E, n]: each expert's probabilities contiguous
        gs = torch.empty_like(pt) if need_grad else None  # [E, n] in sorted order
        xs, order = [], []  # per expert: sorted row, its permutation
        scale = -2.0 / n  # dL/dF = -(2/B)(j/B - F)
        ranks = torch.arange(1, n + 1, dtype=cdt) / n  # j / B
        tails = []  # (expert, start, stop) beyond the junctions
        has_nan = torch.isnan(pt).any(1).tolist()  # NaN breaks searchsorted; the row's loss is NaN anyway
        for k in range(num_experts):
            r = g * num_experts + k
            if has_nan[k]:
                per_expert[k] = float("nan")
                xs.append(pt[k])
                order.append(torch.arange(n))
                if need_grad:
                    gs[k] = float("nan")
                continue
            x, idx = _sort_row(pt[k])
            xs.append(x)
            order.append(idx)
            lo = int(torch.searchsorted(x, table.x_lo[r : r + 1]))  # x[:lo] < x_lo: lower tail
            hi = max(lo, int(torch.searchsorted(x, table.x_hi[r : r + 1], right=True)))  # x[hi:] > x_hi
            tails += [(k, 0, lo), (k, hi, n)]
            acc = p.new_zeros(())
            for i0 in range(lo, hi, _CHUNK):
                i1 = min(i0 + _CHUNK, hi)
                f, d = table.evaluate_bulk(x[i0:i1], r, need_grad, scale)
                diff = torch.sub(ranks[i0:i1], f, out=f)  # j/B - F
                if need_grad:
                    torch.mul(diff, d, out=gs[k, i0:i1])
                acc = acc + torch.dot(diff, diff)
            per_expert[k] += acc / n
        tails = [t for t in tails if t[2] > t[1]]
        if tails:
            xt = torch.cat([xs[k][i0:i1] for k, i0, i1 in tails])
            kt = torch.cat([torch.full((i1 - i0,), k, dtype=torch.int64) for k, i0, i1 in tails])
            jt = torch.cat([ranks[i0:i1] for k, i0, i1 in tails])
            f, d = table.evaluate(xt, kt + g * num_experts, need_grad)
            diff = jt - f
            per_expert.index_add_(0, kt, diff * diff / n)
            if need_grad:
                pieces = (diff * d * scale).split([i1 - i0 for _, i0, i1 in tails])
                for (k, i0, i1), piece in zip(tails, pieces):
                    gs[k, i0:i1] = piece
        if need_grad:
            grad_g = torch.empty_like(pg)  # [n, E], token order: scatter each row through its permutation
            for k in range(num_experts):
                grad_g[:, k].scatter_(0, order[k], gs[k])
            if sel is None:
                grad = grad_g
            else:
                grad.index_copy_(0, sel, grad_g)
    if need_grad and grad is None:  # an empty batch: nothing to sort, zero gradient
        grad = torch.zeros_like(p)
    return per_expert, grad


def _eq4_device(p: torch.Tensor, table: BetaCDFTable, num_groups: int, group_ids, need_grad: bool):
    """Accelerator path: branch-free, fixed shapes (no host sync, CUDA-graph friendly)."""
    num_tokens, num_experts = p.shape
    cdt = p.dtype
    if group_ids is None:
        x, idx = _rank_dense(p)  # [E, T]
        f, d = table.evaluate(x, need_grad=need_grad)
        inv_n = 1.0 / max(num_tokens, 1)
        ranks = torch.arange(1, num_tokens + 1, dtype=cdt, device=p.device) * inv_n
        diff = ranks - f
        out = diff.square().sum(1) * inv_n
        if not need_grad:
            return out, None
        gs = diff * d * (-2.0 * inv_n)
        return out, torch.empty_like(gs).scatter_(1, idx, gs).t()
    x, perm, row, j, n = _rank_ragged(p, group_ids, num_groups)
    num_rows = num_groups * num_experts
    valid = row < num_rows
    f, d = table.evaluate(x, row.clamp(max=num_rows - 1), need_grad=need_grad)
    n = n.clamp(min=1.0)
    diff = j / n - f
    w = torch.where(valid, 1.0 / n, torch.zeros_like(n))
    terms = torch.where(valid, diff * diff * w, torch.zeros_like(diff))  # padding never NaN
    out = torch.zeros(num_experts, dtype=cdt, device=p.device).index_add_(0, row % num_experts, terms)
    if not need_grad:
        return out, None
    gs = torch.where(valid, diff * d * w * -2.0, torch.zeros_like(diff))
    return out, torch.empty_like(gs).scatter_(0, perm, gs).view(num_tokens, num_experts)


class _DPSLPerExpert(torch.autograd.Function):
    """probs [T, E] -> Eq. 4 per expert [E] (summed over groups), in the compute dtype.

    The forward also forms dL_k/dp [T, E] (scattered back through the sort permutation: the ranks are
    locally constant, so only F(p) carries gradient); the backward only scales it by grad_out[k].
    """

    @staticmethod
    def forward(ctx, probs, table: BetaCDFTable, num_groups: int, group_ids, need_grad: bool):
        p = probs.detach().to(table.dtype)
        need_grad = need_grad and probs.requires_grad
        impl = _eq4_cpu if p.device.type == "cpu" else _eq4_device
        out, grad = impl(p, table, num_groups, group_ids, need_grad)
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.in_dtype = probs.dtype
        return out

    @staticmethod
    @once_differentiable  # the saved dL/dp is a constant: no double backward
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype)).to(ctx.in_dtype), None, None, None, None


def _prepare(probs, alpha, group_ids, padding_mask):
    """Validate, build/lookup the table; returns (probs, table, num_groups, group ids or None)."""
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
    _check_inputs(probs, alpha, group_ids, padding_mask)
    num_tokens, num_experts = probs.shape
    alpha2d = _alpha_2d(alpha, num_experts)
    num_groups = alpha2d.shape[0]
    if num_groups > 1 and group_ids is None:
        raise ValueError(
            f"dpsl_loss: alpha has {num_groups} rows (one prior per token group); pass group_ids [{num_tokens}]"
        )
    if group_ids is not None:
        group_ids = group_ids.to(device=probs.device, dtype=torch.int64)
        bad = (group_ids < 0) | (group_ids >= num_groups)
        if group_ids.device.type == "cpu":
            if bool(bad.any()):
                raise ValueError(
                    f"dpsl_loss: group_ids must lie in [0, {num_groups}) (alpha has {num_groups} rows), "
                    f"got values {sorted(set(group_ids[bad].tolist()))[:8]}"
                )
        else:  # no host sync on accelerators: device-side assert
            torch._assert_async(~bad.any(), "dpsl_loss: group_ids out of range [0, num_groups)")
    if padding_mask is not None:
        padding_mask = padding_mask.to(probs.device)
        base = group_ids if group_ids is not None else torch.zeros(num_tokens, dtype=torch.int64, device=probs.device)
        group_ids = torch.where(padding_mask, num_groups, base)
    elif group_ids is not None and num_groups == 1:
        group_ids = None  # a single group and no padding: the dense path
    cdt = torch.float64 if probs.dtype == torch.float64 else torch.float32
    table = _table_for(alpha2d, cdt, probs.device)
    return table, num_groups, group_ids


def dpsl_loss_per_expert(
    probs: torch.Tensor,
    alpha,
    group_ids: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eq. 4 (without λ) for each expert: ``[num_experts]``, summed over groups. ``dpsl_loss`` sums it.

    Same arguments as ``dpsl_loss``. Output dtype float32 (float64 for float64 ``probs``).
    """
    table, num_groups, gids = _prepare(probs, alpha, group_ids, padding_mask)
    return _DPSLPerExpert.apply(probs, table, num_groups, gids, torch.is_grad_enabled())


def dpsl_loss(
    probs: torch.Tensor,
    alpha: torch.Tensor,
    group_ids: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eq. 4 without λ: sum over experts k of (1/B) Σ_j (j/B − F_Beta(p_k,(j); α_k, A−α_k))².

    Args:
        probs: ``[num_tokens, num_experts]`` routing probabilities, any float dtype (computed in float32,
            float64 for float64 input). NaN, +-inf or values outside [0, 1] in non-padding rows make the
            loss NaN (never silently dropped).
        alpha: ``[num_experts]`` (one prior) or ``[num_groups, num_experts]`` (one prior per token group),
            all > 0. A CPU tensor or a list avoids a device-to-host copy (the CDF table is cached per alpha).
        group_ids: ``[num_tokens]`` int in ``[0, num_groups)``, each token's group (required with a 2-D
            ``alpha`` of more than one row).
        padding_mask: ``[num_tokens]`` bool, True = padding (excluded, Megatron's convention).

    Returns:
        Scalar float32 (float64 for float64 ``probs``); with groups, the sum over groups of Eq. 4
        on each group's tokens alone (B = that group's token count). Empty groups contribute 0.

    Raises:
        ValueError: wrong ranks/shapes/dtypes, ``num_experts`` mismatch, alpha <= 0 or NaN, group id out of
        range (checked on the host for CPU tensors, by a device-side assert elsewhere).
    """
    return dpsl_loss_per_expert(probs, alpha, group_ids, padding_mask).sum()
