"""torchrun worker: the distributed AC router vs an unsharded single-process reference (forward and
backward).

Launched by tests/distributed/test_ac_distributed.py; by hand:

    PYTHONPATH=.:tests python -m torch.distributed.run --nproc-per-node 2 --master-port 29621 \
        tests/support/workers/ac_exactness_worker.py --out /tmp/ac_2.json
    PYTHONPATH=.:tests python -m torch.distributed.run --nproc-per-node 4 --master-port 29622 \
        tests/support/workers/ac_exactness_worker.py --out /tmp/ac_4.json

For every layout in CASES[world_size] it builds a chain of three real routers from
``megatron_dpsl.models.specs.router_for`` (``ACRouter`` sharing one ``ACRoutingState``: layer 1
standard, layers 2 and 3 AC) with Megatron's process groups, joined token-locally
(``h ← h + tanh(probs @ P_l)``), wraps the chain in Megatron's ``DistributedDataParallel`` and runs
two micro-batches through Megatron's ``forward_step_calc_loss`` and ``finalize_model_grads`` (DDP
averaging over dp×cp, TP sum of sequence-parallel grads), LM loss ``Σ out·T``. The router is the
only place tokens meet, through the AC dispersion statistics (and DPSL where enabled), so what this
compares is exactly the cross-rank part.

The reference is the same chain with one-rank process groups and the same weights, fed the
unsharded tokens of each set of replicas that shares statistics (the TP×CP shards of a micro-batch,
plus the EP peers' micro-batches, as DPSL's ``"micro_batch"`` gather); its objective is the mean
over micro-batches and data-parallel replicas. Rank 0 writes one JSON record per layout: the largest
differences of the AC layers' probabilities, routing maps and router-weight gradients, and how far
the probabilities move when the statistics are left unreduced (the test's teeth).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from support.megatron_cpu import init_torchrun
from support.workers import _exactness as exactness

S, B, H, E = 8, 4, 16, 4  # sequence, micro-batch size per replica, hidden, experts
NUM_MICROBATCHES = 2

# name, tp, cp, ep, etp, dpsl on, padding
CASES = {
    2: [
        dict(name="tp2_sp", tp=2, padding=True),
        dict(name="cp2", cp=2),
        dict(name="ep2", ep=2, padding=True),
        dict(name="dp2", padding=True),
        dict(name="tp2_sp_ac_dpsl", tp=2, dpsl=True),
        dict(name="ep2_ac_dpsl", ep=2, dpsl=True, padding=True),
        # two pipeline stages of a GPTModel: layer 3, first on stage 2, has no predecessor there
        dict(name="pp2_stage_boundary", kind="pipeline"),
    ],
    4: [
        dict(name="tp2_ep2_etp1", tp=2, ep=2, etp=1, padding=True),
        dict(name="tp2_ep2_etp2", tp=2, ep=2, etp=2, dpsl=True),
        dict(name="tp2_cp2", tp=2, cp=2, padding=True),
        dict(name="cp2_dp2", cp=2),
        # EP group spans two TP groups: each micro-batch's sums enter the EP all-reduce twice
        dict(name="tp2_ep4_etp1", tp=2, ep=4, etp=1, dpsl=True, padding=True),
    ],
}


def _case_defaults(case):
    return exactness.with_layout(case, dpsl=False, padding=False)


def _config(case):
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    # DPSL alone: Megatron's aux_loss under EP is a per-replica loss, not one over the EP set the
    # reference concatenates (its own exactness is Megatron's business)
    lb = (
        dict(moe_router_load_balancing_type="dpsl", moe_dpsl_coeff=0.5)
        if case["dpsl"]
        else dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    )
    return DPSLTransformerConfig(
        num_layers=3,
        hidden_size=H,
        ffn_hidden_size=8,
        num_attention_heads=4,
        num_moe_experts=E,
        moe_router_topk=2,
        moe_ac_layers=[2, 3],
        moe_dpsl_log_interval=0,
        moe_token_dispatcher_type="allgather",
        tensor_model_parallel_size=case["tp"],
        context_parallel_size=case["cp"],
        expert_model_parallel_size=case["ep"],
        expert_tensor_parallel_size=case["etp"],
        sequence_parallel=case["tp"] > 1,
        add_bias_linear=False,
        use_cpu_initialization=True,
        init_method_std=0.5,
        **lb,
    )


def _chain_class():
    from megatron.core.transformer.module import MegatronModule

    from megatron_dpsl.models.specs import router_for

    class Chain(MegatronModule):
        """Three routers of one model chunk, joined token-locally: h ← h + tanh(probs @ P_l)."""

        def __init__(self, config, pg_collection):
            super().__init__(config)
            make = router_for(config)  # what the specs put in MoESubmodules.router
            self.routers = torch.nn.ModuleList()
            for n in (1, 2, 3):
                router = make(config=config, pg_collection=pg_collection)
                router.set_layer_number(n)
                self.routers.append(router)
            g = torch.Generator().manual_seed(11)
            self.register_buffer("mix", torch.randn(3, E, H, generator=g))

        def forward(self, x, padding_mask=None):
            h, routed = x, []
            for router, mix in zip(self.routers, self.mix):
                probs, routing_map = router(h, padding_mask=padding_mask)
                routed.append((probs.detach(), routing_map))
                h = h + torch.tanh(probs.to(h.dtype) @ mix).view_as(h)
            return h, routed

    return Chain


def _global_data(case, num_replicas):
    """Same on every rank: per micro-batch: x, T [R, S, B, H], padding [R, B, S] (True =
    padding)."""
    gen = torch.Generator().manual_seed(7)
    data = []
    for _ in range(NUM_MICROBATCHES):
        x = torch.randn(num_replicas, S, B, H, generator=gen)
        target = torch.randn(num_replicas, S, B, H, generator=gen)
        pad = torch.rand(num_replicas, B, S, generator=gen) < 0.25 if case["padding"] else None
        data.append((x, target, pad))
    return data


def _shard_sb(t, tp_group, cp_group):
    """This rank's part of ``[S, B, ...]``: Megatron's 2×CP load-balanced chunks, then the SP
    rows."""
    import inspect

    from megatron.core.utils import get_batch_on_this_cp_rank

    # megatron-core 0.19 added a required is_hybrid_cp argument
    extra = (
        {"is_hybrid_cp": False}
        if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters
        else {}
    )
    t = get_batch_on_this_cp_rank(
        {"t": t.transpose(0, 1).contiguous()}, cp_group=cp_group, **extra
    )["t"].transpose(0, 1)
    rows = t.shape[0] // tp_group.size()
    return t[tp_group.rank() * rows : (tp_group.rank() + 1) * rows].contiguous()


def run_pipeline_case(case):
    """GPTModel in two pipeline stages (layers 1-2 | 3-4, every layer MoE), one forward, hidden
    states sent by hand. Stage 2's first AC layer (3) must route as if it were standard, while layer
    4 uses layer 3's assignment: outputs with ``moe_ac_layers`` [2, 3, 4] equal [2, 4] and differ
    from
        [2]."""
    import warnings

    from megatron.core.models.gpt import GPTModel

    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig
    from megatron_dpsl.models.specs import get_dpsl_decoder_block_spec

    init_torchrun(pipeline_model_parallel_size=2)
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 32, (B, S), generator=gen)
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    mask = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), 1)

    def stage_output(ac_layers):
        config = DPSLTransformerConfig(
            num_layers=4,
            hidden_size=H,
            ffn_hidden_size=8,
            num_attention_heads=4,
            num_moe_experts=E,
            moe_router_topk=2,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_ac_layers=ac_layers,
            moe_token_dispatcher_type="allgather",
            pipeline_model_parallel_size=2,
            pipeline_dtype=torch.float32,
            use_cpu_initialization=True,
            add_bias_linear=False,
            init_method_std=0.5,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        torch.manual_seed(5)  # the same weights for every variant
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_dpsl_decoder_block_spec(config),
            vocab_size=32,
            max_sequence_length=S,
            pre_process=rank == 0,
            post_process=rank == 1,
            share_embeddings_and_output_weights=False,
        )
        layers = [layer.layer_number for layer in model.decoder.layers]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if rank == 0:
                hidden = model(tokens, pos, mask)  # [S, B, H]
                dist.send(hidden.detach().contiguous(), dst=1)
                out = hidden
            else:
                received = torch.empty(S, B, H)
                dist.recv(received, src=0)
                model.set_input_tensor(received)
                out = model(None, pos, mask)  # logits [B, S, vocab]
        warned = [str(w.message) for w in caught if "routes without AC" in str(w.message)]
        return out.detach(), layers, warned

    full, layers, warned = stage_output([2, 3, 4])
    skip3, _, _ = stage_output([2, 4])
    only2, _, _ = stage_output([2])
    flags = torch.tensor(
        [
            float(torch.equal(full, skip3)),
            float(not torch.allclose(full, only2)) if rank == 1 else 1.0,
            float(len(warned) == (1 if rank == 1 else 0)),
        ]
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    all_layers = [None] * dist.get_world_size()
    dist.all_gather_object(all_layers, layers)
    return dict(
        name=case["name"],
        world=dist.get_world_size(),
        stage_layers=all_layers,
        first_ac_layer_of_stage_is_standard=bool(flags[0]),
        later_ac_layer_uses_hand_over=bool(flags[1]),
        warned_once_on_stage_2=bool(flags[2]),
    )


def run_case(case, singleton_pg):
    if case.get("kind") == "pipeline":
        return run_pipeline_case(case)
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
    )

    from megatron_dpsl.routing.ac.router import ACRouter

    case = _case_defaults(case)
    exactness.init_layout(case)
    config = _config(case)
    Chain = _chain_class()
    torch.manual_seed(1234)
    chain = Chain(config, ProcessGroupCollection.use_mpu_process_groups())
    assert all(isinstance(r, ACRouter) for r in chain.routers)
    assert [r.ac_enabled for r in chain.routers] == [False, True, True]
    for r in chain.routers:
        dist.broadcast(r.weight.data, src=0)  # the reference uses these exact weights
    weights0 = [r.weight.detach().clone() for r in chain.routers]
    chain.model_type = ModelType.encoder_or_decoder  # what the schedule reads off a GPTModel
    model = exactness.wrap_ddp(config, chain)

    tp_group = parallel_state.get_tensor_model_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    num_replicas = parallel_state.get_data_parallel_world_size()  # dense DP (EP ranks are in it)
    my_replica = parallel_state.get_data_parallel_rank()
    data = _global_data(case, num_replicas)

    # --- which replicas share statistics (the test's own bookkeeping, not the router's) ---
    world = dist.get_world_size()
    replica_of = [None] * world
    dist.all_gather_object(replica_of, my_replica)
    ep_ranks = dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())
    my_set = sorted({replica_of[r] for r in ep_ranks} | {my_replica})
    all_sets = [None] * world
    dist.all_gather_object(all_sets, my_set)
    stat_sets = sorted({tuple(s) for s in all_sets})
    num_sets = len(stat_sets)

    # --- distributed: Megatron's forward_step_calc_loss, plain backward, finalize_model_grads ---
    routed_dist = []

    def forward_step(micro_batch):
        x, target, pad = data[micro_batch]
        x_local = _shard_sb(x[my_replica], tp_group, cp_group)
        t_local = _shard_sb(target[my_replica], tp_group, cp_group)
        pad_local = (
            None if pad is None else _shard_sb(pad[my_replica].t(), tp_group, cp_group)
        )  # [s, b]
        out, routed = model(x_local, padding_mask=pad_local)
        routed_dist.append(routed)

        def loss_func(output):
            return (output * t_local).sum(), {}

        return out, loss_func

    clear_aux_losses_tracker()
    model.zero_grad_buffer()
    for mb in range(NUM_MICROBATCHES):
        output, loss_func = forward_step(mb)
        loss, _ = forward_step_calc_loss(
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
        torch.autograd.backward(loss)
    finalize_model_grads([model], None)
    dist_grads = [r.weight.main_grad.detach().clone() for r in chain.routers]

    # the same forward with the statistics left unreduced: how much the reduction matters here
    for r in chain.routers:
        if r._ac_sum is not None:
            r._ac_sum.groups = []
    with torch.no_grad():
        x, _, pad = data[0]
        pad_local = None if pad is None else _shard_sb(pad[my_replica].t(), tp_group, cp_group)
        _, routed_local = chain(
            _shard_sb(x[my_replica], tp_group, cp_group), padding_mask=pad_local
        )

    # --- unsharded single-process reference ---
    ref_case = dict(case, tp=1, cp=1, ep=1, etp=1)
    ref = Chain(_config(ref_case), singleton_pg)
    ref.train()
    for r, w in zip(ref.routers, weights0):
        r.weight.data.copy_(w)
    # DPSL's objective: the mean over micro-batches and over gather groups (docs/parallelism.md)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / (num_sets * NUM_MICROBATCHES)))
    probs_diff, map_diff, unreduced_diff = 0.0, 0, 0.0
    for mb, (x, target, pad) in enumerate(data):
        for sset in stat_sets:
            xs = torch.cat([x[j] for j in sset], dim=1)  # [S, B * |set|, H]
            ts = torch.cat([target[j] for j in sset], dim=1)
            pads = (
                None if pad is None else torch.cat([pad[j] for j in sset], dim=0).t()
            )  # [S, B * |set|]
            out, routed_ref = ref(xs, padding_mask=pads)
            # LM objective: mean over replicas (DDP) and micro-batches of Σ out·T
            ((out * ts).sum() / (num_replicas * NUM_MICROBATCHES)).backward()
            if list(sset) != my_set:
                continue
            # this rank's tokens inside the reference's [S * B*|set|] (s-major) order
            cols = sset.index(my_replica) * B + torch.arange(B)
            index = torch.arange(S).unsqueeze(1) * (B * len(sset)) + cols.unsqueeze(0)  # [S, B]
            mine = _shard_sb(index, tp_group, cp_group).reshape(-1)
            for layer in (1, 2):  # the AC layers
                p_ref, m_ref = routed_ref[layer][0][mine], routed_ref[layer][1][mine]
                p_dist, m_dist = routed_dist[mb][layer]
                probs_diff = max(probs_diff, (p_dist - p_ref).abs().max().item())
                map_diff += int((m_dist != m_ref).sum())
                if mb == 0:
                    unreduced_diff = max(
                        unreduced_diff, (routed_local[layer][0] - p_ref).abs().max().item()
                    )
    ref_grads = [r.weight.grad.detach() for r in ref.routers]
    # AC matters on this data: the reference with AC switched off routes some tokens differently
    x, _, pad = data[0]
    xs = torch.cat([x[j] for j in stat_sets[0]], dim=1)
    pads = None if pad is None else torch.cat([pad[j] for j in stat_sets[0]], dim=0).t()
    with torch.no_grad():
        _, with_ac = ref(xs, padding_mask=pads)
        for r in ref.routers:
            r._ac_layers = frozenset()
        _, without_ac = ref(xs, padding_mask=pads)
    ac_changed = sum(int((a[1] != b[1]).any(-1).sum()) for a, b in zip(with_ac[1:], without_ac[1:]))
    grad_diff = max((d - g).abs().max().item() for d, g in zip(dist_grads, ref_grads))
    ref_grad_max = max(g.abs().max().item() for g in ref_grads)
    stats = torch.tensor(
        [grad_diff, probs_diff, float(map_diff), ref_grad_max, unreduced_diff], dtype=torch.float64
    )
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    return dict(
        name=case["name"],
        world=world,
        max_grad_diff=stats[0].item(),
        max_probs_diff=stats[1].item(),
        routing_map_mismatches=int(stats[2].item()),
        ref_grad_max=stats[3].item(),
        unreduced_probs_diff=stats[4].item(),
        tokens_rerouted_by_ac=ac_changed,
        stat_sets=[list(s) for s in stat_sets],
        sharded_statistics=tp_group.size() * cp_group.size() > 1 or len(my_set) > 1,
    )


if __name__ == "__main__":
    exactness.main(__doc__, CASES, run_case)
