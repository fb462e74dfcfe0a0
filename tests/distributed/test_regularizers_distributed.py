"""Distributed variance + orthogonality exactness: torchrun (gloo, CPU) vs an unsharded reference.

One launch per world size (each costs ~15 s of Megatron import); the worker
(``tests/support/workers/regularizer_exactness_worker.py``) runs every layout of ``CASES[world]``
and writes one record per layout. Marked slow (about a minute for both launches on 2 cores):
``pytest -m slow tests/distributed/test_regularizers_distributed.py -s`` (``-s`` prints the measured
differences).
"""

from __future__ import annotations

import pytest
from support.common import records_per_world
from support.workers.regularizer_exactness_worker import CASES  # plain data, imports no Megatron

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# fp32 throughout: reference and layer add the same per-token terms in another order (per-token vs
# batched matmuls, per-shard partial sums, DDP/TP reductions). A gradient entry sums at most 2
# micro- batches × 64 token terms, so rounding stays well under 1e-5 of the largest entry (measured
# <= 3e-6); a wrong factor (×2, ×cp, ×replicas, a dropped or double-counted shard) misses by >= 0.3
# of it.
GRAD_RTOL_OF_MAX = 1e-5
# logged losses are single fp32 values of order 0.1-2 summed over 2 micro-batches (measured <=
# 2.1e-7)
LOSS_ATOL = 1e-6
# reference gradients this small would make the comparison vacuous
MIN_REF_ROUTER_GRAD, MIN_REF_EXPERT_GRAD = 1e-3, 1e-2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``results(world)`` -> {layout name: record}: one torchrun launch of the worker per world
    size."""
    return records_per_world(tmp_path_factory, "regularizer_exactness_worker.py")


@pytest.mark.parametrize(
    "world,name", [(w, c["name"]) for w in sorted(CASES) for c in CASES[w]], ids=lambda v: str(v)
)
def test_variance_and_orthogonality_match_single_process_reference(results, world, name):
    rec = results(world)[name]
    assert "error" not in rec, rec.get("error")
    print(
        f"\n{world} ranks {name}: max |Δ router grad| = {rec['max_router_grad_diff']:.2e} "
        f"(|ref|max {rec['ref_router_grad_max']:.2e}), max |Δ expert grad| = "
        f"{rec['max_expert_grad_diff']:.2e} "
        f"(|ref|max {rec['ref_expert_grad_max']:.2e}), max |Δ logged loss| = "
        f"{rec['max_loss_diff']:.2e}, "
        f"variance gather groups {rec['gather_groups']}"
    )
    assert (
        rec["ref_router_grad_max"] > MIN_REF_ROUTER_GRAD
        and rec["ref_expert_grad_max"] > MIN_REF_EXPERT_GRAD
    )
    assert rec["max_router_grad_diff"] <= GRAD_RTOL_OF_MAX * rec["ref_router_grad_max"]
    assert rec["max_expert_grad_diff"] <= GRAD_RTOL_OF_MAX * rec["ref_expert_grad_max"]
    assert rec["max_loss_diff"] <= LOSS_ATOL
    assert rec["ref_logged"]["variance_loss"] < 0 < rec["ref_logged"]["orthogonality_loss"]
