"""DPSLMoELayer (one process): the orthogonality loss on real Megatron MoE layers and dispatchers.

The reference runs every (token, expert) pair through a copy of the layer's experts one token at a
time, with a stock TopKRouter: no dispatcher, no permutation, nothing shared with the code under
    test.
CPU shims for Megatron's CUDA-only calls (and the alltoall dispatcher's stream):
    tests/megatron_cpu.py.
"""

from __future__ import annotations

import pytest
import torch
from support.common import build_mlp, moe_tracked, reset_moe_tracker
from support.configs import plugin_types_config
from support.megatron_cpu import (
    init_single_process,
    install_alltoall_shims,
    install_recompute_shims,
)

H, E, K, BETA = 16, 4, 2, 0.3


pytestmark = pytest.mark.usefixtures("fresh_moe_losses")


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    init_single_process()
    undo = [install_alltoall_shims(), install_recompute_shims()]
    yield
    for fn in undo:  # other test modules (and libraries) must see torch.cuda as it was
        fn()


def make_config(types=("orthogonality",), coeffs=(BETA,), **over):
    return plugin_types_config(
        types,
        coeffs,
        **{
            "num_moe_experts": E,
            "moe_router_topk": K,
            "moe_token_dispatcher_type": "allgather",
            **over,
        },
    )


def build(config, stock=False):
    """The MoE layer of the plugin's layer spec (or of Megatron's, ``stock``), seeded
    identically."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_dpsl.models.specs import get_dpsl_layer_spec

    spec = get_gpt_layer_local_spec(num_experts=E) if stock else get_dpsl_layer_spec(config)
    torch.manual_seed(0)
    layer = build_mlp(spec.submodules.mlp, config)
    layer.set_layer_number(1)
    layer.train()
    return layer


def tracker(name):
    return moe_tracked(name)


def hidden(s=6, b=3, seed=1):
    return torch.randn(s, b, H, generator=torch.Generator().manual_seed(seed))


def reference(layer, config, x, pad, form):
    """Output and β·L_o with copies of the layer's modules, one (token, expert) pair at a time."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_dpsl.losses.orthogonality import orthogonality_loss

    copy_of = build(config, stock=True)  # Megatron's own MoELayer and TopKRouter, same weights
    copy_of.load_state_dict(layer.state_dict())
    router, experts = copy_of.router, copy_of.experts
    assert type(router) is TopKRouter and not router.is_aux_loss_enabled()
    x = x.detach().clone().requires_grad_(True)
    probs, routing_map = router(x, padding_mask=pad)
    tokens = x.reshape(-1, H)
    rows, out = [], []
    for t in range(tokens.shape[0]):
        chosen = routing_map[t].nonzero().flatten().tolist()  # ascending expert id = slot order
        slot_outputs = [
            experts.local_experts[e](tokens[t : t + 1], torch.ones(1))[0][0] for e in chosen
        ]
        slot_outputs += [tokens.new_zeros(H)] * (K - len(chosen))  # a dropped expert: an empty slot
        rows.append(torch.stack(slot_outputs))
        out.append(
            sum(probs[t, e] * y for e, y in zip(chosen, slot_outputs))
            if chosen
            else tokens.new_zeros(H)
        )
    slots = torch.stack(rows)  # [T, k, H]
    loss = BETA * orthogonality_loss(slots, None if pad is None else pad.reshape(-1), form=form)
    return torch.stack(out).reshape(x.shape), loss, x, router, experts


