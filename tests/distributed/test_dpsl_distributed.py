"""Distributed DPSL exactness: torchrun (gloo, CPU) vs an unsharded single-process reference.

One launch per world size (each costs ~15 s of Megatron import); the worker runs every layout of
``dpsl_exactness_worker.CASES[world]`` and writes one record per layout. Run alone with
``pytest -m distributed tests/distributed -s`` (``-s`` shows the measured differences).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from dpsl_exactness_worker import CASES  # noqa: E402  (plain data, imports no Megatron)

pytestmark = pytest.mark.distributed

# fp32 throughout: the distributed and reference gradients sum the same per-token terms in a
# different order (gather order, DDP/TP all-reduce), so they agree to a few fp32 ulps of the
# gradient's magnitude (measured <= 1e-8 against |grad| ~ 2e-2..8e-2); 1e-6 leaves margin while a
# wrong factor (×2, ×cp, a reduce-scatter) would miss by >= 1e-2.
GRAD_ATOL = 1e-6
# the loss values are single fp32 numbers of order 0.1-1 summed over 2 micro-batches
LOSS_ATOL = 1e-6
# a reference gradient this small would make the comparison vacuous
MIN_REF_GRAD = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = {}

    def launch(world: int):
        if world not in cache:
            out = tmp_path_factory.mktemp(f"dpsl{world}") / "results.json"
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                "--master-port", str(_free_port()), os.path.join(HERE, "dpsl_exactness_worker.py"), "--out", str(out),
            ]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0 or not out.exists():
                pytest.fail(f"torchrun ({world} ranks) failed rc={proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
            cache[world] = {r["name"]: r for r in json.loads(out.read_text())}
        return cache[world]

    return launch


@pytest.mark.parametrize(
    "world,name", [(w, c["name"]) for w in sorted(CASES) for c in CASES[w]], ids=lambda v: str(v)
)
def test_dpsl_matches_single_process_reference(results, world, name):
    rec = results(world)[name]
    assert "error" not in rec, rec.get("error")
    print(
        f"\n{world} ranks {name}: max |Δ grad| = {rec['max_grad_diff']:.3e} (|ref grad|max {rec['ref_grad_max']:.3e}), "
        f"max |Δ loss| = {rec['max_loss_diff']:.3e}, gather groups (replicas) {rec['gather_groups']}"
    )
    assert rec["ref_grad_max"] > MIN_REF_GRAD
    assert rec["max_grad_diff"] <= GRAD_ATOL
    assert rec["max_loss_diff"] <= LOSS_ATOL
