"""Eq. 4 of the DPSL paper (Cramér–von Mises distance to the Dirichlet marginals), without λ.

Pure tensor math: no process groups, no Megatron. Shapes use Megatron's names:
``probs`` ``[num_tokens, num_experts]``, ``alpha`` ``[num_experts]`` or ``[num_groups, num_experts]``.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_dpsl.beta import beta_cdf


def _check_inputs(probs, alpha, group_ids, padding_mask):
    if probs.dim() != 2:
        raise ValueError(f"dpsl_loss: probs must be [num_tokens, num_experts], got shape {tuple(probs.shape)}")
    num_tokens, num_experts = probs.shape
    if alpha.dim() not in (1, 2) or alpha.shape[-1] != num_experts:
        raise ValueError(
            f"dpsl_loss: alpha must be [num_experts] or [num_groups, num_experts] with num_experts={num_experts}, "
            f"got shape {tuple(alpha.shape)}"
        )
    if group_ids is not None:
        if group_ids.shape != (num_tokens,) or group_ids.is_floating_point():
            raise ValueError(
                f"dpsl_loss: group_ids must be an integer tensor of shape [{num_tokens}], "
                f"got {group_ids.dtype} {tuple(group_ids.shape)}"
            )
    if padding_mask is not None and (padding_mask.shape != (num_tokens,) or padding_mask.dtype != torch.bool):
        raise ValueError(
            f"dpsl_loss: padding_mask must be a bool tensor of shape [{num_tokens}] (True = padding), "
            f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )


def dpsl_loss(
    probs: torch.Tensor,
    alpha: torch.Tensor,
    group_ids: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eq. 4 without λ: sum over experts k of (1/B) Σ_j (j/B − F_Beta(p_k,(j); α_k, A−α_k))².

    Args:
        probs: ``[num_tokens, num_experts]`` routing probabilities, any float dtype.
        alpha: ``[num_experts]`` (one prior) or ``[num_groups, num_experts]`` (one prior per token group).
        group_ids: ``[num_tokens]`` int, each token's group (required with a 2-D ``alpha``).
        padding_mask: ``[num_tokens]`` bool, True = padding (excluded).

    Returns:
        Scalar float32 (float64 for float64 ``probs``); with groups, the sum over groups of Eq. 4
        on each group's tokens alone. Empty groups contribute 0.
    """
    alpha = torch.as_tensor(alpha, device=probs.device)
    _check_inputs(probs, alpha, group_ids, padding_mask)
    out_dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    compute_dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    num_tokens, num_experts = probs.shape
    alpha2d = alpha.double().reshape(-1, num_experts)  # [num_groups, num_experts]
    num_groups = alpha2d.shape[0]
    if num_groups > 1 and group_ids is None:
        raise ValueError("dpsl_loss: alpha has one row per token group; pass group_ids")
    if group_ids is None:
        group_ids = torch.zeros(num_tokens, dtype=torch.long, device=probs.device)
    group_ids = group_ids.long()
    if padding_mask is not None:
        # padding goes to a dummy group past the last real one; it contributes nothing
        group_ids = torch.where(padding_mask, torch.full_like(group_ids, num_groups), group_ids)

    p = probs.to(compute_dtype).t()  # [num_experts, num_tokens]
    # sort by probability, then (stably) by group: each group's tokens are contiguous, ascending
    p_sorted, order = torch.sort(p, dim=-1, stable=True)
    g_sorted = group_ids[order]  # [num_experts, num_tokens]
    if num_groups > 1 or padding_mask is not None:
        g_sorted, order2 = torch.sort(g_sorted, dim=-1, stable=True)
        p_sorted = torch.gather(p_sorted, -1, order2)

    counts = torch.bincount(group_ids, minlength=num_groups + 1)[: num_groups + 1]  # [num_groups + 1]
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(num_tokens, device=probs.device).expand(num_experts, num_tokens)
    j = (pos - starts[g_sorted] + 1).to(torch.float64)  # 1-based rank inside the token's group
    n = counts[g_sorted].to(torch.float64)  # B of the token's group
    valid = g_sorted < num_groups
    g_idx = g_sorted.clamp(max=num_groups - 1)
    a_k = alpha2d.t()  # [num_experts, num_groups]
    a_el = torch.gather(a_k, 1, g_idx)  # [num_experts, num_tokens]
    b_el = torch.gather(alpha2d.sum(-1).unsqueeze(0).expand(num_experts, -1), 1, g_idx) - a_el
    cdf = beta_cdf(p_sorted, a_el, b_el)
    n_safe = n.clamp(min=1.0)
    diff = (j / n_safe).to(compute_dtype) - cdf
    w = torch.where(valid, 1.0 / n_safe, torch.zeros_like(n_safe)).to(compute_dtype)
    return (diff * diff * w).sum().to(out_dtype)
