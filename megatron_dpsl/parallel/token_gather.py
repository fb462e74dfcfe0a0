"""All-gather of per-token router outputs for a loss that every rank then computes in full.

Shape legend: B tokens (gathered), C columns per token (probabilities, ids, partial sums).

The DPSL loss sorts each expert's probabilities over *all* tokens of a batch, so it is not a sum
of per-rank terms: the ranks holding different tokens of one batch must gather them. Every rank of
the gather group then evaluates the same loss on the same gathered tensor. The backward therefore
does NOT reduce-scatter (that would count the one loss once per rank); each rank keeps the
gradient of its own slice, multiplied by ``grad_scale``, which the caller chooses so that the
router-weight gradient after Megatron's reductions equals the single-process reference (see
docs/parallelism.md for the derivation).

Megatron's micro-batches have a fixed shape, so every rank of a gather group holds the same number
of tokens: :func:`fixed_size_plan` builds the plan with no communication and no host sync (the
router's path). Where counts may differ, :func:`plan_gather` all-gathers the sizes first (one tiny
collective and a host sync) and the data is padded to the largest size. Buffers are allocated on
``tensor.device``, so the same code runs on NCCL/GPU and gloo/CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    sizes: list[int]
    keep: list[int]
    my_slot: int

    @property
    def num_replicas(self) -> int:
        """Number of distinct token sets in the result."""
        return len(self.keep)

    @property
    def num_tokens(self) -> int:
        return sum(self.sizes[i] for i in self.keep)


def plan_gather(num_tokens: int, group, replica_id: int | None = None, device=None) -> GatherPlan:
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


def fixed_size_plan(
    num_tokens: int, group, keep: list[int] | None = None, my_slot: int | None = None
) -> GatherPlan:
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
    """All-gather along dim 0 (variable sizes, optional de-duplication); backward = own slice ×
    scale."""

    @staticmethod
    def forward(
        ctx, tensor: torch.Tensor, group, plan: GatherPlan, grad_scale: float
    ) -> torch.Tensor:
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
    plan: GatherPlan | None = None,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """All-gather ``tensor`` ``[num_tokens, ...]`` over ``group`` along dim 0, for a loss every rank
    computes.

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
            f"gather_for_loss: the plan says this rank has {plan.sizes[me]} rows, tensor has "
            f"{tensor.shape[0]}"
        )
    return _GatherForLoss.apply(tensor, group, plan, float(grad_scale))


def group_ranks(group) -> list[int]:
    """Global ranks of ``group`` (``[0]`` for ``None`` or without torch.distributed)."""
    if group is None or not dist.is_initialized():
        return [0]
    return dist.get_process_group_ranks(group)


