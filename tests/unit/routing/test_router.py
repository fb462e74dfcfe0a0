"""DPSLRouter in one process: parity with TopKRouter, DPSL on the right probabilities, hooks, specs.

Real Megatron modules (TopKRouter, MoELayer, GPTModel) on CPU with the shims of
tests/megatron_cpu.py.
"""

from __future__ import annotations

import pytest
import torch
from support.common import build_mlp, moe_tracked, reset_moe_tracker
from support.configs import moe_config, router_pair
from support.megatron_cpu import init_single_process

H, E = 16, 8


pytestmark = pytest.mark.usefixtures("fresh_moe_losses")


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    init_single_process()
    yield


def make_config(**over):
    return moe_config(**{"moe_router_load_balancing_type": "dpsl", "moe_dpsl_coeff": 0.3, **over})


def pair(config_dpsl, config_stock=None):
    """A DPSLRouter and a TopKRouter with identical weights (TopKRouter gets the stock config)."""
    return router_pair(config_dpsl, config_stock or config_dpsl)


def tracker(name):
    return moe_tracked(name)


def hidden(s=6, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(s, b, H, generator=g)


def reference_dpsl(weight, x, coeff, alpha, padding_mask=None, group_ids=None):
    """λ·Eq.4 on the fp32 softmax over all experts, straight from the math (no Megatron)."""
    from megatron_dpsl.losses.dpsl import dpsl_loss

    probs = torch.softmax((x.reshape(-1, H) @ weight.t()).float(), dim=-1)
    pad = None if padding_mask is None else padding_mask.reshape(-1)
    return coeff * dpsl_loss(probs, alpha, group_ids=group_ids, padding_mask=pad)


# ---------------------------------------------------------------- state dict
def test_state_dict_identical_to_topk_router_both_ways():
    cfg = make_config(
        moe_router_enable_expert_bias=True,
        moe_router_score_function="sigmoid",
        add_bias_linear=True,
    )
    d, t = pair(cfg)
    assert list(d.state_dict()) == list(t.state_dict())  # the prior buffer is non-persistent
    with torch.no_grad():
        t.weight.add_(1.0)
        t.expert_bias.add_(0.5)
    d.load_state_dict(t.state_dict(), strict=True)
    assert torch.equal(d.weight, t.weight) and torch.equal(d.expert_bias, t.expert_bias)
    with torch.no_grad():
        d.weight.mul_(3.0)
    t.load_state_dict(d.state_dict(), strict=True)
    assert torch.equal(d.weight, t.weight)


# ---------------------------------------------------------------- routing parity
PARITY = {
    "softmax": {},
    "softmax_pre_softmax_scaled": dict(
        moe_router_pre_softmax=True, moe_router_topk_scaling_factor=2.5
    ),
    "sigmoid": dict(moe_router_score_function="sigmoid"),
    "sigmoid_expert_bias": dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True
    ),
    "group_limited": dict(moe_router_num_groups=4, moe_router_group_topk=2),
    "capacity_drop_probs": dict(moe_expert_capacity_factor=0.5),
    "capacity_drop_position_padded": dict(
        moe_expert_capacity_factor=0.5,
        moe_token_drop_policy="position",
        moe_pad_expert_input_to_capacity=True,
    ),
    "z_loss": dict(moe_z_loss_coeff=1e-2),
    "fp32_router_dtype": dict(moe_router_dtype="fp32"),
    "fp64_router_dtype": dict(moe_router_dtype="fp64"),
    "input_jitter": dict(moe_input_jitter_eps=0.1),
    "force_load_balancing": dict(moe_router_force_load_balancing=True),
}


