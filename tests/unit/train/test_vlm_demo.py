"""The CPU vision-language demonstration end to end: ``python -m megatron_dpsl.train.vlm_demo``.

One torchrun launch of 2 ranks through every stage (projector alignment, dense, upcycling, three MoE
runs with EP=2), then the report. Checks what the user is promised: the table with finite columns
for every run and MoE layer, the figure, ``summary.json``, and that the MoE runs started from the
upcycled checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from support.common import REPO, child_env

from megatron_dpsl.train import vlm_demo

RUNS = ("aux_loss", "dpsl_symmetric", "dpsl_modality")
COLUMNS = ("caption_loss", "answer_accuracy", "cov", "distance_vision", "distance_text",
           "vision_on_favoured", "text_on_others")  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--moe-iters", "0"], "--moe-iters: "),
        (["--nproc", "1"], "--nproc: "),
        (["--alpha-base", "-1"], "--alpha-base"),
    ],
)
def test_bad_flags_stop_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "vlm"
    with pytest.raises(SystemExit) as exit_info:
        vlm_demo.main(["--out", str(out), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_foreign_out_dir_is_refused_and_kept(tmp_path, capsys):
    """A directory the demonstration did not write is refused (``--force`` to write beside it)."""
    out = tmp_path / "mine"
    (out / "dense").mkdir(parents=True)
    (out / "dense" / "notes.txt").write_text("my notes")
    with pytest.raises(SystemExit):
        vlm_demo.main(["--out", str(out)])
    assert "--out " in capsys.readouterr().err
    assert (out / "dense" / "notes.txt").read_text() == "my notes"


@pytest.mark.slow  # two torchrun ranks through six stages: ~90 s on an idle 2-core machine
@pytest.mark.distributed
def test_vlm_demo_tiny(tmp_path):
    out = tmp_path / "vlm"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_dpsl.train.vlm_demo", "--out", str(out), "--tiny"],
        cwd=REPO, env=child_env(PYTHONWARNINGS="ignore"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    log = proc.stdout
    assert "| run | layer | caption loss | answer acc. | CoV |" in log
    assert (
        "validation loss at iteration" in log
        and "dpsl_loss:" in log
        and "load_balancing_loss:" in log
    )

    summary = json.loads((out / "summary.json").read_text())
    assert summary["upcycled"] is True, "the MoE runs did not start from the upcycled checkpoint"
    rows = summary["rows"]
    assert [(r["run"], r["layer"]) for r in rows] == [
        (name, layer) for name in RUNS for layer in (0, 1)
    ]
    for r in rows:
        for key in COLUMNS:
            assert math.isfinite(r[key]), (r["run"], r["layer"], key, r[key])
        for key in ("answer_accuracy", "vision_on_favoured", "text_on_others"):
            assert 0.0 <= r[key] <= 1.0, (r["run"], key, r[key])
    assert (out / "table.md").read_text().startswith("| run | layer |")
    figure = out / "vlm_modality_usage.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(out / "moe_init" / "latest_checkpointed_iteration.txt")
    for name in RUNS:
        result = json.loads((out / "runs" / name / "result.json").read_text())
        assert "--load" in result["argv"] and "--expert-model-parallel-size" in result["argv"]
