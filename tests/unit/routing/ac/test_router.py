"""ACRouter in one process: AC gating against TopKRouter on reweighted tokens, AC + DPSL, the
hand-over between layers (micro-batches, pipeline-stage boundary, activation recompute), specs,
GPTModel.

Real Megatron modules (TopKRouter, MoELayer, TransformerBlock, GPTModel, tensor_parallel.checkpoint)
on CPU with the shims of tests/megatron_cpu.py.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from support.common import moe_tracked, pg
from support.configs import moe_config
from support.megatron_cpu import init_single_process

H, E = 16, 8


pytestmark = pytest.mark.usefixtures("fresh_moe_losses")


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    init_single_process()
    yield


def make_config(**over):
    fields = dict(num_layers=4, moe_ac_layers=[2, 3, 4], hidden_dropout=0.0, attention_dropout=0.0)
    return moe_config(**{**fields, **over})


def ac_routers(cfg, layers, state=None, seed=0):
    """ACRouters for ``layers`` sharing one ``ACRoutingState`` (a model chunk), in training mode."""
    from megatron_dpsl.routing.ac.router import ACRouter
    from megatron_dpsl.routing.ac.state import ACRoutingState

    state = state if state is not None else ACRoutingState()
    torch.manual_seed(seed)
    out = []
    for n in layers:
        r = ACRouter(cfg, pg_collection=pg(), ac_state=state)
        r.set_layer_number(n)
        r.train()
        out.append(r)
    return out, state


def topk_twin(router, cfg=None):
    """A stock TopKRouter with ``router``'s weights (and layer number)."""
    from megatron.core.transformer.moe.router import TopKRouter

    t = TopKRouter(cfg or router.config, pg_collection=pg())
    t.load_state_dict(router.state_dict())
    t.set_layer_number(router.layer_number)
    t.train()
    return t


