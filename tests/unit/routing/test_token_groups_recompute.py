"""Group priors under activation recompute: the ids travel with the micro-batch (issue 21).

A ``GPTModel`` with the plugin's decoder spec and group priors, the forward wrapped in
``with dpsl_token_groups(ids):`` exactly as the README shows, ``loss.backward()`` after the block
has closed. Under full recompute (uniform, block) and selective recompute (``moe`` replays the
router, also beside ``core_attn``; ``moe_act`` and ``layernorm`` replay no router and need grouped
GEMM or Transformer Engine, i.e. a GPU) the loss and every gradient equal the run without
recompute, with two micro-batches in flight (forward A, forward B, backward A, backward B, as 1F1B
runs them). Then what must not leak: ids of a finished step, ids of a forward never backpropagated,
and an evaluation forward under ``torch.no_grad()``. Real Megatron modules on CPU
(tests/support/megatron_cpu.py).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from support.configs import moe_config
from support.megatron_cpu import init_single_process, install_recompute_shims

S, B, V = 8, 2, 32  # sequence, micro-batch, vocabulary
ALPHAS = [[2.0, 2.0, 0.5, 0.5], [0.5, 0.5, 2.0, 2.0]]

pytestmark = pytest.mark.usefixtures("fresh_moe_losses")


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    init_single_process()
    undo = install_recompute_shims()
    yield
    undo()


def make_config(**over):
    fields = dict(
        num_moe_experts=4,
        moe_router_load_balancing_type="dpsl",
        moe_dpsl_coeff=1.0,
        moe_dpsl_group_alphas=ALPHAS,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return moe_config(**{**fields, **over})


def gpt(cfg, seed=0):
    from megatron.core.models.gpt import GPTModel

    from megatron_dpsl.models.specs import get_dpsl_decoder_block_spec

    torch.manual_seed(seed)
    return GPTModel(
        config=cfg,
        transformer_layer_spec=get_dpsl_decoder_block_spec(cfg),
        vocab_size=V,
        max_sequence_length=S,
    )


def micro_batch(seed):
    """``(tokens, position_ids, attention_mask, group_ids)``; the ids ``[b, s]`` as the README
    passes them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S), generator=g)
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    mask = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), 1)
    ids = torch.randint(0, 2, (B, S), generator=g)
    return tokens, pos, mask, ids


def forward(model, seed, ids=None):
    """One micro-batch's forward as the README writes it; the LM loss weighs the logits lightly so
    that the DPSL gradient is a visible part of every router gradient."""
    from megatron_dpsl import dpsl_token_groups

    tokens, pos, mask, own_ids = micro_batch(seed)
    with dpsl_token_groups(own_ids if ids is None else ids):
        logits = model(tokens, pos, mask)
    return 1e-2 * logits.float().square().mean()


def losses_and_grads(model, in_flight: bool):
    """Micro-batches 1 and 2: both forwards then both backwards (``in_flight``) or one after the
    other."""
    losses = []
    for seed in (1, 2):
        losses.append(forward(model, seed))
        if not in_flight:
            losses[-1].backward()
    if in_flight:
        for loss in losses:
            loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [loss.item() for loss in losses], grads


RECOMPUTE = {
    "full_uniform_1": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    ),
    "full_uniform_2": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2
    ),
    "full_block_1": dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=1
    ),
    "selective_moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
    "selective_core_attn_moe": dict(
        recompute_granularity="selective", recompute_modules=["core_attn", "moe"]
    ),
}


