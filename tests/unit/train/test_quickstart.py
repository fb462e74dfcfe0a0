"""The quickstart end to end: ``python -m megatron_dpsl.train.quickstart`` (one torchrun launch, 2
ranks).

Both are multi-process end-to-end runs, in the ``slow`` suite (CI runs it): ``--tiny`` (~70 s on an
idle 2-core machine) and the full length. Both check the artefacts a newcomer is promised: the
    printed table, the figures, the TensorBoard
event files, finite metrics, a dpsl_loss for the DPSL runs and Megatron's load-balancing loss for
the aux-loss run, and that the MoE runs started from the upcycled dense model.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
from support.common import child_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RUNS = ("aux_loss", "dpsl_symmetric", "dpsl_modality")


def _run_quickstart(out, *flags, timeout):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_dpsl.train.quickstart", "--out", str(out), *flags],
        cwd=REPO,
        env=child_env(PYTHONWARNINGS="ignore"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def _check(out, log):
    # the printed table: a header and one row per run
    assert "| run | valid loss | CoV |" in log
    for name in RUNS:
        assert f"| {name} |" in log
    assert "quickstart wall time:" in log
    # Megatron-style progress lines from the workers
    assert "lm loss:" in log and "validation loss at iteration" in log

    summary = json.loads((out / "summary.json").read_text())
    assert summary["upcycled"] is True, "the MoE runs did not start from the upcycled checkpoint"
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == set(RUNS)
    for name, r in rows.items():
        for key in (
            "valid_loss",
            "cov",
            "entropy",
            "prior_distance",
            "ks_distance",
            "code_on_experts_0_3",
            "prose_on_experts_4_7",
        ):
            assert math.isfinite(r[key]), (name, key, r[key])
        assert 0 <= r["code_on_experts_0_3"] <= 1 and 0 <= r["prose_on_experts_4_7"] <= 1
        assert 0 < r["valid_loss"] < math.log(256) + 1  # a byte-level LM at or below chance
    assert rows["dpsl_symmetric"]["dpsl_loss"] > 0 and rows["dpsl_modality"]["dpsl_loss"] > 0
    assert rows["aux_loss"]["dpsl_loss"] is None and rows["aux_loss"]["load_balancing_loss"] > 0

    for fig in ("histograms", "curves", "usage"):
        path = out / f"quickstart_{fig}.png"
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in RUNS:
        assert glob.glob(str(out / "runs" / name / "tensorboard" / "events.out.tfevents.*")), name
    assert (out / "dense" / "checkpoint" / "latest_checkpointed_iteration.txt").is_file()
    assert (out / "moe_init" / "latest_checkpointed_iteration.txt").is_file()
    assert (out / "corpus" / "train_tokens.bin").is_file()
    return rows


@pytest.mark.slow  # two torchrun ranks through five stages: ~70 s
@pytest.mark.distributed
def test_quickstart_tiny(tmp_path):
    out = tmp_path / "qs"
    log = _run_quickstart(out, "--tiny", timeout=600)
    _check(out, log)


@pytest.mark.slow
@pytest.mark.distributed
def test_quickstart_full(tmp_path):
    out = tmp_path / "qs"
    log = _run_quickstart(out, timeout=1500)
    rows = _check(out, log)
    dense = json.loads((out / "summary.json").read_text())["dense_valid_loss"]
    # the MoE runs continue from the dense model: none of them ends worse than where it started
    for r in rows.values():
        assert r["valid_loss"] < dense + 0.05, r
