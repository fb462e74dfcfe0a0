"""The DPSL loss's arguments: checks, the cached Beta CDF table, and the tokens' row layout.

Shared by the loss (``dpsl.py``, ``dpsl_triton.py``) and the diagnostics (``metrics/routing.py``).
Pure tensor math: no process groups, no Megatron. Shapes: B tokens, E experts, G groups;
``probs`` is ``[B, E]``, ``alpha`` ``[E]`` or ``[G, E]``.

A *row* is one (group g, expert k) pair, id ``r = g * E + k``; its table row has (a, b) = (alpha_gk,
A_g - alpha_gk). Padding tokens get the group id ``G``: their rows (``r >= G * E``) are ranked after
every valid row and weighted 0 (``ranking.py``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from megatron_dpsl.losses.beta import BetaCDFTable, beta_cdf_table


class RowLayout(NamedTuple):
    """What ``prepare`` returns: the table, the group count and the tokens' row layout."""

    table: BetaCDFTable  # rows g * E + k, evaluation dtype float32 (float64 for float64 probs)
    num_groups: int  # rows of alpha
    group_ids: (
        torch.Tensor | None
    )  # [B] int64 in [0, num_groups] (num_groups = padding); None: 1 group, no padding


def _check_inputs(probs, alpha, group_ids, padding_mask):
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(
            f"dpsl_loss: probs must be a float tensor [num_tokens, num_experts], got {shape}"
        )
    num_tokens, num_experts = probs.shape
    if num_experts < 2:  # one expert: p = 1 always, and Beta(α, A - α) has A - α = 0
        raise ValueError(
            f"dpsl_loss: probs needs num_experts >= 2 (the prior's marginals are degenerate with "
            f"one expert), got shape {tuple(probs.shape)}"
        )
    if alpha.dim() not in (1, 2) or alpha.shape[-1] != num_experts or alpha.numel() == 0:
        raise ValueError(
            f"dpsl_loss: alpha must be {_ALPHA_FORMS} with num_experts={num_experts} "
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
                f"dpsl_loss: padding_mask must be a bool tensor of shape [{num_tokens}] (True = "
                f"padding), got {got}"
            )


_ALPHA_FORMS = (
    "a number or one-element list (the symmetric prior), [num_experts] numbers, or "
    "[num_groups, num_experts] numbers"
)


def _as_alpha(alpha, probs) -> torch.Tensor:
    """``alpha`` as a tensor, in the forms the config takes: a number or a one-element list/tensor
    is the symmetric prior ``[E]``; ``[E]`` and ``[G, E]`` pass through."""
    if isinstance(alpha, bool):
        raise ValueError(f"dpsl_loss: alpha must be {_ALPHA_FORMS}, got {alpha!r}")
    if not isinstance(alpha, torch.Tensor):
        try:
            alpha = torch.as_tensor(alpha, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"dpsl_loss: alpha must be {_ALPHA_FORMS}, got {alpha!r}") from None
    if alpha.dtype == torch.bool or alpha.is_complex():
        raise ValueError(f"dpsl_loss: alpha must be {_ALPHA_FORMS} (real), got {alpha.dtype}")
    if alpha.dim() <= 1 and alpha.numel() == 1 and isinstance(probs, torch.Tensor):
        if probs.dim() == 2:
            alpha = alpha.reshape(1).expand(probs.shape[1])
    return alpha


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
    alpha = _as_alpha(alpha, probs)
    _check_inputs(probs, alpha, group_ids, padding_mask)
    num_tokens, num_experts = probs.shape
    cdt = torch.float64 if probs.dtype == torch.float64 else torch.float32
    # alpha's values key the cache: read on the host (free for a CPU alpha), no device work per call
    table, num_groups = _cached_table(
        tuple(alpha.reshape(-1).tolist()), num_experts, cdt, probs.device
    )
    if num_groups > 1 and group_ids is None:
        raise ValueError(
            f"dpsl_loss: alpha has {num_groups} rows (one prior per token group); pass group_ids "
            f"[{num_tokens}]"
        )
    return table, num_groups


# A bounded memo of immutable tables (like beta.beta_cdf_table's), not state: the result never
# depends on whether it was cached. Errors are not cached, so invalid alpha raises on every call.
@functools.lru_cache(maxsize=16)
def _cached_table(values: tuple, num_experts: int, dtype: torch.dtype, device: torch.device):
    alpha2d = _alpha_2d(torch.tensor(values, dtype=torch.float64), num_experts)
    b = alpha2d.sum(-1, keepdim=True) - alpha2d
    return beta_cdf_table(alpha2d.reshape(-1), b.reshape(-1), dtype, device), alpha2d.shape[0]


def prepare(probs, alpha, group_ids=None, padding_mask=None) -> RowLayout:
    """``table_for`` plus the tokens' row layout (``row_layout``): what the torch implementation
    takes."""
    table, num_groups = table_for(probs, alpha, group_ids, padding_mask)
    return row_layout(probs, table, num_groups, group_ids, padding_mask)


def row_layout(probs, table, num_groups: int, group_ids, padding_mask) -> RowLayout:
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
                    f"dpsl_loss: group_ids must lie in [0, {num_groups}) (alpha has {num_groups} "
                    "rows), "
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
    return RowLayout(table, num_groups, group_ids)