@pytest.mark.parametrize("name", list(PARITY))
@pytest.mark.parametrize("padding", [False, True])
def test_routing_bit_identical_to_topk_router(name, padding):
    """probs/routing_map equal TopKRouter's bit for bit; DPSL only adds a loss on the side."""
    cfg = make_config(**PARITY[name])
    d, t = pair(cfg)
    x = hidden()
    pad = (
        (torch.arange(x.shape[0] * x.shape[1]).reshape(x.shape[0], x.shape[1]) % 4 == 3)
        if padding
        else None
    )
    bias_and_pad = padding and PARITY[name].get("moe_router_enable_expert_bias", False)
    if bias_and_pad:
        # Megatron 0.16/0.19 TopKRouter crashes here (NVIDIA/Megatron-LM#6111: [N] mask & [N, E]
        # map); DPSLRouter broadcasts the mask. Padding does not change probs/routing_map, so
        # compare to TopKRouter without the mask and check the bias token count by hand.
        with pytest.raises(RuntimeError):
            t(x, padding_mask=pad)
        t.local_tokens_per_expert.zero_()
    outs = []
    for r in (d, t):
        torch.manual_seed(5)  # jitter / random logits draw the same numbers for both
        outs.append(r(x, padding_mask=None if (bias_and_pad and r is t) else pad))
    (pd, md), (pt, mt) = outs
    assert torch.equal(md, mt)
    assert torch.equal(pd, pt)
    assert tracker("dpsl_loss") is not None and tracker("dpsl_loss")[0] > 0
    if bias_and_pad:
        expected = (md & ~pad.reshape(-1, 1)).sum(0).float()
        assert torch.equal(d.local_tokens_per_expert, expected)
    elif PARITY[name].get("moe_router_enable_expert_bias"):
        assert torch.equal(d.local_tokens_per_expert, t.local_tokens_per_expert)