@pytest.fixture(scope="module")
def reference():
    """Losses and gradients without recompute, micro-batches one after the other.

    Module-scoped, so it runs outside the function-scoped ``fresh_moe_losses``: it sets and puts
    back the aux-loss scale itself (a backward without one leaves Megatron's default behind, a
    shape-[] tensor later tests would inherit) and leaves the tracker empty.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from support.common import reset_moe_tracker

    previous = MoEAuxLossAutoScaler.main_loss_backward_scale
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    try:
        return losses_and_grads(gpt(make_config()), in_flight=False)
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = previous
        reset_moe_tracker()


@pytest.mark.parametrize("name", list(RECOMPUTE))
def test_recompute_equals_no_recompute_with_group_priors(name, reference):
    ref_losses, ref_grads = reference
    model = gpt(make_config(**RECOMPUTE[name]))
    losses, grads = losses_and_grads(model, in_flight=True)
    assert losses == ref_losses
    assert grads.keys() == ref_grads.keys()
    router_grads = [k for k in grads if k.endswith("router.weight")]
    assert len(router_grads) == 2 and all(grads[k].abs().max() > 1e-3 for k in router_grads)
    for key in grads:
        # the replay reruns the same fp32 ops on the same ids, and micro-batch 1's gradient is
        # accumulated before 2's in both runs: bit for bit
        assert torch.equal(grads[key], ref_grads[key]), key


def test_the_ids_matter_here(reference):
    """The comparison above could not pass with the other micro-batch's ids: the priors move the
    grads."""
    _, ref_grads = reference
    model = gpt(make_config())
    for seed in (1, 2):
        swapped = micro_batch(3 - seed)[3]
        forward(model, seed, ids=swapped).backward()
    router = "decoder.layers.0.mlp.router.weight"
    assert not torch.allclose(model.get_parameter(router).grad, ref_grads[router])


def test_recompute_of_a_forward_without_ids_names_the_fix():
    model = gpt(make_config(recompute_granularity="selective", recompute_modules=["moe"]))
    tokens, pos, mask, _ = micro_batch(1)
    loss = (
        model(tokens, pos, mask).float().square().mean()
    )  # forward passes: the loss is in the replay
    with pytest.raises(RuntimeError, match="no per-token group ids are set for this micro-batch"):
        loss.backward()


def test_missing_ids_without_recompute_fail_in_the_forward():
    model = gpt(make_config())
    tokens, pos, mask, _ = micro_batch(1)
    with pytest.raises(RuntimeError, match=r"dpsl_token_groups\(group_ids\)"):
        model(tokens, pos, mask)


@pytest.mark.parametrize("bad", ["transposed", "short"])
def test_wrong_layout_is_refused_in_the_forward(bad):
    model = gpt(
        make_config(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    )
    tokens, pos, mask, ids = micro_batch(1)
    ids = ids.t().contiguous() if bad == "transposed" else ids[:, :-1]
    from megatron_dpsl import dpsl_token_groups

    # [s, b] ids have the right number of tokens but not the layout: refused before any backward
    with (
        dpsl_token_groups(ids),
        pytest.raises(ValueError, match=r"hidden states are \[s, b\] = \[8, 2\]"),
    ):
        model(tokens, pos, mask)


# ---------------------------------------------------------------- nothing leaks
def test_ids_live_exactly_as_long_as_the_micro_batch_graph():
    model = gpt(
        make_config(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    )
    ids = micro_batch(1)[3].clone()
    alive = weakref.ref(ids)
    loss = forward(model, 1, ids=ids)
    del ids
    gc.collect()
    assert alive() is not None  # the replay in the backward still needs them
    loss.backward()
    del loss
    gc.collect()
    assert alive() is None  # the graph is gone, and the ids with it

    ids = micro_batch(2)[3].clone()
    alive = weakref.ref(ids)
    loss = forward(model, 2, ids=ids)  # a forward that is never backpropagated
    del ids, loss
    gc.collect()
    assert alive() is None


def test_ids_of_a_finished_step_never_reach_the_next():
    model = gpt(make_config(recompute_granularity="selective", recompute_modules=["moe"]))
    forward(model, 1).backward()
    tokens, pos, mask, _ = micro_batch(2)
    loss = model(tokens, pos, mask).float().square().mean()  # the next step forgot its ids
    with pytest.raises(RuntimeError, match="no per-token group ids are set"):
        loss.backward()


def test_a_dropped_forward_does_not_shift_later_micro_batches(reference):
    """A forward never backpropagated (e.g. a probe) between two training micro-batches changes
    nothing."""
    _, ref_grads = reference
    model = gpt(
        make_config(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    )
    first = forward(model, 1)
    forward(model, 3)  # dropped
    second = forward(model, 2)
    first.backward()
    second.backward()
    for key, grad in ref_grads.items():
        assert torch.equal(model.get_parameter(key).grad, grad), key


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_under_no_grad_works_with_and_without_ids(mode):
    model = gpt(
        make_config(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    )
    getattr(model, mode)()
    tokens, pos, mask, ids = micro_batch(1)
    from megatron_dpsl import dpsl_token_groups

    with torch.no_grad():
        with dpsl_token_groups(ids):
            with_ids = model(tokens, pos, mask)
        without = model(tokens, pos, mask)  # no loss is computed without gradients: no ids needed
    assert torch.equal(with_ids, without)
    model.train()
    forward(model, 2).backward()  # and training goes on with its own ids
