"""``megatron_dpsl.parallel.token_groups``: the public API, the ids' layout check, and how a replay
in the backward pass finds its micro-batch's ids (any reentrant checkpoint; non-reentrant refused).

A real ``DPSLRouter`` with group priors on CPU; GPTModel-level recompute is in
tests/unit/routing/test_token_groups_recompute.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint
from support.common import pg
from support.configs import moe_config
from support.megatron_cpu import init_single_process, install_recompute_shims

S, B, H, E = 6, 3, 16, 4

pytestmark = pytest.mark.usefixtures("fresh_moe_losses")


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    init_single_process()
    undo = install_recompute_shims()
    yield
    undo()


def router(group_priors=True):
    from megatron_dpsl.routing.router import DPSLRouter

    cfg = moe_config(
        num_layers=1,
        num_moe_experts=E,
        moe_router_load_balancing_type="dpsl",
        moe_dpsl_coeff=1.0,
        moe_dpsl_group_alphas=[[2.0, 2.0, 0.5, 0.5], [0.5, 0.5, 2.0, 2.0]]
        if group_priors
        else None,
    )
    torch.manual_seed(0)
    r = DPSLRouter(cfg, pg_collection=pg())
    r.set_layer_number(1)
    r.train()
    return r


def data(seed):
    """Hidden states ``[s, b, h]`` and group ids ``[b, s]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, H, generator=g, requires_grad=True), torch.randint(
        0, 2, (B, S), generator=g
    )


def probs_loss(r, x):
    probs, _ = r(x)
    return probs.square().sum()


def grad_of_two_micro_batches(checkpoint=None):
    """Router-weight gradient of micro-batches 1 and 2, both forwards before both backwards."""
    from megatron_dpsl import dpsl_token_groups

    r = router()
    losses = []
    for seed in (1, 2):
        x, ids = data(seed)
        with dpsl_token_groups(ids):
            step = functools.partial(probs_loss, r)
            losses.append(step(x) if checkpoint is None else checkpoint(step, x))
    for loss in losses:
        loss.backward()
    return r.weight.grad.clone()


def test_any_reentrant_checkpoint_replays_its_own_ids():
    """Megatron's and torch's reentrant checkpoints (Transformer Engine's is the same kind of
    Function)."""
    from megatron.core import tensor_parallel

    reference = grad_of_two_micro_batches()
    megatron = grad_of_two_micro_batches(lambda f, *a: tensor_parallel.checkpoint(f, False, *a))
    torch_reentrant = grad_of_two_micro_batches(
        lambda f, *a: torch_checkpoint.checkpoint(f, *a, use_reentrant=True)
    )
    assert reference.abs().max() > 1e-3
    assert torch.equal(megatron, reference)
    assert torch.equal(torch_reentrant, reference)


def test_a_checkpoint_nested_in_a_replay_replays_the_same_ids():
    """An inner checkpoint whose first run happens inside the outer one's replay (backward)."""
    from megatron.core import tensor_parallel

    def nested(f, x):
        inner = functools.partial(torch_checkpoint.checkpoint, f, use_reentrant=True)
        return tensor_parallel.checkpoint(inner, False, x)

    assert torch.equal(grad_of_two_micro_batches(nested), grad_of_two_micro_batches())


def test_non_reentrant_checkpoint_is_refused_in_the_replay():
    with pytest.raises(RuntimeError, match="non-reentrant checkpointing is not supported"):
        grad_of_two_micro_batches(
            lambda f, *a: torch_checkpoint.checkpoint(f, *a, use_reentrant=False)
        )


def test_layout_is_checked_against_the_hidden_states():
    from megatron_dpsl import dpsl_token_groups

    r = router()
    x, ids = data(1)
    with dpsl_token_groups(ids):
        r(x)  # [b, s] = [3, 6] for hidden states [s, b] = [6, 3]
    # [s, b] ids where [b, s] belong: the same 18 tokens, refused by layout
    with (
        dpsl_token_groups(ids.t().contiguous()),
        pytest.raises(
            ValueError,
            match=r"give \[s, b\] = \[3, 6\] on this rank \(from \[batch, seq\] = \[6, 3\]\), but "
            r"the router's "
            r"hidden states are \[s, b\] = \[6, 3\]",
        ),
    ):
        r(x)


def test_padding_flags_layout_is_checked_without_group_priors_too():
    from megatron_dpsl import dpsl_token_groups

    r = router(group_priors=False)  # reads only the padding flags set with the ids
    x, ids = data(1)
    pad = torch.zeros_like(ids, dtype=torch.bool)
    with dpsl_token_groups(ids, padding_mask=pad):
        r(x)
    with (
        dpsl_token_groups(ids.t().contiguous(), padding_mask=pad.t().contiguous()),
        pytest.raises(ValueError, match=r"padding flags give \[s, b\] = \[3, 6\] on this rank"),
    ):
        r(x)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(B * S, dtype=torch.long),
        torch.zeros(B, S),
        torch.zeros(B, S, dtype=torch.bool),
        [[0, 1]],
    ],
    ids=["1d", "float", "bool", "list"],
)
def test_bad_ids_are_refused_where_they_are_set(bad):
    from megatron_dpsl import dpsl_token_groups, set_dpsl_token_groups

    with pytest.raises(ValueError, match=r"group_ids must be an int tensor \[batch, seq\]"):
        with dpsl_token_groups(bad):
            pass
    with pytest.raises(ValueError, match=r"group_ids must be an int tensor \[batch, seq\]"):
        set_dpsl_token_groups(bad)


def test_missing_ids_raise_only_when_the_loss_needs_them():
    r = router()
    x, _ = data(1)
    with pytest.raises(RuntimeError, match="no per-token group ids are set for this micro-batch"):
        r(x)
    with torch.no_grad():
        r(x)  # no loss without gradients
    r.eval()
    r(x)  # nor in evaluation
