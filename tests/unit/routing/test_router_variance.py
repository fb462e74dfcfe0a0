"""The variance loss in DPSLRouter (one process): real TopKRouter as the reference, Megatron's
hooks.

CPU shims for Megatron's CUDA-only calls: tests/megatron_cpu.py.
"""

from __future__ import annotations

import pytest
import torch
from support.common import build_mlp, moe_tracked, reset_moe_tracker
from support.configs import plugin_types_config, router_pair
from support.megatron_cpu import init_single_process

H, E, GAMMA = 16, 8, 0.7


pytestmark = pytest.mark.usefixtures("fresh_moe_losses")


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    init_single_process()
    yield


def make_config(types=("variance",), coeffs=(GAMMA,), **over):
    return plugin_types_config(types, coeffs, **over)


def pair(config, stock_config=None):
    """DPSLRouter(config) and a stock TopKRouter (no plugin types) with the same weight."""
    return router_pair(config, stock_config or make_config(types=("none",), coeffs=(0.0,)))


def tracker(name):
    return moe_tracked(name)


def hidden(s=6, b=3, seed=1):
    return torch.randn(s, b, H, generator=torch.Generator().manual_seed(seed))


def padding(s=6, b=3):
    return torch.arange(s * b).reshape(s, b) % 5 == 2


@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize(
    "over",
    [{}, dict(moe_router_score_function="sigmoid"), dict(moe_expert_capacity_factor=0.5)],
    ids=["softmax", "sigmoid", "capacity_drop"],
)
def test_paper_form_is_eq7_on_topk_router_probs(over, with_padding):
    """variance_loss = γ·L_v(TopKRouter's probs) and the router gradient is γ·∂L_v/∂W through those
    probs."""
    from megatron_dpsl.losses.variance import variance_loss

    cfg = make_config(**over)
    d, t = pair(cfg, make_config(types=("none",), coeffs=(0.0,), **over))
    x, pad = hidden(), (padding() if with_padding else None)
    probs, routing_map = d(x, padding_mask=pad)
    (probs * 0).sum().backward()
    ref_probs, ref_map = t(x, padding_mask=pad)
    assert torch.equal(probs, ref_probs) and torch.equal(routing_map, ref_map)  # routing untouched
    ref = GAMMA * variance_loss(ref_probs, None if pad is None else pad.reshape(-1))
    ref.backward()
    # float64 sums of the same fp32 probs; the gradient crosses the same fp32 routing graph
    torch.testing.assert_close(tracker("variance_loss")[0], ref.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d.weight.grad, t.weight.grad, rtol=1e-5, atol=1e-8)
    assert t.weight.grad.abs().max() > 1e-4 and ref < 0