@pytest.mark.parametrize("stock", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
def test_stock_aux_losses_unchanged_and_gradients_add(stock):
    """[stock, "dpsl"]: the stock loss is logged as before and the router gradient is stock +
    DPSL."""
    stock_cfg = make_config(
        moe_router_load_balancing_type=stock, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3
    )
    both_cfg = make_config(
        moe_router_load_balancing_type=[stock, "dpsl"],
        moe_aux_loss_coeff=[1e-2, 0.0],
        moe_z_loss_coeff=1e-3,
    )
    only_cfg = make_config(moe_z_loss_coeff=None)
    x = hidden()
    names = {
        "aux_loss": "load_balancing_loss",
        "seq_aux_loss": "seq_load_balancing_loss",
        "global_aux_loss": "global_load_balancing_loss",
    }
    grads, logged = {}, {}
    for key, cfg in (("both", both_cfg), ("stock", stock_cfg), ("only", only_cfg)):
        reset_moe_tracker()
        d, t = pair(cfg, stock_cfg)
        router = t if key == "stock" else d
        probs, _ = router(x)
        (probs * 0).sum().backward()
        grads[key] = router.weight.grad.clone()
        logged[key] = (tracker(names[stock]), tracker("z_loss"), tracker("dpsl_loss"))
    assert torch.equal(logged["both"][0], logged["stock"][0])
    assert torch.equal(logged["both"][1], logged["stock"][1])
    assert logged["stock"][2] is None and torch.equal(logged["both"][2], logged["only"][2])
    # fp32 sums of the same three terms in a different order
    torch.testing.assert_close(grads["both"], grads["stock"] + grads["only"], rtol=1e-5, atol=1e-7)
    assert grads["only"].abs().max() > 1e-3


# ---------------------------------------------------------------- which probabilities DPSL sees
@pytest.mark.parametrize(
    "over",
    [
        {},
        dict(moe_router_score_function="sigmoid"),
        dict(moe_router_pre_softmax=True),
        dict(moe_router_topk_scaling_factor=3.0, moe_router_pre_softmax=True),
    ],
    ids=["softmax", "sigmoid", "pre_softmax", "scaled"],
)
def test_dpsl_is_full_fp32_softmax_whatever_the_score_function(over):
    cfg = make_config(moe_dpsl_alpha=0.75, **over)
    d, _ = pair(cfg)
    x = hidden()
    probs, _ = d(x)
    (probs * 0).sum().backward()
    w = d.weight.detach().clone().requires_grad_(True)
    ref = reference_dpsl(w, x, 0.3, torch.full((E,), 0.75, dtype=torch.float64))
    ref.backward()
    # same fp32 ops on the same numbers, matmul via a different kernel call
    torch.testing.assert_close(tracker("dpsl_loss")[0], ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(d.weight.grad, w.grad, rtol=1e-5, atol=1e-8)


def test_padding_true_means_padding_and_is_excluded():
    """Megatron's code convention (z_loss_func, compute_routing_scores_for_aux_loss): True =
    padding."""
    cfg = make_config()
    d, _ = pair(cfg)
    x = hidden()
    pad = torch.zeros(x.shape[:2], dtype=torch.bool)
    pad[-2:, :] = True
    d(x, padding_mask=pad)
    first = tracker("dpsl_loss")[0].clone()
    x2 = x.clone()
    x2[-2:] = 100 * torch.randn_like(
        x2[-2:]
    )  # padding tokens change wildly: DPSL must not see them
    d(x2, padding_mask=pad)
    assert torch.equal(tracker("dpsl_loss")[0], 2 * first)
    ref = reference_dpsl(d.weight.detach(), x[:-2], 0.3, torch.ones(E, dtype=torch.float64))
    torch.testing.assert_close(first, ref, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- when no loss / no communication
def _no_gather(monkeypatch):
    # the router's gather (megatron_dpsl.parallel.token_gather.TokenGather) calls these module
    # functions
    from megatron_dpsl.parallel import token_gather as distributed

    def boom(*a, **k):
        raise AssertionError("DPSL communicated although it is off")

    monkeypatch.setattr(distributed, "gather_for_loss", boom)
    monkeypatch.setattr(distributed, "plan_gather", boom)


@pytest.mark.parametrize("mode", ["eval", "no_grad", "coeff0"])
def test_no_loss_and_no_communication(mode, monkeypatch):
    cfg = make_config(moe_dpsl_coeff=0.0 if mode == "coeff0" else 0.3)
    d, t = pair(cfg)
    _no_gather(monkeypatch)
    x = hidden()
    if mode == "eval":
        d.eval()
        t.eval()
    ctx = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    with ctx:
        pd, md = d(x)
        pt, mt = t(x)
    assert torch.equal(pd, pt) and torch.equal(md, mt)
    assert tracker("dpsl_loss") is None
    if mode != "no_grad":
        pd.sum().backward()
        pt.sum().backward()
        assert torch.equal(d.weight.grad, t.weight.grad)


# ---------------------------------------------------------------- loss attachment / scaling
def test_attached_with_moe_aux_loss_autoscaler_scale():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    cfg = make_config()
    grads = []
    for scale in (1.0, 0.25):
        d, _ = pair(cfg)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale))
        probs, _ = d(hidden())
        (probs * 0).sum().backward()
        grads.append(d.weight.grad.clone())
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    torch.testing.assert_close(grads[1], 0.25 * grads[0], rtol=1e-6, atol=0)  # one fp32 multiply


def test_per_token_loss_scales_by_valid_tokens():
    x = hidden()
    pad = torch.zeros(x.shape[:2], dtype=torch.bool)
    pad[0] = True
    grads = []
    for per_token in (False, True):
        d, _ = pair(make_config(calculate_per_token_loss=per_token))
        probs, _ = d(x, padding_mask=pad)
        (probs * 0).sum().backward()
        grads.append(d.weight.grad.clone())
    valid = (~pad).sum().item()
    # the factor enters at the top of the backward chain, so fp32 rounding differs along it
    torch.testing.assert_close(grads[1], valid * grads[0], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- priors, groups, buffers
def test_group_priors_need_group_ids():
    cfg = make_config(moe_dpsl_alpha_base=0.5, moe_dpsl_alpha_shift=1.5, moe_dpsl_num_groups=2)
    d, _ = pair(cfg)
    with pytest.raises(RuntimeError, match="dpsl_token_groups"):
        d(hidden())


def test_group_priors_follow_token_groups():
    from megatron_dpsl.parallel.token_groups import dpsl_token_groups

    group_alphas = [[2.0] * 4 + [0.5] * 4, [0.5] * 4 + [2.0] * 4]
    cfg = make_config(moe_dpsl_group_alphas=group_alphas)
    d, _ = pair(cfg)
    x = hidden()  # [s, b, h]
    ids_bs = (
        torch.arange(x.shape[1]).unsqueeze(1) + torch.arange(x.shape[0]).unsqueeze(0)
    ) % 2  # [b, s]
    with dpsl_token_groups(ids_bs):
        d(x)
    ref = reference_dpsl(
        d.weight.detach(),
        x,
        0.3,
        torch.tensor(group_alphas, dtype=torch.float64),
        group_ids=ids_bs.t().reshape(-1),
    )
    torch.testing.assert_close(tracker("dpsl_loss")[0], ref, rtol=1e-6, atol=1e-7)
    with dpsl_token_groups(ids_bs[:, :-1]), pytest.raises(ValueError, match="group ids give"):
        d(x)
    with dpsl_token_groups(ids_bs + 5), pytest.raises(ValueError, match=r"\[0, 2\)"):
        make_router = pair(cfg)[0]
        make_router(x)


def test_prior_stays_exact_float64_when_the_model_is_cast_to_bf16():
    alpha = [0.3 + 0.1 * i for i in range(E)]  # not representable in bf16
    cfg = make_config(moe_dpsl_alpha=alpha, moe_router_dtype="fp32")
    d, _ = pair(cfg)
    assert list(d.state_dict()) == ["weight"]  # the prior is no checkpoint state
    d.to(torch.bfloat16)  # what Float16Module does to parameters and floating buffers
    x = hidden().to(torch.bfloat16)
    d(x)
    # fp32 router dtype: the reference sees the same bf16-valued weights and inputs in fp32
    ref = reference_dpsl(
        d.weight.detach().float(), x.float(), 0.3, torch.tensor(alpha, dtype=torch.float64)
    )
    # a bf16-rounded α moves the loss by ~1e-3 relative; summation order alone by < 1e-6
    torch.testing.assert_close(tracker("dpsl_loss")[0], ref, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- gating without Transformer Engine
@pytest.mark.parametrize("router_dtype", [None, "fp32", "fp64"])
def test_gating_without_transformer_engine_matches_megatron(router_dtype, monkeypatch):
    from megatron.core.transformer.moe import moe_utils

    cfg = make_config(moe_router_dtype=router_dtype)
    d, _ = pair(cfg)
    x = hidden().requires_grad_(True)
    megatron_logits = d.gating(x)  # the shim binds te_general_gemm=None: Megatron's torch.mm branch
    monkeypatch.delattr(moe_utils, "te_general_gemm", raising=False)  # a user without TE
    plain_logits = d.gating(x)
    assert plain_logits.dtype == megatron_logits.dtype
    torch.testing.assert_close(
        plain_logits, megatron_logits, rtol=1e-6, atol=1e-6
    )  # mm vs linear kernels
    d(hidden())  # the whole router runs without te_general_gemm bound
    assert tracker("dpsl_loss") is not None


# ---------------------------------------------------------------- diagnostics
def test_diagnostics_every_log_interval_calls():
    from megatron_dpsl import metrics

    cfg = make_config(moe_dpsl_log_interval=3)
    d, _ = pair(cfg)
    seen, expected = [], torch.zeros(())
    for call in range(1, 8):
        x = hidden(seed=call)
        d(x)
        seen.append(tracker("dpsl_entropy"))
        if call % 3 == 0:  # the tracker sums the logged calls' values per layer
            probs = torch.softmax((x.reshape(-1, H) @ d.weight.detach().t()).float(), dim=-1)
            expected = expected + metrics.routing_entropy(probs)
    assert seen[0] is None and seen[1] is None  # calls 1, 2: nothing logged
    torch.testing.assert_close(
        seen[6][0], expected, rtol=1e-6, atol=0
    )  # calls 3 and 6, nothing else
    assert torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[4])  # calls 4, 5 log nothing
    assert not torch.equal(seen[4], seen[5]) and torch.equal(
        seen[5], seen[6]
    )  # call 6 logs, call 7 not
    for name in ("dpsl_cov", "dpsl_prior_distance"):
        values = tracker(name)
        assert values is not None and torch.isfinite(values).all() and values[0] != 0, name
    assert tracker("dpsl_loss")[0] > 0


# ---------------------------------------------------------------- specs and full models
def test_layer_spec_swaps_router_local_and_te_error():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_dpsl.models.specs import count_routers, get_dpsl_layer_spec
    from megatron_dpsl.routing.router import DPSLRouter

    cfg = make_config()
    spec = get_dpsl_layer_spec(
        cfg
    )  # the MoE layer is a ModuleSpec (megatron-core 0.16) or a partial (0.19)
    assert count_routers(spec, DPSLRouter) == 1 and count_routers(spec, TopKRouter) == 0
    assert count_routers(get_gpt_layer_local_spec(num_experts=E), TopKRouter) == 1
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="Transformer Engine"):
            get_dpsl_layer_spec(cfg, use_transformer_engine=True)


def test_moe_layer_and_gpt_model_with_dpsl_decoder_block_spec():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_dpsl.models.specs import get_dpsl_decoder_block_spec
    from megatron_dpsl.routing.router import DPSLRouter

    cfg = make_config(moe_layer_freq=[1, 0])
    block = get_dpsl_decoder_block_spec(cfg)
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=block, vocab_size=32, max_sequence_length=8)
    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(moe) == 1 and type(moe[0].router) is DPSLRouter
    assert not any(type(m) is TopKRouter for m in model.modules())
    tokens = torch.randint(0, 32, (2, 8))
    pos = torch.arange(8).unsqueeze(0).expand(2, 8)
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), 1)
    logits = model(tokens, pos, mask)
    logits.float().mean().backward()
    assert moe[0].router.weight.grad is not None and tracker("dpsl_loss")[0] > 0


