"""DPSL's routing diagnostics for Megatron's aux-loss tracker: the router calls this, metrics
compute.

Logged every ``moe_dpsl_log_interval`` router calls as ``dpsl_cov`` (coefficient of variation of the
experts' token loads), ``dpsl_entropy`` (mean routing entropy) and ``dpsl_prior_distance`` (the
largest per-expert/group Eq. 4 term). The only communication is the expert-load all-reduce over
the TP×CP ranks, and it runs only on log steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_dpsl import metrics


@torch.no_grad()
def routing_diagnostics(
    *,
    routing_map: torch.Tensor,
    padding_mask: torch.Tensor | None,
    all_scores: torch.Tensor,
    alpha: torch.Tensor,
    all_groups: torch.Tensor | None,
    all_pad: torch.Tensor | None,
    load_group=None,
) -> dict[str, torch.Tensor]:
    """The diagnostics of one router call, as 0-dim float tensors.

    Args:
        routing_map: ``[num_tokens, num_experts]`` bool, this rank's tokens.
        padding_mask: ``[num_tokens]`` bool, True = padding (this rank's), or None.
        all_scores: ``[B, num_experts]`` softmax over the gathered tokens (what DPSL saw).
        alpha: ``[num_experts]`` or ``[num_groups, num_experts]`` float64 prior.
        all_groups / all_pad: ``[B]`` gathered group ids / padding flags, or None.
        load_group: ranks whose token loads add up to the micro-batch's (TP×CP), or None.
    """
    valid = None if padding_mask is None else ~padding_mask
    load = (routing_map if valid is None else routing_map & valid.unsqueeze(-1)).sum(0).float()
    if load_group is not None and load_group.size() > 1:
        dist.all_reduce(load, group=load_group)
    scores = all_scores if all_pad is None else all_scores[~all_pad]
    distance = metrics.prior_distance(all_scores, alpha, group_ids=all_groups, padding_mask=all_pad)
    return {
        "dpsl_cov": metrics.expert_load_cov(load).float(),
        "dpsl_entropy": metrics.routing_entropy(scores).float(),
        "dpsl_prior_distance": distance.max().float(),
    }
