"""All-gather of per-token router outputs for a loss that every rank then computes in full.

DPSL (Eq. 4) sorts each expert's probabilities over *all* tokens of a batch, so it is not a sum
of per-rank terms: the ranks holding different tokens of one batch must gather them. Every rank of
the gather group then evaluates the same loss on the same gathered tensor. The backward therefore
does NOT reduce-scatter (that would count the one loss once per rank); each rank keeps the
gradient of its own slice, multiplied by ``grad_scale``, which the caller chooses so that the
router-weight gradient after Megatron's reductions equals the single-process reference (see
docs/parallelism.md for the derivation).

Megatron's micro-batches have a fixed shape, so every rank of a gather group holds the same number
of tokens: :func:`equal_plan` builds the plan with no communication and no host sync (the router's
path). Where counts may differ, :func:`plan_gather` all-gathers the sizes first (one tiny collective
and a host sync) and the data is padded to the largest size. Buffers are allocated on
``tensor.device``, so the same code runs on NCCL/GPU and gloo/CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class GatherPlan:
    """Who contributes what to one gather (identical on every rank of the group).

    Attributes:
        sizes: token count of each group rank (group-rank order).
        keep: group ranks whose slice enters the result (first rank of each replica id).
        my_slot: the group rank whose slice carries this rank's tokens (itself unless a rank with
            the same ``replica_id`` came earlier, i.e. holds the same tokens).
    """

    sizes: List[int]
    keep: List[int]
    my_slot: int

    @property
    def num_replicas(self) -> int:
        """Number of distinct token sets in the result."""
        return len(self.keep)

    @property
    def num_tokens(self) -> int:
        return sum(self.sizes[i] for i in self.keep)


def plan_gather(num_tokens: int, group, replica_id: Optional[int] = None, device=None) -> GatherPlan:
    """Exchange token counts (and replica ids) over ``group``: one all-gather of two ints.

    Args:
        num_tokens: this rank's number of rows.
        group: the process group (``None`` or size 1 means no communication).
        replica_id: ranks passing the same id hold the same rows; only the first is kept.
            ``None``: every rank holds different rows.
    """
    if group is None or group.size() == 1:
        return GatherPlan(sizes=[num_tokens], keep=[0], my_slot=0)
    rid = group.rank() if replica_id is None else replica_id
    mine = torch.tensor([num_tokens, rid], dtype=torch.int64, device=device)
    allv = [torch.empty_like(mine) for _ in range(group.size())]
    dist.all_gather(allv, mine, group=group)
    pairs = [tuple(int(x) for x in v.tolist()) for v in allv]
    sizes = [p[0] for p in pairs]
    first_of = {}
    for slot, (_, r) in enumerate(pairs):
        first_of.setdefault(r, slot)
    keep = sorted(first_of.values())
    return GatherPlan(sizes=sizes, keep=keep, my_slot=first_of[rid])


def equal_plan(num_tokens: int, group, keep: Optional[List[int]] = None, my_slot: Optional[int] = None) -> GatherPlan:
    """Plan for ``num_tokens`` rows on every rank of ``group``: no communication, no host sync.

    Args:
        num_tokens: rows on this rank (and, by Megatron's fixed micro-batch shape, on every rank).
        group: the process group (``None`` or size 1: no communication).
        keep, my_slot: the replica structure of an earlier :func:`plan_gather` on the same group
            (topology is static); default: every rank holds different rows.
    """
    size = 1 if group is None else group.size()
    rank = 0 if group is None else group.rank()
    return GatherPlan(
        sizes=[num_tokens] * size,
        keep=list(range(size)) if keep is None else list(keep),
        my_slot=rank if my_slot is None else my_slot,
    )


class _GatherForLoss(torch.autograd.Function):
    """All-gather along dim 0 (variable sizes, optional de-duplication); backward = own slice × scale."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, plan: GatherPlan, grad_scale: float) -> torch.Tensor:
        ctx.plan, ctx.grad_scale = plan, grad_scale
        ctx.rows = tensor.shape[0]
        if len(plan.sizes) == 1:
            return tensor.clone()
        max_rows = max(plan.sizes)
        if min(plan.sizes) == max_rows:
            padded = tensor.contiguous()
        else:
            padded = tensor.new_zeros((max_rows,) + tuple(tensor.shape[1:]))
            padded[: tensor.shape[0]] = tensor
        chunks = [torch.empty_like(padded) for _ in plan.sizes]
        dist.all_gather(chunks, padded, group=group)
        return torch.cat([chunks[i][: plan.sizes[i]] for i in plan.keep], dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Every rank of the group computed the same loss on the same gathered tensor, so
        # grad_output is already the full gradient on every rank: this rank's rows get the
        # gradient of its own slice (or of the kept copy of the same rows), with no
        # reduce-scatter — summing the group's identical copies would count the loss group-size
        # times. grad_scale then undoes the averaging Megatron's DDP applies to these ranks.
        plan = ctx.plan
        offset = 0
        for i in plan.keep:
            if i == plan.my_slot:
                break
            offset += plan.sizes[i]
        grad = grad_output[offset : offset + ctx.rows]
        if ctx.grad_scale != 1.0:
            grad = grad * ctx.grad_scale
        return grad, None, None, None


def gather_for_loss(
    tensor: torch.Tensor,
    group,
    plan: Optional[GatherPlan] = None,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """All-gather ``tensor`` ``[num_tokens, ...]`` over ``group`` along dim 0, for a loss every rank computes.

    Args:
        tensor: this rank's rows.
        group: process group (``None``/size 1: identity, still differentiable).
        plan: from :func:`plan_gather` (computed here, one small all-gather, when omitted).
        grad_scale: factor on the gradient of this rank's slice (see module docstring).

    Returns:
        ``[sum of kept ranks' num_tokens, ...]``, kept ranks in group-rank order.
    """
    if plan is None:
        plan = plan_gather(tensor.shape[0], group, device=tensor.device)
    me = 0 if group is None or group.size() == 1 else group.rank()
    if plan.sizes[me] != tensor.shape[0]:
        raise ValueError(
            f"gather_for_loss: the plan says this rank has {plan.sizes[me]} rows, tensor has {tensor.shape[0]}"
        )
    return _GatherForLoss.apply(tensor, group, plan, float(grad_scale))