def hidden(s=12, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(s, b, H, generator=g)


def expected_top1(probs, routing_map, pad=None):
    top1 = probs.detach().argmax(-1)
    ok = routing_map.any(-1) if pad is None else routing_map.any(-1) & ~pad.reshape(-1)
    return torch.where(ok, top1, torch.full_like(top1, -1))


def scaled_input(x, clusters, cfg):
    """m ⊙ x from the math module (what the AC layer must feed its router weight)."""
    from megatron_dpsl.routing.ac.clustering import adaptive_clustering_weights, token_scales

    flat = x.reshape(-1, H)
    w = adaptive_clustering_weights(
        flat, clusters, E, eps=cfg.moe_ac_eps, clip=cfg.moe_ac_clip, norm=cfg.moe_ac_weight_norm
    )
    return x * token_scales(w, clusters).reshape(x.shape)


# ---------------------------------------------------------------- one router
def test_state_dict_is_topk_routers():
    cfg = make_config(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")
    (r,), _ = ac_routers(cfg, [2])
    assert list(r.state_dict()) == list(topk_twin(r).state_dict())


def test_standard_layers_route_like_topk_router_and_publish_top1():
    cfg = make_config()
    (r1,), state = ac_routers(cfg, [1])  # layer 1: not in moe_ac_layers
    t1 = topk_twin(r1)
    x = hidden().requires_grad_(True)
    xt = x.detach().clone().requires_grad_(True)
    p, m = r1(x)
    pt, mt = t1(xt)
    assert torch.equal(p, pt) and torch.equal(m, mt)
    p.pow(2).sum().backward()
    pt.pow(2).sum().backward()
    assert torch.equal(r1.weight.grad, t1.weight.grad) and torch.equal(x.grad, xt.grad)
    assert torch.equal(state.clusters_from(1), expected_top1(p, m))


@pytest.mark.parametrize(
    "over",
    [
        {},
        dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
        dict(moe_router_dtype="fp32"),
        dict(moe_ac_weight_norm="cluster", moe_ac_clip=None),
        dict(moe_ac_weight_norm="global", moe_ac_clip=1.5),
    ],
    ids=["softmax", "sigmoid_bias", "fp32_router", "cluster_noclip", "global_clip1.5"],
)
def test_ac_layer_is_topk_router_on_reweighted_tokens(over):
    """Layer 2 routes exactly like TopKRouter fed m ⊙ h, m from layer 1's top-1 (forward and
    backward)."""
    cfg = make_config(**over)
    (r1, r2), state = ac_routers(cfg, [1, 2])
    x1, x2 = hidden(seed=1), hidden(seed=2).requires_grad_(True)
    p1, m1 = r1(x1)
    clusters = expected_top1(p1, m1)
    p2, m2 = r2(x2)
    t2 = topk_twin(r2)
    x2t = x2.detach().clone().requires_grad_(True)
    pt, mt = t2(scaled_input(x2t, clusters, cfg))
    assert torch.equal(m2, mt) and torch.equal(p2, pt)  # the same fp32 ops on the same numbers
    _, m_plain = topk_twin(r2)(x2.detach())
    assert not torch.equal(m2, m_plain)  # AC changed some routing decisions: the check has teeth
    target = torch.randn_like(p2)
    (p2 * target).sum().backward()
    (pt * target).sum().backward()
    # the statistics carry no gradient: d/dx of (m ⊙ x) W^T with m constant, bit for bit
    assert torch.equal(r2.weight.grad, t2.weight.grad) and torch.equal(x2.grad, x2t.grad)
    assert torch.equal(state.clusters_from(2), expected_top1(p2, m2))


@pytest.mark.filterwarnings("ignore:index_reduce")  # the official code's call; beta in torch
def test_global_clip_1_5_routes_like_the_official_swin_compute_cosa():
    """``moe_ac_weight_norm="global", moe_ac_clip=1.5``: layer 2's probabilities are those of
    TopKRouter fed ``compute_cosa(h, previous top-k) ⊙ h``, the official Swin code transcribed in
    tests/support/ac_official.py, with the previous top-k as Tutel forms it (sorted torch.topk of
    layer 1's scores: column 0 is our cluster)."""
    from support import ac_official

    cfg = make_config(moe_ac_weight_norm="global", moe_ac_clip=1.5)
    (r1, r2), state = ac_routers(cfg, [1, 2])
    x1, x2 = hidden(s=32, seed=1), hidden(s=32, seed=2)
    p1, m1 = r1(x1)
    topk = torch.topk(torch.softmax(r1.gating(x1).reshape(-1, E), -1), 2, dim=1).indices
    assert torch.equal(state.clusters_from(1), topk[:, 0])  # the cluster id: column 0
    assert set(topk[:, 0].tolist()) == set(range(E))  # no empty cluster: the official row count
    p2, m2 = r2(x2)
    flat = x2.reshape(-1, H)
    pt, mt = topk_twin(r2)(ac_official.compute_cosa(flat, topk).reshape(x2.shape) * x2)
    assert torch.equal(m2, mt)
    # fp32 statistics summed in another order (index_add vs index_reduce), then the same router
    torch.testing.assert_close(p2, pt, rtol=1e-5, atol=1e-6)
    default_recipe = topk_twin(r2)(scaled_input(x2, topk[:, 0], make_config()))[0]
    assert not torch.allclose(p2, default_recipe)  # the recipe is not the default's


def test_ac_with_dpsl_shapes_the_ac_probabilities():
    from megatron_dpsl.losses.dpsl import dpsl_loss

    cfg = make_config(
        moe_router_load_balancing_type=["aux_loss", "dpsl"],
        moe_aux_loss_coeff=[1e-2, 0.0],
        moe_dpsl_coeff=0.3,
        moe_dpsl_alpha=0.75,
    )
    (r1, r2), _ = ac_routers(cfg, [1, 2])
    p1, m1 = r1(hidden(seed=1))
    x2 = hidden(seed=2)
    r2(x2)
    logits = scaled_input(x2, expected_top1(p1, m1), cfg).reshape(-1, H) @ r2.weight.detach().t()
    ref = 0.3 * dpsl_loss(
        torch.softmax(logits.float(), -1), torch.full((E,), 0.75, dtype=torch.float64)
    )
    # the tracker keeps one row per layer (row 1: layer 2); same fp32 math, another matmul kernel
    torch.testing.assert_close(moe_tracked("dpsl_loss")[1], ref, rtol=1e-6, atol=1e-7)
    assert moe_tracked("load_balancing_loss")[1] > 0


def test_padding_is_excluded_from_statistics_and_hand_over():
    cfg = make_config()
    (r1, r2), state = ac_routers(cfg, [1, 2])
    x1, x2 = hidden(seed=1), hidden(seed=2)
    pad = torch.zeros(x1.shape[:2], dtype=torch.bool)
    pad[-3:] = True
    p1, m1 = r1(x1, padding_mask=pad)
    assert (state.clusters_from(1)[pad.reshape(-1)] == -1).all()
    p2, _ = r2(x2, padding_mask=pad)
    x2b = x2.clone()
    x2b[-3:] = 1e3 * torch.randn_like(x2b[-3:])  # padding tokens must not move the weights
    r1(x1, padding_mask=pad)
    p2b, _ = r2(x2b, padding_mask=pad)
    valid = ~pad.reshape(-1)
    assert torch.equal(p2[valid], p2b[valid])


def test_fully_dropped_tokens_hand_over_no_cluster():
    cfg = make_config(
        moe_expert_capacity_factor=0.25,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.0,
    )
    (r1,), state = ac_routers(cfg, [1])
    p, m = r1(hidden())
    dropped = ~m.any(-1)
    assert dropped.any()  # capacity 0.25 drops some tokens entirely: the case is exercised
    assert torch.equal(state.clusters_from(1), expected_top1(p, m))
    assert (state.clusters_from(1)[dropped] == -1).all()


def test_bf16_tokens_with_fp32_router():
    cfg = make_config(moe_router_dtype="fp32")
    (r1, r2), _ = ac_routers(cfg, [1, 2])
    for r in (r1, r2):
        r.to(torch.bfloat16)
    p1, m1 = r1(hidden(seed=1).bfloat16())
    x2 = hidden(seed=2).bfloat16()
    p2, m2 = r2(x2)
    t2 = topk_twin(r2)
    pt, mt = t2(
        scaled_input(x2.float(), expected_top1(p1, m1), cfg)
    )  # statistics in fp32 from bf16 values
    assert torch.equal(m2, mt) and torch.equal(p2, pt)


# ---------------------------------------------------------------- the hand-over
def test_first_ac_layer_of_a_pipeline_stage_routes_without_ac():
    """Stage 2 holds layers 3 and 4 (its own state); layer 3's predecessor (2) is on stage 1."""
    cfg = make_config()
    (r3, r4), state = ac_routers(cfg, [3, 4])
    x3, x4 = hidden(seed=3), hidden(seed=4)
    for micro_batch in range(
        2
    ):  # the second micro-batch finds layer 4's slot: still no predecessor
        if micro_batch == 0:
            with pytest.warns(UserWarning, match="layer 3.*MoE layer 2.*another pipeline stage"):
                p3, m3 = r3(x3)
        else:
            p3, m3 = r3(x3)
        pt, mt = topk_twin(r3)(x3)
        assert torch.equal(p3, pt) and torch.equal(m3, mt)
        p4, m4 = r4(x4)
        pt4, mt4 = topk_twin(r4)(scaled_input(x4, expected_top1(p3, m3), cfg))
        assert torch.equal(p4, pt4) and torch.equal(m4, mt4)


def test_predecessor_skips_dense_layers():
    cfg = make_config(moe_layer_freq=[1, 0, 1, 1], moe_ac_layers=[3, 4])
    (r1, r3), _ = ac_routers(cfg, [1, 3])
    p1, m1 = r1(hidden(seed=1))
    x3 = hidden(seed=3)
    p3, m3 = r3(x3)
    pt, mt = topk_twin(r3)(scaled_input(x3, expected_top1(p1, m1), cfg))
    assert torch.equal(p3, pt)


def test_routers_of_another_chunk_do_not_see_this_chunks_slot():
    cfg = make_config()
    (r1,), _ = ac_routers(cfg, [1])
    (r2,), _ = ac_routers(cfg, [2])  # a different state: another chunk
    r1(hidden(seed=1))
    x2 = hidden(seed=2)
    with pytest.warns(UserWarning, match="layer 2"):
        p2, _ = r2(x2)
    assert torch.equal(p2, topk_twin(r2)(x2)[0])


def test_needs_the_shared_state_and_a_dpsl_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dpsl.routing.ac.router import ACRouter

    with pytest.raises(TypeError, match="ac_state shared by the routers"):
        ACRouter(make_config(), pg_collection=pg())
    stock = TransformerConfig(
        num_layers=2, hidden_size=H, num_attention_heads=4, num_moe_experts=E, moe_router_topk=2
    )
    with pytest.raises(TypeError, match="DPSLTransformerConfig"):
        ACRouter(stock, pg_collection=pg(), ac_state=None)


def test_training_forward_without_gradient_leaves_no_stale_replay(monkeypatch):
    from megatron_dpsl.routing.ac import state as ac_state_module

    cfg = make_config()
    (r1, r2), state = ac_routers(cfg, [1, 2])
    x1, x2 = hidden(seed=1), hidden(seed=2)
    with torch.no_grad():  # training mode without gradient: looks like a checkpointed forward
        r1(x1)
        r2(x2)
    assert state.num_pending(2) == 1
    r1(x1)
    r2(x2)  # a plain training forward: the entry can never be replayed and is dropped
    assert state.num_pending(2) == 0
    monkeypatch.setattr(ac_state_module, "MAX_PENDING", 2)
    with torch.no_grad():
        for _ in range(2):
            r1(x1)
            r2(x2)
        r1(x1)
        with pytest.raises(RuntimeError, match="evaluation mode"):
            r2(x2)


def test_evaluation_uses_ac_and_queues_nothing():
    cfg = make_config()
    (r1, r2), state = ac_routers(cfg, [1, 2])
    x1, x2 = hidden(seed=1), hidden(seed=2)
    p1, m1 = r1(x1)
    p2, _ = r2(x2)
    for r in (r1, r2):
        r.eval()
    with torch.no_grad():
        r1(x1)
        p2_eval, _ = r2(x2)
    assert torch.equal(p2_eval, p2) and state.num_pending(2) == 0


def test_non_reentrant_checkpoint_is_refused_loudly():
    cfg = make_config()
    (r1, r2), _ = ac_routers(cfg, [1, 2])
    r1(hidden(seed=1))
    x2 = hidden(seed=2).requires_grad_(True)
    probs = torch.utils.checkpoint.checkpoint(lambda t: r2(t)[0], x2, use_reentrant=False)
    with pytest.raises(RuntimeError, match="non-reentrant checkpointing is not supported"):
        probs.sum().backward()


# ---------------------------------------------------------------- specs
def spec_router(layer_spec):
    """``MoESubmodules.router`` of a GPT layer spec: megatron-core 0.16 ``ModuleSpec(MoELayer,
    submodules=...)``,
    0.19 ``functools.partial(MoELayer, submodules=...)``."""
    mlp = layer_spec.submodules.mlp
    return (
        mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules
    ).router


def test_specs_put_ac_router_with_one_state_per_spec_call():
    from megatron_dpsl.models.specs import (
        get_dpsl_decoder_block_spec,
        get_dpsl_layer_spec,
        router_for,
    )
    from megatron_dpsl.routing.ac.router import ACRouter
    from megatron_dpsl.routing.router import DPSLRouter

    cfg = make_config()
    assert router_for(make_config(moe_ac_layers=None)) is DPSLRouter
    a, b = router_for(cfg), router_for(cfg)
    assert isinstance(a, functools.partial) and a.func is ACRouter
    assert a.keywords["ac_state"] is not b.keywords["ac_state"]
    layer_spec = get_dpsl_layer_spec(cfg)
    assert spec_router(layer_spec).func is ACRouter
    block = get_dpsl_decoder_block_spec(cfg)
    routers = {id(spec_router(s).keywords["ac_state"]) for s in block.layer_specs}
    assert len(routers) == 1  # every MoE layer of the block shares one state
    copied = copy.deepcopy(block)  # a copy (another chunk) gets its own, shared by its layers
    copies = {id(spec_router(s).keywords["ac_state"]) for s in copied.layer_specs}
    assert len(copies) == 1 and copies != routers


# ---------------------------------------------------------------- GPTModel
def gpt(cfg, seed=0):
    from megatron.core.models.gpt import GPTModel

    from megatron_dpsl.models.specs import get_dpsl_decoder_block_spec

    torch.manual_seed(seed)
    return GPTModel(
        config=cfg,
        transformer_layer_spec=get_dpsl_decoder_block_spec(cfg),
        vocab_size=32,
        max_sequence_length=8,
    )


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32, (2, 8), generator=g)
    pos = torch.arange(8).unsqueeze(0).expand(2, 8)
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), 1)
    target = torch.randn(2, 8, 32, generator=g)
    return tokens, pos, mask, target


