"""Routing-distribution diagnostics: plain tensor functions (no process groups, no logging
back-end).

Shapes use Megatron's names: ``probs`` ``[num_tokens, num_experts]`` (routing probabilities, rows on
the simplex), ``routing_map`` ``[num_tokens, num_experts]`` bool (top-k selection). All return
float32 tensors (float64 for float64 input where noted) on the input's device and never require
grad.
"""

from __future__ import annotations

import torch

from megatron_dpsl.losses.dpsl import dpsl_loss_per_expert
from megatron_dpsl.losses.dpsl_inputs import prepare
from megatron_dpsl.losses.ranking import ranked_cdf


def expert_load_cov(routing_map_or_counts: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation of expert loads, std / mean (population std; paper Table 12).

    Args:
        routing_map_or_counts: ``[num_tokens, num_experts]`` bool routing map, or ``[num_experts]``
            token counts per expert (e.g. already summed over ranks).

    Returns:
        Scalar float32; 0 when no token is routed (all loads 0). 0 means perfectly balanced.
    """
    x = routing_map_or_counts
    if x.dim() == 2:
        load = x.sum(0).float()
    elif x.dim() == 1:
        load = x.float()
    else:
        raise ValueError(
            "expert_load_cov: expected a [num_tokens, num_experts] routing map or "
            "[num_experts] counts, "
            f"got shape {tuple(x.shape)}"
        )
    with torch.no_grad():
        mean = load.mean()
        std = load.std(correction=0)
        return torch.where(
            mean > 0, std / mean.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(mean)
        )


def _check_probs(name: str, probs: torch.Tensor):
    if probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError(
            f"{name}: probs must be a float tensor [num_tokens, num_experts], got "
            f"{tuple(probs.shape)}"
        )


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the routing entropy -Σ_k p_k log p_k (nats; 0 log 0 = 0).

    Args:
        probs: ``[num_tokens, num_experts]``.

    Returns:
        Scalar float32 (float64 for float64 input); 0 for no tokens. log(num_experts) = uniform
        routing.
    """
    _check_probs("routing_entropy", probs)
    with torch.no_grad():
        p = probs.detach().to(torch.float64 if probs.dtype == torch.float64 else torch.float32)
        if p.shape[0] == 0:
            return p.new_zeros(())
        return -torch.special.xlogy(p, p).sum(-1).mean()


def mean_max_prob(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of max_k p_k (1/num_experts = uniform, 1 = one-hot routing).

    Args:
        probs: ``[num_tokens, num_experts]``.

    Returns:
        Scalar float32 (float64 for float64 input); 0 for no tokens.
    """
    _check_probs("mean_max_prob", probs)
    with torch.no_grad():
        p = probs.detach().to(torch.float64 if probs.dtype == torch.float64 else torch.float32)
        if p.shape[0] == 0:
            return p.new_zeros(())
        return p.max(-1).values.mean()


def prior_distance(
    probs: torch.Tensor,
    alpha,
    group_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 4 (without λ) per expert: the Cramér–von Mises distance of each expert's empirical
    marginal to its Beta(α_k, A − α_k) target, summed over token groups. ``dpsl_loss`` is its sum.

    Args:
        probs: ``[num_tokens, num_experts]``; alpha ``[num_experts]`` or ``[num_groups,
        num_experts]``; group_ids ``[num_tokens]`` int; padding_mask ``[num_tokens]`` bool (True =
        padding). As ``dpsl_loss``.

    Returns:
        ``[num_experts]`` float32 (float64 for float64 input), no grad.
    """
    with torch.no_grad():
        return dpsl_loss_per_expert(probs.detach(), alpha, group_ids, padding_mask)


def ks_distance(
    probs: torch.Tensor,
    alpha,
    group_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kolmogorov–Smirnov distance of each expert's empirical marginal to its Beta target.

    D_k = max_j max(j/B − F(p_(j)), F(p_(j)) − (j−1)/B) per (group, expert); with groups, the worst
    group.

    Args:
        As ``prior_distance``.

    Returns:
        ``[num_experts]`` float32 (float64 for float64 input) in [0, 1], no grad; 0 for an expert
        without valid tokens. NaN in valid probs gives NaN.
    """
    with torch.no_grad():
        probs = probs.detach()
        inputs = prepare(probs, alpha, group_ids, padding_mask)
        r = ranked_cdf(probs.to(inputs.table.dtype), inputs, need_grad=False)
        gap = torch.maximum(r.j / r.n - r.f, r.f - (r.j - 1.0) / r.n)
        gap = torch.where(r.valid, gap, torch.zeros_like(gap))
        num_experts = probs.shape[1]
        out = torch.zeros(num_experts, dtype=gap.dtype, device=gap.device)
        out = out.scatter_reduce(0, r.expert, gap, reduce="amax", include_self=True)
        # scatter_reduce's amax may drop NaN on some back-ends: propagate explicitly
        has_nan = torch.zeros(num_experts, dtype=torch.bool, device=gap.device).index_put_(
            (r.expert,), torch.isnan(gap), accumulate=True
        )
        return torch.where(has_nan, torch.full_like(out, float("nan")), out)


def group_expert_usage(
    routing_map: torch.Tensor, group_ids: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Each token group's share of its expert assignments per expert: ``[G, E]`` float32, rows
    summing to 1 (all-zero rows for groups without a routed token).

    Args:
        routing_map: ``[num_tokens, num_experts]`` bool (top-k selection).
        group_ids: ``[num_tokens]`` int in ``[0, num_groups)``.
    """
    with torch.no_grad():
        counts = torch.zeros(num_groups, routing_map.shape[1], device=routing_map.device)
        counts.index_add_(0, group_ids.long(), routing_map.float())  # [G, E] assignments
        totals = counts.sum(1, keepdim=True)
        return torch.where(totals > 0, counts / totals.clamp(min=1), torch.zeros_like(counts))
