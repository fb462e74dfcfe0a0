"""Distributed DPSL exactness: torchrun (gloo, CPU) vs an unsharded single-process reference.

One launch per world size (each costs ~15 s of Megatron import); the worker
(``tests/support/workers/dpsl_exactness_worker.py``) runs every layout of ``CASES[world]`` and
writes one record per layout. Marked slow (about 25 s for both launches on 2 cores; CI's slow suite
and its megatron-core 0.19 leg run them): ``pytest -m slow
tests/distributed/test_dpsl_distributed.py -s`` (``-s`` shows the measured differences).
"""

from __future__ import annotations

import pytest
from support.common import records_per_world
from support.workers.dpsl_exactness_worker import CASES  # plain data, imports no Megatron

# multi-process end-to-end runs: the default suite stays under 3 minutes on 2 cores
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# fp32 throughout: the distributed and reference gradients sum the same per-token terms in a
# different order (gather order, DDP/TP all-reduce), so they agree to a few fp32 ulps of the
# gradient's magnitude (measured <= 1e-8 against |grad| ~ 2e-2..8e-2); 1e-6 leaves margin while a
# wrong factor (×2, ×cp, a reduce-scatter) would miss by >= 1e-2.
GRAD_ATOL = 1e-6
# the loss values are single fp32 numbers of order 0.1-1 summed over 2 micro-batches
LOSS_ATOL = 1e-6
# a reference gradient this small would make the comparison vacuous
MIN_REF_GRAD = 1e-3


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``results(world)`` -> {layout name: record}: one torchrun launch of the worker per world
    size."""
    return records_per_world(tmp_path_factory, "dpsl_exactness_worker.py")


@pytest.mark.parametrize(
    "world,name", [(w, c["name"]) for w in sorted(CASES) for c in CASES[w]], ids=lambda v: str(v)
)
def test_dpsl_matches_single_process_reference(results, world, name):
    rec = results(world)[name]
    assert "error" not in rec, rec.get("error")
    print(
        f"\n{world} ranks {name}: max |Δ grad| = {rec['max_grad_diff']:.3e} (|ref grad|max "
        f"{rec['ref_grad_max']:.3e}), "
        f"max |Δ loss| = {rec['max_loss_diff']:.3e}, gather groups (replicas) "
        f"{rec['gather_groups']}"
    )
    assert rec["ref_grad_max"] > MIN_REF_GRAD
    assert rec["max_grad_diff"] <= GRAD_ATOL
    assert rec["max_loss_diff"] <= LOSS_ATOL