def routers_of(model):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m.router for m in model.modules() if isinstance(m, MoELayer)]


def test_gpt_model_uses_ac_layers_and_micro_batches_do_not_leak():
    cfg = make_config(
        moe_router_load_balancing_type=["aux_loss", "dpsl"], moe_aux_loss_coeff=[1e-2, 0.0]
    )
    model = gpt(cfg)
    fresh = gpt(cfg)  # same seed: same weights; its own spec call: its own state
    rs = routers_of(model)
    assert [r.ac_enabled for r in rs] == [False, True, True, True]
    assert (
        len({id(r._ac_state) for r in rs}) == 1
        and rs[0]._ac_state is not routers_of(fresh)[0]._ac_state
    )
    tokens_a, pos, mask, target = batch(1)
    tokens_b, _, _, _ = batch(2)
    out_a = model(tokens_a, pos, mask)
    (out_a * target).sum().backward()
    out_b = model(tokens_b, pos, mask)
    assert torch.equal(out_b, fresh(tokens_b, pos, mask))  # nothing of micro-batch A reached B
    plain = gpt(
        make_config(
            moe_ac_layers=None,
            moe_router_load_balancing_type=["aux_loss", "dpsl"],
            moe_aux_loss_coeff=[1e-2, 0.0],
        )
    )
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(tokens_b, pos, mask), out_b)  # AC is active in the model


