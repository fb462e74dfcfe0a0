"""Group priors under Transformer Engine's activation checkpoint on one GPU (issue 21).

Megatron's ``te_checkpoint`` (TE's reentrant ``checkpoint``; what selective ``moe`` and full
recompute use under FP8) around a ``DPSLRouter`` with group priors: two micro-batches in flight,
each forward inside ``dpsl_token_groups``, both backwards after both blocks closed. The replay in
the backward finds each micro-batch's own ids (megatron_dpsl/parallel/token_groups.py), so the
gradient equals the run without checkpoint. The CPU tests cover Megatron's and torch's checkpoints.
Run: ``pytest -m gpu tests/gpu`` (on the device: ``bash scripts/run_gpu_tests.sh``).
"""

from __future__ import annotations

import functools

import pytest
import torch
from support.gpu import HIDDEN, NUM_EXPERTS, init_megatron_cuda, make_config, require_te

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def megatron_cuda():
    init_megatron_cuda()
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _router():
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_dpsl.routing.router import DPSLRouter

    alphas = [[2.0] * (NUM_EXPERTS // 2) + [0.5] * (NUM_EXPERTS // 2)]
    alphas.append(list(reversed(alphas[0])))
    cfg = make_config(moe_dpsl_alpha=1.0, moe_dpsl_group_alphas=alphas, moe_dpsl_coeff=1.0)
    torch.manual_seed(0)
    router = DPSLRouter(cfg, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    router.set_layer_number(1)
    return router.cuda().train()


def _router_grad(checkpoint=None):
    from megatron_dpsl import dpsl_token_groups

    router = _router()
    step = functools.partial(lambda r, x: r(x)[0].float().square().sum(), router)
    losses = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(2):
        x = torch.randn(16, 2, HIDDEN, device="cuda", generator=gen, requires_grad=True)
        ids = torch.randint(0, 2, (2, 16), device="cuda", generator=gen)
        with dpsl_token_groups(ids):
            losses.append(step(x) if checkpoint is None else checkpoint(step, x))
    for loss in losses:
        loss.backward()
    return router.weight.grad.clone()


def test_te_checkpoint_replays_each_micro_batch_ids(megatron_cuda):
    require_te()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.extensions.transformer_engine import te_checkpoint

    reference = _router_grad()
    checkpointed = _router_grad(
        lambda f, x: te_checkpoint(
            f,
            False,
            tensor_parallel.random.get_cuda_rng_tracker,
            parallel_state.get_tensor_model_parallel_group(),
            x,
        )
    )
    assert reference.abs().max() > 0
    # the replay reruns the same fp32 router ops on the same input and ids
    torch.testing.assert_close(checkpointed, reference, rtol=0, atol=0)
