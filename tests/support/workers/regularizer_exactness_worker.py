"""torchrun worker: distributed variance + orthogonality losses vs an unsharded single-process
reference.

Launched by tests/distributed/test_regularizers_distributed.py; by hand:

    PYTHONPATH=.:tests python -m torch.distributed.run --nproc-per-node 2 --master-port 29621 \
        tests/support/workers/regularizer_exactness_worker.py --out /tmp/reg_2.json
    PYTHONPATH=.:tests python -m torch.distributed.run --nproc-per-node 4 --master-port 29622 \
        tests/support/workers/regularizer_exactness_worker.py --out /tmp/reg_4.json

For every layout in CASES[world_size] it builds a real Megatron MoE layer from
``get_dpsl_layer_spec``
(``DPSLMoELayer`` with ``DPSLRouter``; allgather or alltoall dispatcher, ``SequentialMLP`` experts),
wraps it in Megatron's ``DistributedDataParallel`` and replays Megatron's no-pipelining schedule
with its own pieces (``forward_step_calc_loss``: LM-loss scaling and the aux-loss scale; backward;
``finalize_model_grads``: DDP reductions, TP sum of sequence-parallel grads, per-token division).
The LM loss is 0·output, so the router-weight gradient is the variance loss's alone (L_o gives the
router none) and the expert-weight gradients are the orthogonality loss's alone (L_v gives the
experts none).

The references share no code path with the layer:
- variance: a ``DPSLRouter`` with one-rank process groups on each gather group's unsharded tokens
  (the tokens ``moe_dpsl_gather`` names), objective = mean over micro-batches and gather groups of
  γ·L_v;
- orthogonality: every (token, expert) pair of each data-parallel replica's unsharded micro-batch
  run through the full, unsharded expert weights as plain torch (``W2 · gelu(W1 · x)``), Eq. 6 on
  the result, objective = mean over micro-batches and replicas of β·L_o.
With ``calculate_per_token_loss`` each unit is weighted by its valid tokens over the global count
instead (what Megatron's per-token normalisation optimises). Rank 0 writes one JSON record per
layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from support.common import build_mlp
from support.megatron_cpu import install_alltoall_shims
from support.workers import _exactness as exactness

S, B, H, E, FFN, K = (
    8,
    2,
    16,
    4,
    8,
    2,
)  # sequence, micro-batch per replica, hidden, experts, ffn, top-k
NUM_MICROBATCHES = 2
GAMMA, BETA = 0.5, 0.3

# alltoall with expert-tensor-parallel size > 1 is left out: its dispatch all-gathers variable-size
# chunks over the ETP group, which gloo cannot do (NCCL can); the allgather case covers ETP = 2.
CASES = {
    2: [
        dict(name="tp2_sp", tp=2, padding=True),
        dict(name="cp2", cp=2, padding=True),
        dict(name="ep2_allgather", ep=2, padding=True),
        dict(name="ep2_alltoall", ep=2, dispatcher="alltoall", padding=True),
        dict(name="dp2", padding=True),
        dict(name="dp2_global_batch", gather="global_batch", padding=True),
        dict(name="tp2_sp_per_token_loss", tp=2, per_token=True, padding=True),
        dict(
            name="ep2_alltoall_reference_code_forms",
            ep=2,
            dispatcher="alltoall",
            form="reference_code",
        ),
    ],
    4: [
        dict(name="tp2_ep2_etp2_allgather", tp=2, ep=2, etp=2, padding=True),
        dict(name="tp2_ep2_etp1_alltoall", tp=2, ep=2, etp=1, dispatcher="alltoall", padding=True),
        dict(name="tp2_cp2", tp=2, cp=2),  # no padding: the normaliser needs no all-reduce
        dict(name="tp2_dp2", tp=2, padding=True),
        dict(name="ep4_alltoall", ep=4, dispatcher="alltoall", padding=True),
        dict(name="cp2_dp2_per_token_loss", cp=2, per_token=True, padding=True),
    ],
}


def _case_defaults(case):
    return exactness.with_layout(
        case,
        gather="micro_batch",
        padding=False,
        per_token=False,
        dispatcher="allgather",
        form="paper",
    )


def _config(case, **over):
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    kw = dict(
        num_layers=1,
        hidden_size=H,
        ffn_hidden_size=FFN,
        num_attention_heads=4,
        num_moe_experts=E,
        moe_router_topk=K,
        moe_router_load_balancing_type=["variance", "orthogonality"],
        moe_aux_loss_coeff=[GAMMA, BETA],
        moe_variance_loss_form=case["form"],
        moe_orthogonality_loss_form=case["form"],
        moe_dpsl_gather=case["gather"],
        moe_token_dispatcher_type=case["dispatcher"],
        tensor_model_parallel_size=case["tp"],
        context_parallel_size=case["cp"],
        expert_model_parallel_size=case["ep"],
        expert_tensor_parallel_size=case["etp"],
        sequence_parallel=case["tp"] > 1,
        calculate_per_token_loss=case["per_token"],
        add_bias_linear=False,
        use_cpu_initialization=True,
        init_method_std=0.5,  # spread-out routing: non-trivial gradients
    )
    kw.update(over)
    return DPSLTransformerConfig(**kw)


def _expert_weights():
    """Full (unsharded) fc1 [FFN, H] and fc2 [H, FFN] weights of every expert, the same on every
    rank."""
    gen = torch.Generator().manual_seed(11)
    return [
        (0.5 * torch.randn(FFN, H, generator=gen), 0.5 * torch.randn(H, FFN, generator=gen))
        for _ in range(E)
    ]


def _global_data(case, num_replicas):
    gen = torch.Generator().manual_seed(7)
    data = []
    for _ in range(NUM_MICROBATCHES):
        x = torch.randn(num_replicas, S, B, H, generator=gen)
        pad = torch.rand(num_replicas, B, S, generator=gen) < 0.25 if case["padding"] else None
        data.append((x, pad))
    return data


def _shard(x, pad, tp_group, cp_group):
    """This rank's slice of one replica's micro-batch: CP slicing, then the sequence-parallel
    split."""
    tp, tp_rank = tp_group.size(), tp_group.rank()
    x_local = exactness.cp_slice(x.transpose(0, 1).contiguous(), cp_group).transpose(
        0, 1
    )  # [S/cp, B, H]
    rows = x_local.shape[0] // tp
    x_local = x_local[tp_rank * rows : (tp_rank + 1) * rows].contiguous()
    pad_local = (
        None
        if pad is None
        else exactness.cp_slice(pad, cp_group)[
            :, tp_rank * rows : (tp_rank + 1) * rows
        ].contiguous()
    )
    return x_local, pad_local


def _load_expert_shards(layer, weights, etp_rank, etp_size):
    """Each local expert gets its global expert's weights, sharded as Column/RowParallelLinear shard
    them."""
    block = FFN // etp_size
    rows = slice(etp_rank * block, (etp_rank + 1) * block)
    shards = []
    for i, expert in enumerate(layer.experts.local_experts):
        e = layer.local_expert_indices[i]
        w1, w2 = weights[e]
        expert.linear_fc1.weight.data.copy_(w1[rows])
        expert.linear_fc2.weight.data.copy_(w2[:, rows])
        shards.append((e, rows, expert))
    return shards


def _reference_orthogonality(x, pad, routing_map, weights, form):
    """β·L_o of one unsharded replica micro-batch with plain-torch experts (weights are leaves)."""
    from megatron_dpsl.losses.orthogonality import orthogonality_loss

    tokens = x.reshape(-1, H)
    slots = []
    for t in range(tokens.shape[0]):
        chosen = routing_map[t].nonzero().flatten().tolist()  # ascending expert id = slot order
        slots.append(
            torch.stack([weights[e][1] @ F.gelu(weights[e][0] @ tokens[t]) for e in chosen])
        )
    flat_pad = None if pad is None else pad.t().reshape(-1)  # [B, S] -> token order s*B + b
    return BETA * orthogonality_loss(torch.stack(slots), flat_pad, form=form)


def run_case(case, singleton_pg):
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    from megatron_dpsl.models.specs import get_dpsl_layer_spec
    from megatron_dpsl.routing.moe_layer import DPSLMoELayer
    from megatron_dpsl.routing.router import DPSLRouter

    case = _case_defaults(case)
    exactness.init_layout(case)
    world = dist.get_world_size()
    config = _config(case)
    torch.manual_seed(1234)
    layer = build_mlp(get_dpsl_layer_spec(config).submodules.mlp, config)
    assert isinstance(layer, DPSLMoELayer) and isinstance(layer.router, DPSLRouter)
    layer.set_layer_number(1)
    layer.model_type = ModelType.encoder_or_decoder  # what the schedule reads off a GPTModel
    dist.broadcast(layer.router.weight.data, src=0)  # replicated; the references use this weight
    router_weight = layer.router.weight.detach().clone()
    weights = _expert_weights()
    shards = _load_expert_shards(
        layer,
        weights,
        parallel_state.get_expert_tensor_parallel_rank(),
        parallel_state.get_expert_tensor_parallel_world_size(),
    )
    model = exactness.wrap_ddp(config, layer)

    tp_group = parallel_state.get_tensor_model_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    num_replicas = parallel_state.get_data_parallel_world_size()  # dense DP (EP ranks are in it)
    my_replica = parallel_state.get_data_parallel_rank()
    data = _global_data(case, num_replicas)
    batches = [
        (
            *_shard(x[my_replica], None if pad is None else pad[my_replica], tp_group, cp_group),
            None if pad is None else pad[my_replica],
        )
        for x, pad in data
    ]

    def forward_step(data_iterator, model):
        x_local, pad_local, pad_replica = next(data_iterator)
        out, _ = model(x_local, padding_mask=pad_local)
        # the LM loss's token count on this rank: its CP share of the replica's valid tokens
        valid = torch.tensor(
            int(
                S // case["cp"] * B
                if pad_replica is None
                else (~exactness.cp_slice(pad_replica, cp_group)).sum()
            )
        )

        def loss_func(output):
            zero = (output * 0).sum()  # LM loss 0: the gradients are the two regularisers'
            return (zero, valid, {}) if case["per_token"] else (zero, {})

        return out, loss_func

    clear_aux_losses_tracker()
    model.zero_grad_buffer()
    # Megatron's forward_backward_no_pipelining allocates a "cuda" tensor up front: its body is
    # replayed with Megatron's own pieces (see dpsl_exactness_worker.py)
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
    dist_router_grad = layer.router.weight.main_grad.detach().clone()
    # Megatron's own reduction of the tracker: variance averaged over all ranks (each holds its
    # gather group's value); orthogonality summed over TP×CP (each holds its tokens' share),
    # averaged over DP
    reduce_aux_losses_tracker_across_ranks()
    tracker = get_moe_layer_wise_logging_tracker()
    dist_logged = {
        n: tracker[n]["values"][0].item() for n in ("variance_loss", "orthogonality_loss")
    }

    # --- units of each loss: gather groups (variance) and data-parallel replicas (orthogonality)
    # ---
    replica_of = [None] * world
    dist.all_gather_object(replica_of, my_replica)
    if case["gather"] == "global_batch":
        my_set = list(range(num_replicas))
    else:
        ep_ranks = dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())
        my_set = sorted({replica_of[r] for r in ep_ranks} | {my_replica})
    all_sets = [None] * world
    dist.all_gather_object(all_sets, my_set)
    gather_sets = sorted({tuple(s) for s in all_sets})

    def valid_count(pad, members):
        return S * B * len(members) if pad is None else int(sum((~pad[j]).sum() for j in members))

    total_valid = sum(valid_count(pad, range(num_replicas)) for _, pad in data)

    def unit_weight(pad, members, num_units):
        # what the schedule optimises: mean over micro-batches and units, or per-token weights
        return (
            valid_count(pad, members) / total_valid
            if case["per_token"]
            else 1.0 / (num_units * NUM_MICROBATCHES)
        )

    # --- variance reference: a one-rank DPSLRouter on each gather group's tokens ---
    ref_config = _config(
        dict(case, tp=1, cp=1, ep=1, etp=1, per_token=False),
        expert_tensor_parallel_size=1,
        moe_router_load_balancing_type=["variance"],
        moe_aux_loss_coeff=[GAMMA],
    )
    ref_router = DPSLRouter(ref_config, pg_collection=singleton_pg)
    ref_router.set_layer_number(1)
    ref_router.train()
    ref_router.weight.data.copy_(router_weight)
    ref_logged = {"variance_loss": 0.0, "orthogonality_loss": 0.0}
    for x, pad in data:
        for gset in gather_sets:
            xs = torch.cat([x[j] for j in gset], dim=1)  # [S, B·|gset|, H]
            pad_s = (
                None if pad is None else torch.cat([pad[j] for j in gset], dim=0).t()
            )  # [S, B·|gset|]
            clear_aux_losses_tracker()
            MoEAuxLossAutoScaler.set_loss_scale(
                torch.tensor(unit_weight(pad, gset, len(gather_sets)))
            )
            probs, _ = ref_router(xs, padding_mask=pad_s)
            (probs * 0).sum().backward()
            ref_logged["variance_loss"] += get_moe_layer_wise_logging_tracker()["variance_loss"][
                "values"
            ][0].item() / len(gather_sets)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    ref_router_grad = ref_router.weight.grad.detach()

    # --- orthogonality reference: plain-torch experts on each replica's tokens ---
    leaves = [
        (w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)) for w1, w2 in weights
    ]
    objective = 0.0
    for x, pad in data:
        for j in range(num_replicas):
            with torch.no_grad():
                _, routing_map = ref_router(x[j])
            loss = _reference_orthogonality(
                x[j], None if pad is None else pad[j], routing_map, leaves, case["form"]
            )
            objective = objective + unit_weight(pad, [j], num_replicas) * loss
            ref_logged["orthogonality_loss"] += loss.item() / num_replicas
    objective.backward()

    router_diff = (dist_router_grad - ref_router_grad).abs().max().item()
    expert_diff, expert_ref_max = 0.0, 0.0
    for e, rows, expert in shards:
        for dist_p, ref_grad in (
            (expert.linear_fc1.weight, leaves[e][0].grad[rows]),
            (expert.linear_fc2.weight, leaves[e][1].grad[:, rows]),
        ):
            expert_diff = max(expert_diff, (dist_p.main_grad - ref_grad).abs().max().item())
            expert_ref_max = max(expert_ref_max, ref_grad.abs().max().item())
    loss_diff = max(abs(dist_logged[n] - ref_logged[n]) for n in dist_logged)
    stats = torch.tensor(
        [router_diff, expert_diff, loss_diff, ref_router_grad.abs().max().item(), expert_ref_max],
        dtype=torch.float64,
    )
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return dict(
        name=case["name"],
        world=world,
        max_router_grad_diff=stats[0].item(),
        max_expert_grad_diff=stats[1].item(),
        max_loss_diff=stats[2].item(),
        ref_router_grad_max=stats[3].item(),
        ref_expert_grad_max=stats[4].item(),
        ref_logged=ref_logged,
        dist_logged=dist_logged,
        gather_groups=[list(s) for s in gather_sets],
    )


if __name__ == "__main__":
    exactness.main(__doc__, CASES, run_case, setup=install_alltoall_shims)
