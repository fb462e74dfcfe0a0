"""Distributed AC router exactness: torchrun (gloo, CPU) vs an unsharded single-process reference.

One launch per world size; the worker (``tests/support/workers/ac_exactness_worker.py``) runs every
layout of ``CASES[world]``: TP+SP, CP, EP, DP, TP×EP (both expert-TP sizes), TP×CP, CP×DP, an EP
group that spans two TP groups, AC together with DPSL, and a two-stage pipeline. Marked ``slow``
(CI's slow suite runs them); run alone with ``pytest -m distributed
tests/distributed/test_ac_distributed.py -s``
(``-s`` prints the figures).
"""

from __future__ import annotations

import pytest
from support.common import records_per_world
from support.workers.ac_exactness_worker import CASES  # plain data, imports no Megatron

# both launches are slow (~25 s and ~45 s on 2 cores): the default suite stays under 3 minutes
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# fp32 throughout. The dispersion sums are added in another order across ranks, which moves the AC
# weights by ~1e-7 relative: measured probabilities differ by <= 3e-7 and router-weight gradients by
# <= 7.5e-7 × max|grad| (|grad| 3-9) on the 11 layouts. 2e-6 and 1e-5 leave margin, while unreduced
# statistics move the probabilities by 0.7-0.9 and a wrong gradient factor (×2, ×cp, a missing TP
# sum) moves the gradient by ~1 × max|grad|.
PROBS_ATOL = 2e-6
GRAD_RTOL = 1e-5
# a reference gradient this small would make the comparison vacuous
MIN_REF_GRAD = 1e-1
# the statistics are shared across ranks in this layout: leaving them unreduced must show
MIN_UNREDUCED_DIFF = 1e-2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``results(world)`` -> {layout name: record}: one torchrun launch of the worker per world
    size."""
    return records_per_world(tmp_path_factory, "ac_exactness_worker.py")


@pytest.mark.parametrize(
    "world,name",
    [(w, c["name"]) for w in sorted(CASES) for c in CASES[w] if c.get("kind") != "pipeline"],
    ids=lambda v: str(v),
)
def test_ac_router_matches_single_process_reference(results, world, name):
    rec = results(world)[name]
    assert "error" not in rec, rec.get("error")
    print(
        f"\n{world} ranks {name}: max |Δ probs| = {rec['max_probs_diff']:.2e}, routing-map "
        "mismatches "
        f"{rec['routing_map_mismatches']}, max |Δ grad| = {rec['max_grad_diff']:.2e} (|ref "
        "grad|max "
        f"{rec['ref_grad_max']:.2e}); unreduced statistics would move probs by "
        f"{rec['unreduced_probs_diff']:.2f}; "
        f"AC reroutes {rec['tokens_rerouted_by_ac']} tokens; statistics sets {rec['stat_sets']}"
    )
    assert rec["ref_grad_max"] > MIN_REF_GRAD
    assert (
        rec["tokens_rerouted_by_ac"] > 0
    )  # AC changes the routing: the comparison is of AC routing
    assert rec["routing_map_mismatches"] == 0
    assert rec["max_probs_diff"] <= PROBS_ATOL
    assert rec["max_grad_diff"] <= GRAD_RTOL * rec["ref_grad_max"]
    if rec["sharded_statistics"]:
        assert rec["unreduced_probs_diff"] > MIN_UNREDUCED_DIFF


def test_first_ac_layer_of_a_pipeline_stage_routes_standard_and_the_next_uses_the_hand_over(
    results,
):
    """GPTModel in two real pipeline stages (layers 1-2 | 3-4): the stage-2 model chunk has its own
    state."""
    rec = results(2)["pp2_stage_boundary"]
    assert "error" not in rec, rec.get("error")
    assert rec["stage_layers"] == [[1, 2], [3, 4]]
    assert rec[
        "first_ac_layer_of_stage_is_standard"
    ]  # moe_ac_layers [2, 3, 4] == [2, 4], bit for bit
    assert rec["later_ac_layer_uses_hand_over"]  # and != [2]: layer 4 used layer 3's assignment
    assert rec["warned_once_on_stage_2"]
