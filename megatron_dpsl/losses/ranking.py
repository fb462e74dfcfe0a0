"""Eq. 4's rows and ranks: validated inputs -> sorted rows -> the Beta CDF at every ranked point.

Shared by the loss (``loss.py``) and the diagnostics (``metrics.py``). Pure tensor math:
no process groups, no Megatron. ``probs`` is ``[num_tokens, num_experts]`` (T x E).

A *row* is one (group g, expert k) pair, id ``r = g * E + k``; its table row has (a, b) = (alpha_gk,
A_g - alpha_gk). Padding tokens get the group id ``num_groups``: their rows (``r >= num_groups *
E``) are ranked after every valid row and weighted 0. Every point of a row gets its 1-based rank j
among the row's tokens (ties in token order: stable sorts, so results are deterministic) and the
row's size n.

Sorting float32 probabilities: non-negative float32 values order like their int32 bit patterns
(negative values and NaN give NaN in the CDF, so their position does not matter), and integer sorts
take PyTorch's radix path (CPU: ~20 ms for 16 rows of 73,728 against ~130-200 ms for a float sort).
float64 keeps a stable float sort.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from megatron_dpsl.losses.beta import BetaCDFTable, beta_cdf_table

VALUE_BITS = 30  # float32 bit patterns of [0, 1] are < 2**30 (1.0 == 0x3F800000)
MAX_BITS = (
    0x3F800001  # key for anything above 1.0 (+inf, NaN): F is NaN or 1 there, order is irrelevant
)


class Eq4Inputs(NamedTuple):
    """What ``prepare`` returns: the table, the group count and the tokens' row layout."""

    table: BetaCDFTable  # rows g * E + k, evaluation dtype float32 (float64 for float64 probs)
    num_groups: int  # rows of alpha
    group_ids: (
        torch.Tensor | None
    )  # [T] int64 in [0, num_groups] (num_groups = padding); None: 1 group, no padding


def _check_inputs(probs, alpha, group_ids, padding_mask):
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(
            f"dpsl_loss: probs must be a float tensor [num_tokens, num_experts], got {shape}"
        )
    num_tokens, num_experts = probs.shape
    if alpha.dim() not in (1, 2) or alpha.shape[-1] != num_experts or alpha.numel() == 0:
        raise ValueError(
            "dpsl_loss: alpha must be [num_experts] or [num_groups, num_experts] with "
            f"num_experts={num_experts} "
            f"(probs.shape[1]), got shape {tuple(alpha.shape)}"
        )
    if group_ids is not None:
        if (
            not isinstance(group_ids, torch.Tensor)
            or group_ids.shape != (num_tokens,)
            or group_ids.is_floating_point()
        ):
            got = (
                f"{group_ids.dtype} {tuple(group_ids.shape)}"
                if isinstance(group_ids, torch.Tensor)
                else group_ids
            )
            raise ValueError(
                f"dpsl_loss: group_ids must be an integer tensor of shape [{num_tokens}], got {got}"
            )
    if padding_mask is not None:
        if (
            not isinstance(padding_mask, torch.Tensor)
            or padding_mask.shape != (num_tokens,)
            or padding_mask.dtype != torch.bool
        ):
            got = (
                f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
                if isinstance(padding_mask, torch.Tensor)
                else padding_mask
            )
            raise ValueError(
                f"dpsl_loss: padding_mask must be a bool tensor of shape [{num_tokens}] (True "
                f"= padding), got {got}"
            )


def _alpha_2d(alpha, num_experts: int) -> torch.Tensor:
    """alpha as a float64 CPU [num_groups, num_experts], validated (> 0, finite)."""
    alpha = torch.as_tensor(alpha).detach()
    a = alpha.double().cpu()
    if not bool(torch.isfinite(a).all()) or not bool((a > 0).all()):
        raise ValueError(f"dpsl_loss: alpha must be finite and > 0, got {a.tolist()}")
    return a.reshape(-1, num_experts)