class TokenGather:
    """The all-gather one router's loss needs: every token of its micro-batch (or global batch).

    ``"micro_batch"`` gathers over the TP×CP ranks (sequence-parallel and context-parallel shards of
    one micro-batch) and then over the EP ranks outside that group, which hold other data-parallel
    replicas' micro-batches; ``"global_batch"`` gathers over TP×DP×CP. Every rank of a gather group
    holds the same number of tokens (Megatron's micro-batches have a fixed shape and SP/CP split
    them evenly), so the plans need no size exchange; the EP replica layout is exchanged once, on
    the first call (topology is static). Afterwards a call costs the data all-gathers and no host
    sync.

    Args:
        mode: ``"micro_batch"`` or ``"global_batch"`` (``DPSLTransformerConfig.moe_dpsl_gather``).
        tp_cp_group, tp_dp_cp_group: Megatron's groups (``pg_collection.tp_cp`` / ``.tp_dp_cp``).
        ep_group, expt_tp_group: expert-parallel and expert-tensor-parallel groups (``None``: size
            1).
    """

    def __init__(
        self, *, mode: str, tp_cp_group, tp_dp_cp_group, ep_group=None, expt_tp_group=None
    ) -> None:
        self.mode = mode
        self.tp_cp_group, self.tp_dp_cp_group, self.ep_group = tp_cp_group, tp_dp_cp_group, ep_group
        self._ep_replicas = None  # (keep, my_slot) of the EP gather
        if mode == "micro_batch":
            _check_micro_batch_layout(tp_cp_group, ep_group, expt_tp_group)

    def __call__(self, rows: torch.Tensor):
        """Gather ``rows`` ``[num_tokens, C]``; returns ``(gathered [B, C], num_replicas)``.

        ``num_replicas`` is the number of data-parallel micro-batches in ``gathered``: the caller's
        per-token loss scaling divides by it (docs/parallelism.md).
        """
        tp_cp, num_tokens = self.tp_cp_group, rows.shape[0]
        if self.mode == "global_batch":
            group = self.tp_dp_cp_group
            replicas = group.size() // tp_cp.size()
            # every rank computes the loss on the whole global micro-batch; DDP divides by dp*cp and
            # the schedule's aux-loss scale multiplies by cp, so each rank's slice needs ×dp
            return gather_for_loss(
                rows, group, plan=fixed_size_plan(num_tokens, group), grad_scale=replicas
            ), replicas
        gathered = gather_for_loss(rows, tp_cp, plan=fixed_size_plan(num_tokens, tp_cp))
        ep = self.ep_group
        if ep is None or ep.size() == 1 or set(group_ranks(ep)) <= set(group_ranks(tp_cp)):
            return gathered, 1
        # EP peers inside this TP×CP group hold the same rows: keep one copy of each micro-batch
        if self._ep_replicas is None:
            first = plan_gather(
                gathered.shape[0], ep, replica_id=min(group_ranks(tp_cp)), device=rows.device
            )
            self._ep_replicas = (first.keep, first.my_slot)
        plan = fixed_size_plan(gathered.shape[0], ep, *self._ep_replicas)
        return gather_for_loss(
            gathered, ep, plan=plan, grad_scale=plan.num_replicas
        ), plan.num_replicas


class TokenSum:
    """In-place sum of per-rank partial statistics over the ranks holding the micro-batch's tokens.

    The same ranks as ``TokenGather("micro_batch")``: the TP×CP group (sequence-parallel and
    context-parallel shards), then the EP group when it reaches beyond it (EP peers hold other
    data-parallel replicas' micro-batches). EP peers inside one TP×CP group hold the same sums after
    the first step; the layout check makes every micro-batch appear equally often in the EP sum, so
    ratios of such sums (means) equal a single process holding each micro-batch once. No autograd,
    no host sync; a size-1 group costs nothing.

    Args:
        tp_cp_group, ep_group, expt_tp_group: Megatron's groups (``None``: size 1).
        field: the config field an unsupported layout is reported under.
    """

    def __init__(
        self, *, tp_cp_group, ep_group=None, expt_tp_group=None, field: str = "moe_dpsl_gather"
    ) -> None:
        self.groups = [g for g in (tp_cp_group,) if g is not None and g.size() > 1]
        beyond = ep_group is not None and not set(group_ranks(ep_group)) <= set(
            group_ranks(tp_cp_group)
        )
        if beyond and ep_group.size() > 1:
            _check_micro_batch_layout(tp_cp_group, ep_group, expt_tp_group, field=field)
            self.groups.append(ep_group)

    def __call__(self, tensor: torch.Tensor) -> None:
        for group in self.groups:
            dist.all_reduce(tensor, group=group)


def _check_micro_batch_layout(
    tp_cp_group, ep_group, expt_tp_group, field: str = "moe_dpsl_gather"
) -> None:
    """ "micro_batch" over EP needs gather groups that partition the ranks (docs/parallelism.md)."""
    if ep_group is None or ep_group.size() == 1 or expt_tp_group is None:
        return
    block, etp, ep = tp_cp_group.size(), expt_tp_group.size(), ep_group.size()
    span = etp * ep
    # TP×CP groups are aligned blocks of tp·cp ranks and an EP group strides etp within an
    # aligned block of etp·ep ranks: when these sizes divide one another, the TP×CP blocks an
    # EP group touches are the same for every rank they contain
    if (block % etp and etp % block) or (block % span and span % block):
        what = "moe_dpsl_gather='micro_batch'" if field == "moe_dpsl_gather" else field
        fix = "; use moe_dpsl_gather='global_batch'" if field == "moe_dpsl_gather" else ""
        raise ValueError(
            f"{what} with tp*cp={block}, expert_tensor_parallel={etp}, "
            f"expert_model_parallel={ep}: these sizes must divide one another for the EP "
            f"gather to form consistent groups{fix}"
        )