RECOMPUTE = {
    "full_uniform_1": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    ),
    "full_uniform_2": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2
    ),
    "selective_moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
}


def _grads_two_micro_batches(model, interleave):
    """Forward A, forward B, backward A, backward B (pipeline-like) or A then B; summed grads,
    outputs."""
    outs, losses = [], []
    batches = [batch(1), batch(2)]
    if interleave:
        for tokens, pos, mask, target in batches:
            out = model(tokens, pos, mask)
            outs.append(out.detach())
            losses.append((out * target).sum())
        for loss in losses:
            loss.backward()
    else:
        for tokens, pos, mask, target in batches:
            out = model(tokens, pos, mask)
            outs.append(out.detach())
            (out * target).sum().backward()
    return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(RECOMPUTE))
def test_activation_recompute_replays_the_original_assignment(name, monkeypatch):
    lb = dict(moe_router_load_balancing_type=["aux_loss", "dpsl"], moe_aux_loss_coeff=[1e-2, 0.0])
    reference = gpt(make_config(**lb))
    ref_outs, ref_grads = _grads_two_micro_batches(reference, interleave=False)
    model = gpt(make_config(**lb, **RECOMPUTE[name]))
    outs, grads = _grads_two_micro_batches(model, interleave=True)
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)
    assert grads.keys() == ref_grads.keys()
    for key in grads:
        # recompute reruns the same fp32 ops on the replayed assignment, and both runs accumulate
        # micro-batch A's gradient before B's: bit for bit
        assert torch.equal(grads[key], ref_grads[key]), key
    state = routers_of(model)[0]._ac_state
    assert all(state.num_pending(n) == 0 for n in (2, 3, 4))

    # the same run reading the slot during recompute (no replay) gets other gradients
    from megatron_dpsl.routing.ac import router as ac_router

    monkeypatch.setattr(ac_router, "forward_phase", lambda training: ac_router.ForwardPhase.PLAIN)
    naive = gpt(make_config(**lb, **RECOMPUTE[name]))
    _, naive_grads = _grads_two_micro_batches(naive, interleave=True)
    assert any(
        not torch.allclose(naive_grads[k], ref_grads[k], rtol=1e-4, atol=1e-6) for k in ref_grads
    )