def table_for(probs, alpha, group_ids=None, padding_mask=None) -> tuple[BetaCDFTable, int]:
    """Validate ``dpsl_loss``'s arguments and return (the cached CDF table, num_groups).

    Args: as ``dpsl_loss``. Checks types, shapes and alpha's values; not the group-id values (each
    implementation checks those without a host sync). The table's rows are g * E + k.
    """
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
    _check_inputs(probs, alpha, group_ids, padding_mask)
    num_tokens, num_experts = probs.shape
    cdt = torch.float64 if probs.dtype == torch.float64 else torch.float32
    # alpha's values key the cache: read on the host (free for a CPU alpha), no device work per call
    table, num_groups = _cached_table(
        tuple(alpha.reshape(-1).tolist()), num_experts, cdt, probs.device
    )
    if num_groups > 1 and group_ids is None:
        raise ValueError(
            f"dpsl_loss: alpha has {num_groups} rows (one prior per token group); pass "
            f"group_ids [{num_tokens}]"
        )
    return table, num_groups


# A bounded memo of immutable tables (like beta.beta_cdf_table's), not state: the result never
# depends on whether it was cached. Errors are not cached, so invalid alpha raises on every call.
@functools.lru_cache(maxsize=16)
def _cached_table(values: tuple, num_experts: int, dtype: torch.dtype, device: torch.device):
    alpha2d = _alpha_2d(torch.tensor(values, dtype=torch.float64), num_experts)
    b = alpha2d.sum(-1, keepdim=True) - alpha2d
    return beta_cdf_table(alpha2d.reshape(-1), b.reshape(-1), dtype, device), alpha2d.shape[0]


def prepare(probs, alpha, group_ids=None, padding_mask=None) -> Eq4Inputs:
    """``table_for`` plus the tokens' row layout (``row_layout``): what the torch implementation
    takes."""
    table, num_groups = table_for(probs, alpha, group_ids, padding_mask)
    return row_layout(probs, table, num_groups, group_ids, padding_mask)


def row_layout(probs, table, num_groups: int, group_ids, padding_mask) -> Eq4Inputs:
    """Checked, merged group ids for ``table_for``'s validated arguments.

    Group ids are range-checked on the host for CPU tensors, by a device-side assert elsewhere (no
    host sync). With padding, padded tokens get group ``num_groups``; a single group without padding
    returns ``group_ids=None`` (the dense layout).
    """
    num_tokens = probs.shape[0]
    if group_ids is not None:
        group_ids = group_ids.to(device=probs.device, dtype=torch.int64)
        bad = (group_ids < 0) | (group_ids >= num_groups)
        if group_ids.device.type == "cpu":
            if bool(bad.any()):
                raise ValueError(
                    f"dpsl_loss: group_ids must lie in [0, {num_groups}) (alpha has "
                    f"{num_groups} rows), "
                    f"got values {sorted(set(group_ids[bad].tolist()))[:8]}"
                )
        else:  # no host sync on accelerators: device-side assert
            torch._assert_async(~bad.any(), "dpsl_loss: group_ids out of range [0, num_groups)")
    if padding_mask is not None:
        padding_mask = padding_mask.to(probs.device)
        base = (
            group_ids
            if group_ids is not None
            else torch.zeros(num_tokens, dtype=torch.int64, device=probs.device)
        )
        group_ids = torch.where(padding_mask, num_groups, base)
    elif group_ids is not None and num_groups == 1:
        group_ids = None  # a single group and no padding: the dense path
    return Eq4Inputs(table, num_groups, group_ids)