def test_reference_code_form_is_the_full_softmax_sharpness():
    from megatron_dpsl.losses.variance import variance_loss_reference_code

    cfg = make_config(moe_variance_loss_form="reference_code")
    d, _ = pair(cfg)
    x, pad = hidden(), padding()
    probs, _ = d(x, padding_mask=pad)
    (probs * 0).sum().backward()
    w = d.weight.detach().clone().requires_grad_(True)
    ref = GAMMA * variance_loss_reference_code(x.reshape(-1, H) @ w.t(), pad.reshape(-1))
    ref.backward()
    torch.testing.assert_close(tracker("variance_loss")[0], ref.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d.weight.grad, w.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("stock", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
def test_megatron_sees_only_its_types_and_gradients_add(stock):
    """[stock, dpsl, variance, orthogonality]: Megatron's loss is logged as with [stock] alone;
    grads add."""
    names = {
        "aux_loss": "load_balancing_loss",
        "seq_aux_loss": "seq_load_balancing_loss",
        "global_aux_loss": "global_load_balancing_loss",
    }
    configs = {
        # orthogonality named with coefficient 0: a router outside DPSLMoELayer refuses a live one
        # (below)
        "all": make_config((stock, "dpsl", "variance", "orthogonality"), (1e-2, 0.3, GAMMA, 0.0)),
        "stock": make_config((stock,), (1e-2,)),
        "dpsl": make_config(("dpsl",), (0.3,)),
        "variance": make_config(),
    }
    x = hidden()
    grads, logged = {}, {}
    for key, cfg in configs.items():
        reset_moe_tracker()
        d, _ = pair(cfg)
        probs, _ = d(x)
        (probs * 0).sum().backward()
        grads[key] = d.weight.grad.clone()
        logged[key] = {
            n: tracker(n)
            for n in (names[stock], "dpsl_loss", "variance_loss", "orthogonality_loss")
        }
    assert torch.equal(logged["all"][names[stock]], logged["stock"][names[stock]])
    assert torch.equal(logged["all"]["dpsl_loss"], logged["dpsl"]["dpsl_loss"])
    assert torch.equal(logged["all"]["variance_loss"], logged["variance"]["variance_loss"])
    assert logged["all"]["orthogonality_loss"] is None  # the MoE layer's loss, not the router's
    # fp32 sums of the same terms in another order
    torch.testing.assert_close(
        grads["all"], grads["stock"] + grads["dpsl"] + grads["variance"], rtol=1e-5, atol=1e-7
    )


def test_padding_tokens_are_left_out():
    d, _ = pair(make_config())
    x, pad = hidden(), padding()
    d(x, padding_mask=pad)
    first = tracker("variance_loss")[0].clone()
    x2 = x.clone()
    x2[pad] = 50 * torch.randn_like(x2[pad])
    d(x2, padding_mask=pad)
    assert torch.equal(tracker("variance_loss")[0], 2 * first)


def test_per_token_loss_multiplies_by_the_valid_tokens():
    x, pad = hidden(), padding()
    grads = {}
    for per_token in (False, True):
        reset_moe_tracker()
        d, _ = pair(make_config(calculate_per_token_loss=per_token))
        probs, _ = d(x, padding_mask=pad)
        (probs * 0).sum().backward()
        grads[per_token] = d.weight.grad.clone()
        logged = tracker("variance_loss")[0]
    valid = int((~pad).sum())
    # finalize_model_grads later divides by the global valid-token count; the logged value is
    # unscaled the same fp32 graph, its loss scaled before (not after) the backward: fp32 rounding
    # of each term
    torch.testing.assert_close(
        grads[True], valid * grads[False], rtol=1e-5, atol=1e-6 * grads[True].abs().max().item()
    )
    assert logged < 0


@pytest.mark.parametrize("mode", ["eval", "no_grad", "coeff0"])
def test_off_means_no_loss_and_no_gather(mode, monkeypatch):
    from megatron_dpsl.parallel import token_gather as distributed

    def boom(*a, **k):
        raise AssertionError("the variance loss communicated although it is off")

    monkeypatch.setattr(distributed, "gather_for_loss", boom)
    d, t = pair(make_config(coeffs=(0.0 if mode == "coeff0" else GAMMA,)))
    if mode == "eval":
        d.eval()
        t.eval()
    with torch.no_grad() if mode == "no_grad" else torch.enable_grad():
        pd, _ = d(hidden())
        pt, _ = t(hidden())
    assert torch.equal(pd, pt) and tracker("variance_loss") is None


def test_orthogonality_in_a_stock_moe_layer_is_an_error():
    """with_router() swaps only the router: the orthogonality loss would silently not run, so
    training refuses."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_dpsl.models.specs import with_router

    config = make_config(("orthogonality",), (0.2,))
    layer = build_mlp(with_router(get_gpt_layer_local_spec(num_experts=E)).submodules.mlp, config)
    layer.set_layer_number(1)
    with pytest.raises(RuntimeError, match="needs megatron_dpsl.DPSLMoELayer"):
        layer(hidden())
    layer.eval()
    layer(hidden())  # inference has no loss to lose
