"""The upcycled checkpoint under EP=2 (and a TP=2-saved source) vs the single-process reference.

One torchrun launch (2 ranks, gloo); see tests/support/workers/upcycle_ep_worker.py for the steps.
"""

import json

import pytest
from support.common import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # one ~50 s torchrun launch

# fp32: EP=2 sums the same per-token terms as the reference in another order (allgather/
# reduce-scatter, the all-reduce of replicated grads): a few ulps of values of order 1e-2..1.
ATOL = 1e-5


def test_upcycled_checkpoint_under_ep2(tmp_path):
    out = tmp_path / "result.json"
    proc = torchrun(
        "upcycle_ep_worker.py", "--workdir", str(tmp_path), "--out", str(out), nproc=2, timeout=600
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"torchrun failed rc={proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    r = json.loads(out.read_text())
    print(json.dumps(r, indent=1))
    assert r["source_tp2_dense_vs_ep1_moe_logits"] <= ATOL  # TP=2 dense source -> exact MoE
    assert r["ep2_vs_ep1_logits"] <= ATOL and r["ep2_vs_dense_logits"] <= ATOL
    assert r["loss_diff"] <= ATOL
    assert (
        r["all_grads_compared"] and r["min_ref_grad"] > 1e-4
    )  # every parameter compared, none vacuous
    assert r["grad_diff"] <= ATOL
    assert (
        max(abs(a - b) for a, b in zip(r["ep_losses"], r["ref_losses"])) <= 1e-4
    )  # 3 Adam steps amplify ulps
    assert r["ep_losses"][-1] < r["ep_losses"][0]
    if r["dpsl_losses"] is not None:
        assert all(x == x for x in r["dpsl_losses"]) and r["dpsl_losses"][-1] < r["dpsl_losses"][0]