def sort_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable ascending sort along the last dim of contiguous probabilities: (values, index)."""
    if x.dtype == torch.float32:
        vals, idx = torch.sort(
            x.view(torch.int32), dim=-1, stable=True
        )  # bit patterns: module docstring
        return vals.view(torch.float32), idx
    return torch.sort(x, dim=-1, stable=True)


def rank_dense(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """No groups, no padding. p ``[T, E]`` -> (sorted ``[E, T]``, token index ``[E, T]``); rank j =
    column + 1."""
    return sort_rows(p.t().contiguous())  # each expert's column becomes a contiguous row


class Ranked(NamedTuple):
    """Every element of ``probs`` in row-sorted order, flat ``[T * E]`` each."""

    x: torch.Tensor  # sorted values
    perm: torch.Tensor  # flat index into probs (row-major [T, E])
    row: torch.Tensor  # g * E + k; >= num_groups * E for padding
    j: torch.Tensor  # rank, 1-based, float
    n: torch.Tensor  # size of the point's row, float


def rank_ragged(p: torch.Tensor, group_ids: torch.Tensor, num_groups: int) -> Ranked:
    """Groups and/or padding: one sort for all rows, no host sync (fixed shapes).

    float32: one stable 1-D sort of the int64 key ``row << 30 | bits`` (rows in increasing id).
    float64: per expert, a stable value sort then a stable group sort (each expert's rows
    contiguous).
    """
    num_tokens, num_experts = p.shape
    dev = p.device
    counts = torch.zeros(num_groups + 1, dtype=torch.int64, device=dev)
    counts.index_add_(0, group_ids, torch.ones_like(group_ids))  # no host sync (unlike bincount)
    expert = torch.arange(num_experts, device=dev)
    if p.dtype == torch.float32:
        row_te = group_ids[:, None] * num_experts + expert  # [T, E]
        bits = p.view(torch.int32).clamp(0, MAX_BITS).long()
        skey, perm = torch.sort(((row_te << VALUE_BITS) | bits).reshape(-1), stable=True)
        row = skey >> VALUE_BITS
        size = counts.repeat_interleave(num_experts)  # row-major over (g, k): row sizes counts[g]
        start = torch.cumsum(size, 0) - size
    else:
        vals, order = torch.sort(p.t(), dim=-1, stable=True)  # [E, T]
        g_sorted, order2 = torch.sort(group_ids[order], dim=-1, stable=True)
        order = torch.gather(order, -1, order2)
        perm = (order * num_experts + expert[:, None]).reshape(-1)
        row = (g_sorted * num_experts + expert[:, None]).reshape(-1)
        # expert-major: row (g, k) starts at k * T + sum_{g' < g} counts[g']
        g_start = torch.cumsum(counts, 0) - counts  # [G + 1]
        start = (expert[None, :] * num_tokens + g_start[:, None]).reshape(
            -1
        )  # indexed by g * E + k
        size = counts.repeat_interleave(num_experts)
    x = p.reshape(-1)[perm]
    pos = torch.arange(perm.numel(), device=dev)
    j = (pos - start[row] + 1).to(x.dtype)
    return Ranked(x, perm, row, j, size[row].to(x.dtype))


class RankedCDF(NamedTuple):
    """``rank_ragged``'s points with the Beta CDF of their row, flat ``[T * E]`` each."""

    perm: torch.Tensor  # flat index into probs
    expert: torch.Tensor  # k
    valid: torch.Tensor  # False for padding
    j: torch.Tensor  # rank, 1-based
    n: torch.Tensor  # row size, clamped to >= 1
    f: torch.Tensor  # F(x) of the row's Beta
    d: torch.Tensor | None  # dF/dx (None unless need_grad)


def ranked_cdf(p: torch.Tensor, inputs: Eq4Inputs, need_grad: bool) -> RankedCDF:
    """Rank ``p`` ``[T, E]`` (already in ``inputs.table.dtype``) by row and evaluate F at every
    point.

    ``inputs.group_ids`` None means one group without padding. Padding points are evaluated with the
    last valid row's constants (any value, NaN included): callers mask them with ``valid``.
    """
    table, num_groups, group_ids = inputs
    num_experts = p.shape[1]
    if group_ids is None:
        group_ids = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
    x, perm, row, j, n = rank_ragged(p, group_ids, num_groups)
    num_rows = num_groups * num_experts
    f, d = table.evaluate(x, row.clamp(max=num_rows - 1), need_grad=need_grad)
    return RankedCDF(perm, row % num_experts, row < num_rows, j, n.clamp(min=1.0), f, d)
