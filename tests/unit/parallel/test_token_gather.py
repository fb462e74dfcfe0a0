"""``megatron_dpsl.parallel.token_gather.gather_for_loss`` at world size 2 under torchrun (gloo,
CPU).

Forward = all-gather of the kept ranks' rows in rank order; backward = this rank's own slice of
the (identical on every rank) output gradient × ``grad_scale``, NOT the reduce-scatter that is the
usual adjoint of an all-gather (docs/parallelism.md derives why). Inputs are float64 and the op only
copies and scales by a power-of-two-free constant once, so both sides are compared exactly.
"""

from __future__ import annotations

import json

import pytest
from support.common import torchrun
from support.workers.gather_worker import CASES  # plain data; the worker imports no Megatron

WORLD = 2

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather") / "records"
    proc = torchrun("gather_worker.py", "--out", str(out), nproc=WORLD, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_case = {}
    for rank in range(WORLD):
        for rec in json.loads(open(f"{out}.rank{rank}", encoding="utf-8").read()):
            by_case.setdefault(rec["name"], []).append(rec)
    return by_case


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_forward_is_all_gather_and_backward_is_own_slice_times_scale(records, name):
    recs = records[name]
    assert sorted(r["rank"] for r in recs) == list(range(WORLD))
    for r in recs:
        assert r["shape"] == r["expected_shape"], r
        assert r["forward_max_diff"] == 0.0, r  # a copy
        assert r["grad_max_diff"] == 0.0, r  # a slice times one float64 scale
        assert r["reduce_scatter_grad_diff"] > 0.5, r  # the usual adjoint would be WORLD× too large


def test_replicas_keep_one_copy_and_route_gradients_to_it(records):
    recs = records["replicas_deduplicated"]
    assert all(r["keep"] == [0] and r["my_slot"] == 0 for r in recs)
    assert all(r["shape"][0] == 4 for r in recs)  # one copy of the shared rows, not two