CASES = {
    "plain": ({}, False),
    "padding": ({}, True),
    "capacity_drop": (dict(moe_expert_capacity_factor=0.5), False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("form", ["paper", "reference_code"])
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_loss_output_and_gradients_match_the_per_token_reference(dispatcher, form, case):
    over, with_padding = CASES[case]
    config = make_config(
        moe_token_dispatcher_type=dispatcher, moe_orthogonality_loss_form=form, **over
    )
    layer = build(config)
    x = hidden().requires_grad_(True)
    pad = (torch.arange(18).reshape(6, 3) % 4 == 1) if with_padding else None
    g = torch.randn(6, 3, H, generator=torch.Generator().manual_seed(9))
    ref_out, ref_loss, ref_x, ref_router, ref_experts = reference(layer, config, x, pad, form)
    out, _ = layer(x, padding_mask=None if pad is None else pad.t())  # MoELayer takes [b, s]
    (out * g).sum().backward()
    ((ref_out * g).sum() + ref_loss).backward()
    # fp32: the same products and sums in another order (weights applied after fc2 instead of
    # before)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        tracker("orthogonality_loss")[0], ref_loss.detach(), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        layer.router.weight.grad, ref_router.weight.grad, rtol=1e-5, atol=1e-6
    )
    for (name, p), q in zip(layer.experts.named_parameters(), ref_experts.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert ref_loss > 0


def test_the_loss_moves_expert_and_input_gradients_but_not_the_router():
    """Eq. 8/9: L_o reaches the experts (and what feeds them), never the router weight."""
    layer = build(make_config())
    x = hidden().requires_grad_(True)
    out, _ = layer(x)
    (out * 0).sum().backward()  # the task loss is 0: only L_o remains
    assert layer.experts.local_experts[0].linear_fc1.weight.grad.abs().max() > 1e-6
    assert x.grad.abs().max() > 1e-6
    assert layer.router.weight.grad.abs().max() == 0


@pytest.mark.parametrize("mode", ["coeff0", "eval", "no_grad", "other_types_only"])
def test_off_the_layer_is_moe_layer(mode):
    types, coeffs = (
        (("aux_loss", "variance"), (1e-2, 0.1))
        if mode == "other_types_only"
        else (("orthogonality",), (0.0 if mode == "coeff0" else BETA,))
    )
    config = make_config(types, coeffs)
    layer, stock = build(config), build(config, stock=True)
    stock.load_state_dict(layer.state_dict())
    if mode == "eval":
        layer.eval()
        stock.eval()
    x = hidden()
    with torch.no_grad() if mode == "no_grad" else torch.enable_grad():
        out, _ = layer(x)
        ref, _ = stock(x)
    assert torch.equal(out, ref) and tracker("orthogonality_loss") is None


def test_per_token_loss_multiplies_by_the_valid_tokens():
    pad = torch.arange(18).reshape(3, 6) % 5 == 0  # [b, s]
    grads, logged = {}, {}
    for per_token in (False, True):
        reset_moe_tracker()
        layer = build(make_config(calculate_per_token_loss=per_token))
        out, _ = layer(hidden(), padding_mask=pad)
        (out * 0).sum().backward()
        grads[per_token] = layer.experts.local_experts[1].linear_fc2.weight.grad.clone()
        logged[per_token] = tracker("orthogonality_loss")[0]
    valid = int((~pad).sum())
    torch.testing.assert_close(
        grads[True], valid * grads[False], rtol=1e-5, atol=1e-6 * grads[True].abs().max().item()
    )
    assert torch.equal(logged[True], logged[False])  # the logged value is per token either way


def test_with_shared_experts_recompute_and_every_router_loss():
    """All four plugin/stock types at once, a shared expert and Megatron's MoE recompute."""
    types, coeffs = ("aux_loss", "dpsl", "variance", "orthogonality"), (1e-2, 0.05, 0.1, BETA)
    over = dict(moe_shared_expert_intermediate_size=8)
    x = hidden()
    results = {}
    for recompute in (False, True):
        reset_moe_tracker()
        extra = (
            dict(recompute_granularity="selective", recompute_modules=["moe"]) if recompute else {}
        )
        layer = build(make_config(types, coeffs, **over, **extra))
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi)
        out.sum().backward()
        results[recompute] = (
            out.detach(),
            xi.grad,
            [p.grad.clone() for p in layer.parameters()],
            {
                n: tracker(n)
                for n in ("load_balancing_loss", "dpsl_loss", "variance_loss", "orthogonality_loss")
            },
        )
    (o0, x0, g0, l0), (o1, x1, g1, l1) = results[False], results[True]
    for name, value in l0.items():
        assert value is not None and value[0] != 0, name
        torch.testing.assert_close(l1[name], value)
    # under recompute the first forward runs without grad, so Megatron's weighting-in-the-expert
    # path produces the output (the loss path runs in the replay): fp32 rounding apart, the same
    # numbers
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1, x0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)


def test_gpt_model_with_the_decoder_block_spec_logs_every_moe_layer():
    from megatron.core.models.gpt import GPTModel

    from megatron_dpsl.models.specs import get_dpsl_decoder_block_spec
    from megatron_dpsl.routing.moe_layer import DPSLMoELayer
    from megatron_dpsl.routing.router import DPSLRouter

    config = make_config(("variance", "orthogonality"), (0.1, BETA))
    torch.manual_seed(0)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_dpsl_decoder_block_spec(config),
        vocab_size=32,
        max_sequence_length=8,
    )
    moe = [m for m in model.modules() if isinstance(m, DPSLMoELayer)]
    assert len(moe) == 2 and all(type(m.router) is DPSLRouter for m in moe)
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(8).unsqueeze(0).expand(2, 8)
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), 1)
    model(tokens, pos, mask).float().mean().backward()
    assert (tracker("orthogonality_loss") > 0).all() and (tracker("variance_loss") < 0).all()


# ---------------------------------------------------------------- specs
def test_specs_swap_router_and_layer_in_both_spec_shapes():
    """0.16 builds ``ModuleSpec(module=MoELayer, ...)``, 0.19 ``functools.partial(MoELayer, ...)``:
    both swapped."""
    import functools

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_dpsl.models.specs import get_dpsl_layer_spec, with_plugin_modules, with_router
    from megatron_dpsl.routing.moe_layer import DPSLMoELayer
    from megatron_dpsl.routing.router import DPSLRouter

    def parts(mlp):
        if isinstance(mlp, functools.partial):
            return mlp.func, mlp.keywords["submodules"].router
        return mlp.module, mlp.submodules.router

    stock = get_gpt_layer_local_spec(num_experts=E).submodules.mlp
    assert parts(get_dpsl_layer_spec(make_config()).submodules.mlp) == (DPSLMoELayer, DPSLRouter)
    assert parts(with_router(stock)) == (MoELayer, DPSLRouter)
    assert parts(stock) == (MoELayer, TopKRouter)  # the input is not changed
    # the other shape than the installed Megatron's, built by hand; one node shared by two layers
    sub = MoESubmodules(experts=None, router=TopKRouter)
    other = (
        functools.partial(MoELayer, submodules=sub)
        if isinstance(stock, ModuleSpec)
        else ModuleSpec(module=MoELayer, submodules=sub)
    )
    swapped = with_plugin_modules([other, other])
    assert [parts(s) for s in swapped] == [(DPSLMoELayer, DPSLRouter)] * 2 and swapped[
        0
    ] is swapped[1]
    assert parts(other) == (MoELayer, TopKRouter)