def test_moe_layer_padding_mask_reaches_dpsl():
    from megatron_dpsl.models.specs import get_dpsl_layer_spec

    cfg = make_config()
    torch.manual_seed(0)
    layer = build_mlp(get_dpsl_layer_spec(cfg).submodules.mlp, cfg)
    layer.set_layer_number(1)
    x = hidden()  # [s, b, h]
    pad_bs = torch.zeros(x.shape[1], x.shape[0], dtype=torch.bool)  # MoELayer takes [b, s]
    pad_bs[:, -1] = True
    out, _ = layer(x, padding_mask=pad_bs)
    ref = reference_dpsl(
        layer.router.weight.detach(), x[:-1], 0.3, torch.ones(E, dtype=torch.float64)
    )
    torch.testing.assert_close(tracker("dpsl_loss")[0], ref, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- token groups and the gather, one
# rank
def test_token_groups_context_and_setter():
    from megatron_dpsl.parallel.token_groups import (
        dpsl_token_groups,
        get_dpsl_token_groups,
        set_dpsl_token_groups,
    )

    ids = torch.zeros(2, 4, dtype=torch.long)
    assert get_dpsl_token_groups() is None
    with dpsl_token_groups(ids):
        assert get_dpsl_token_groups().group_ids is ids
        with dpsl_token_groups(ids + 1, cp_sliced=True):
            assert get_dpsl_token_groups().cp_sliced
        assert get_dpsl_token_groups().group_ids is ids
    assert get_dpsl_token_groups() is None
    set_dpsl_token_groups(ids)
    assert get_dpsl_token_groups().group_ids is ids
    set_dpsl_token_groups(None)
    assert get_dpsl_token_groups() is None
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        set_dpsl_token_groups(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="int tensor"):
        set_dpsl_token_groups(torch.zeros(2, 4))


def test_token_group_ids_flatten_like_router_logits():
    """[b, s] ids -> [s*b] in the order of logits [s, b, E].view(-1, E)."""
    from megatron_dpsl.parallel.token_groups import TokenGroups, shard_token_group_ids

    b, s = 3, 5
    ids = torch.arange(b * s).reshape(b, s)  # id = b_index * s + s_index
    flat = shard_token_group_ids(TokenGroups(ids))
    s_idx, b_idx = torch.meshgrid(torch.arange(s), torch.arange(b), indexing="ij")  # logits order
    assert torch.equal(flat, (b_idx * s + s_idx).reshape(-1))


def test_gather_for_loss_single_rank_is_identity_with_grad_scale():
    from megatron_dpsl.parallel.token_gather import gather_for_loss

    x = torch.randn(5, 3, requires_grad=True)
    y = gather_for_loss(x, None, grad_scale=2.0)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
