"""torchrun worker: distributed DPSL vs an unsharded single-process reference (forward and
backward).

Launched by tests/distributed/test_dpsl_distributed.py; by hand:

    PYTHONPATH=.:tests python -m torch.distributed.run --nproc-per-node 2 --master-port 29611 \
        tests/support/workers/dpsl_exactness_worker.py --out /tmp/dpsl_2.json
    PYTHONPATH=.:tests python -m torch.distributed.run --nproc-per-node 4 --master-port 29612 \
        tests/support/workers/dpsl_exactness_worker.py --out /tmp/dpsl_4.json

For every layout in CASES[world_size] it builds a real Megatron ``MoELayer`` (allgather
dispatcher, ``SequentialMLP`` experts) from ``get_dpsl_layer_spec`` — i.e. with ``DPSLRouter`` —,
wraps it in Megatron's ``DistributedDataParallel`` and runs Megatron's own
``forward_backward_no_pipelining`` schedule (which sets the aux-loss scale, accumulates
micro-batches and calls ``finalize_model_grads``: DDP averaging over dp×cp, TP sum of
sequence-parallel grads). The LM loss is 0·output, so the router-weight gradient is the DPSL
gradient alone.

The reference is a ``DPSLRouter`` with one-rank process groups on the same weight, fed the
unsharded tokens of each gather group; its objective is the mean over micro-batches and over
gather groups of λ·DPSL (docs/parallelism.md). Rank 0 writes one JSON record per layout.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from support.megatron_cpu import init_torchrun
from support.workers import _exactness as exactness

S, B, H, E = 8, 2, 16, 4  # sequence, micro-batch size per replica, hidden, experts
NUM_MICROBATCHES = 2

# name, tp, cp, ep, etp, gather, token groups / cp_sliced ids, padding, per-token loss
CASES = {
    2: [
        dict(name="tp2_sp", tp=2, groups=True, padding=True),
        dict(name="ep2", ep=2, groups=True, padding=True),
        dict(name="cp2", cp=2, groups=True, padding=True),
        dict(name="cp2_ids_cp_sliced", cp=2, groups=True, cp_sliced=True),
        dict(name="dp2_micro_batch", padding=True),
        dict(name="dp2_global_batch", gather="global_batch", groups=True, padding=True),
        dict(name="tp2_sp_per_token_loss", tp=2, per_token=True),
        dict(name="gather_for_loss_variable_sizes", kind="gather_unit"),
    ],
    4: [
        dict(name="tp2_ep2_etp2", tp=2, ep=2, etp=2, groups=True, padding=True),
        dict(name="tp2_ep2_etp1", tp=2, ep=2, etp=1, padding=True),
        dict(name="tp2_cp2", tp=2, cp=2, groups=True, padding=True),
        dict(name="cp2_dp2_global_batch", cp=2, gather="global_batch", groups=True),
        dict(name="tp2_dp2_micro_batch", tp=2, padding=True),
        dict(name="ep4", ep=4, groups=True),
        # EP group spans two TP groups: EP peers inside one TP group hold the same tokens
        # (de-duplicated)
        dict(name="tp2_ep4_etp1", tp=2, ep=4, etp=1, groups=True, padding=True),
    ],
}


def _case_defaults(case):
    return exactness.with_layout(
        case, gather="micro_batch", groups=False, cp_sliced=False, padding=False, per_token=False
    )


def _config(case, world_tp=None, **over):
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    kw = dict(
        num_layers=1,
        hidden_size=H,
        ffn_hidden_size=8,
        num_attention_heads=4,
        num_moe_experts=E,
        moe_router_topk=2,
        moe_router_load_balancing_type="dpsl",
        moe_aux_loss_coeff=0.0,
        moe_dpsl_coeff=0.5,
        moe_dpsl_gather=case["gather"],
        moe_dpsl_log_interval=0,
        moe_token_dispatcher_type="allgather",
        tensor_model_parallel_size=case["tp"],
        context_parallel_size=case["cp"],
        expert_model_parallel_size=case["ep"],
        expert_tensor_parallel_size=case["etp"],
        sequence_parallel=case["tp"] > 1,
        calculate_per_token_loss=case["per_token"],
        add_bias_linear=False,
        use_cpu_initialization=True,
        init_method_std=0.5,  # spread-out routing probabilities: a non-trivial DPSL gradient
    )
    if case["groups"]:
        kw.update(moe_dpsl_group_alphas=[[2.0, 2.0, 0.5, 0.5], [0.5, 0.5, 2.0, 2.0]])
    kw.update(over)
    return DPSLTransformerConfig(**kw)


def _global_data(case, num_replicas):
    """Same on every rank: per micro-batch, per replica: x [S, B, H], group ids [B, S], padding [B,
    S]."""
    gen = torch.Generator().manual_seed(7)
    data = []
    for _ in range(NUM_MICROBATCHES):
        x = torch.randn(num_replicas, S, B, H, generator=gen)
        ids = torch.randint(0, 2, (num_replicas, B, S), generator=gen)
        pad = torch.rand(num_replicas, B, S, generator=gen) < 0.25 if case["padding"] else None
        data.append((x, ids, pad))
    return data


def _shard(case, x, ids, pad, tp_group, cp_group):
    """This rank's slice of one replica's micro-batch, as GPTModel/get_batch would hand it over."""
    tp, tp_rank = tp_group.size(), tp_group.rank()
    x_local = exactness.cp_slice(x.transpose(0, 1).contiguous(), cp_group).transpose(
        0, 1
    )  # [S/cp, B, H]
    rows = x_local.shape[0] // tp
    x_local = x_local[tp_rank * rows : (tp_rank + 1) * rows].contiguous()  # sequence parallel
    pad_local = None
    if pad is not None:
        pad_local = exactness.cp_slice(pad, cp_group)[
            :, tp_rank * rows : (tp_rank + 1) * rows
        ].contiguous()  # [B, s_local]
    ids_given = exactness.cp_slice(ids, cp_group) if case["cp_sliced"] else ids
    return x_local, ids_given, pad_local


def run_gather_unit(case):
    """gather_for_loss alone: different row counts per rank, de-duplication, and the backward
    slice."""
    from megatron_dpsl.parallel.token_gather import gather_for_loss, plan_gather

    init_torchrun()
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    rows = [r + 2 for r in range(world)]  # 2, 3, ... rows: unequal on purpose
    full = torch.arange(sum(rows) * 3, dtype=torch.float32).reshape(-1, 3)
    start = sum(rows[:rank])
    mine = full[start : start + rows[rank]].clone().requires_grad_(True)
    weights = torch.linspace(-1, 1, full.numel()).reshape(full.shape)
    errors = []
    out = gather_for_loss(mine, group, grad_scale=3.0)
    errors.append((out - full).abs().max().item())
    (out * weights).sum().backward()
    # every rank holds the whole loss: its rows get their own slice of the gradient, times 3, no sum
    errors.append((mine.grad - 3.0 * weights[start : start + rows[rank]]).abs().max().item())
    # all ranks claim the same replica: only rank 0's rows are kept; each rank's grad is that slice
    same = full[: rows[0]].clone().requires_grad_(True)
    plan = plan_gather(rows[0], group, replica_id=7)
    out2 = gather_for_loss(same, group, plan=plan)
    errors.append(float(plan.num_replicas != 1) + (out2 - full[: rows[0]]).abs().max().item())
    (out2 * weights[: rows[0]]).sum().backward()
    errors.append((same.grad - weights[: rows[0]]).abs().max().item())
    err = torch.tensor(max(errors), dtype=torch.float64)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    # exact: copies and one multiply by 3 of fp32 values
    return dict(
        name=case["name"],
        world=world,
        max_grad_diff=err.item(),
        max_loss_diff=0.0,
        ref_grad_max=1.0,
        gather_groups=[],
    )


def run_case(case, singleton_pg):
    if case.get("kind") == "gather_unit":
        return run_gather_unit(case)
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    from megatron_dpsl.models.specs import get_dpsl_layer_spec
    from megatron_dpsl.parallel.token_groups import dpsl_token_groups
    from megatron_dpsl.routing.router import DPSLRouter
    from support.common import build_mlp  # the MoE layer spec: ModuleSpec (0.16) or partial (0.19)

    case = _case_defaults(case)
    exactness.init_layout(case)
    world = dist.get_world_size()
    config = _config(case)
    torch.manual_seed(1234)
    layer = build_mlp(get_dpsl_layer_spec(config).submodules.mlp, config)
    layer.set_layer_number(1)
    from megatron.core.enums import ModelType

    layer.model_type = ModelType.encoder_or_decoder  # what the schedule reads off a GPTModel
    router = layer.router
    assert isinstance(router, DPSLRouter)
    dist.broadcast(router.weight.data, src=0)  # the reference uses this exact weight
    weight0 = router.weight.detach().clone()
    model = exactness.wrap_ddp(config, layer)

    tp_group = parallel_state.get_tensor_model_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    num_replicas = parallel_state.get_data_parallel_world_size()  # dense DP (EP ranks are in it)
    my_replica = parallel_state.get_data_parallel_rank()
    data = _global_data(case, num_replicas)

    batches = []
    for x, ids, pad in data:
        batches.append(
            _shard(
                case,
                x[my_replica],
                ids[my_replica],
                None if pad is None else pad[my_replica],
                tp_group,
                cp_group,
            )
        )

    def forward_step(data_iterator, model):
        x_local, ids_given, pad_local = next(data_iterator)
        ctx = (
            dpsl_token_groups(ids_given, cp_sliced=case["cp_sliced"])
            if case["groups"]
            else contextlib.nullcontext()
        )
        with ctx:
            out, _ = model(x_local, padding_mask=pad_local)
        valid = torch.tensor(
            int(
                S // case["cp"] * B
                if pad_local is None
                else (~exactness.cp_slice(data[0][2][my_replica], cp_group)).sum()
            )
        )

        def loss_func(output):
            zero = (output * 0).sum()  # LM loss 0: the router gradient is DPSL's alone
            if case["per_token"]:
                return zero, valid, {}
            return zero, {}

        return out, loss_func

    clear_aux_losses_tracker()
    model.zero_grad_buffer()
    # Megatron's forward_backward_no_pipelining allocates a "cuda" tensor up front, so its body is
    # replayed here with Megatron's own pieces: forward_step_calc_loss (LM-loss scaling and the
    # MoEAuxLossAutoScaler scale: cp/num_microbatches, or 1 with per-token loss), plain backward
    # (backward_step without grad_scale_func) and finalize_model_grads.
    total_num_tokens = torch.zeros([], dtype=torch.int)
    it = iter(batches)
    for _ in range(NUM_MICROBATCHES):
        output, loss_func = forward_step(it, model)
        loss, num_tokens = forward_step_calc_loss(
            model,
            output,
            loss_func,
            config,
            None,
            False,
            NUM_MICROBATCHES,
            [],
            cp_group_size=cp_group.size(),
            is_last_stage=True,
        )
        total_num_tokens += num_tokens
        torch.autograd.backward(loss)
    finalize_model_grads([model], total_num_tokens if case["per_token"] else None)
    dist_grad = router.weight.main_grad.detach().clone()
    dist_loss = get_moe_layer_wise_logging_tracker()["dpsl_loss"]["values"][0].item()

    # --- which replicas share one DPSL (the test's own bookkeeping, not the router's) ---
    replica_of = [None] * world
    dist.all_gather_object(replica_of, my_replica)
    if case["gather"] == "global_batch":
        my_set = list(range(num_replicas))
    else:
        ep_ranks = dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())
        my_set = sorted({replica_of[r] for r in ep_ranks} | {my_replica})
    num_groups = num_replicas // len(my_set)
    all_sets = [None] * world
    dist.all_gather_object(all_sets, my_set)
    gather_sets = sorted({tuple(s) for s in all_sets})
    assert len(gather_sets) == num_groups, (
        f"gather groups do not partition the replicas: {gather_sets}"
    )

    # --- unsharded single-process reference ---
    ref_config = _config(
        dict(case, tp=1, cp=1, ep=1, etp=1, per_token=False), expert_tensor_parallel_size=1
    )
    ref = DPSLRouter(ref_config, pg_collection=singleton_pg)
    ref.set_layer_number(1)
    ref.train()
    ref.weight.data.copy_(weight0)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / (num_groups * NUM_MICROBATCHES)))
    ref_loss_mine = 0.0
    for x, ids, pad in data:
        for gset in gather_sets:
            xs = torch.cat([x[j] for j in gset], dim=1)  # [S, B * |gset|, H]
            ids_s = torch.cat([ids[j] for j in gset], dim=0)  # [B * |gset|, S]
            pad_s = (
                None if pad is None else torch.cat([pad[j] for j in gset], dim=0).t()
            )  # [S, B*|gset|]
            clear_aux_losses_tracker()
            ctx = dpsl_token_groups(ids_s) if case["groups"] else contextlib.nullcontext()
            with ctx:
                probs, _ = ref(xs, padding_mask=pad_s)
            (probs * 0).sum().backward()
            if list(gset) == my_set:
                ref_loss_mine += get_moe_layer_wise_logging_tracker()["dpsl_loss"]["values"][
                    0
                ].item()
    ref_grad = ref.weight.grad.detach()
    grad_diff = (dist_grad - ref_grad).abs().max().item()
    loss_diff = abs(dist_loss - ref_loss_mine)
    stats = torch.tensor([grad_diff, loss_diff, ref_grad.abs().max().item()], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    record = dict(
        name=case["name"],
        world=world,
        max_grad_diff=stats[0].item(),
        max_loss_diff=stats[1].item(),
        ref_grad_max=stats[2].item(),
        ref_loss=ref_loss_mine,
        dist_loss=dist_loss,
        gather_groups=[list(s) for s in gather_sets],
    )
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    return record


if __name__ == "__main__":
    exactness.main(__doc__, CASES, run_case)
