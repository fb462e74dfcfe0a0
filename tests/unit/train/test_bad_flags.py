"""Bad flags of the CLIs that train: exit code 2 and one line naming the flag, before anything runs.

The quickstart's table runs its ``main`` in this process (the same code path as
``python -m megatron_dpsl.train.quickstart``; one subprocess case checks the real exit status):
every case must fail in the launcher's own up-front checks, so no torchrun is started and
``--out`` is not created.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.common import child_env

from megatron_dpsl.train import quickstart as qs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _one_line_error(err: str, prog: str, flag: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: {flag}"), lines[0]


QUICKSTART_BAD_FLAGS = [
    (["--alpha", "-1"], "--alpha"),
    (["--alpha", "nan"], "--alpha"),
    (["--alpha", "inf"], "--alpha"),
    (["--dpsl-coeff", "-1"], "--dpsl-coeff"),
    (["--dpsl-coeff", "nan"], "--dpsl-coeff"),
    (["--alpha-base", "0"], "--alpha-base"),
    (["--alpha-shift", "-0.5"], "--alpha-shift"),
    (["--alpha-shift", "inf"], "--alpha-shift"),
    (["--nproc", "1"], "--nproc"),
    (["--nproc", "0"], "--nproc"),
    # 4 ranks: the tiny global batch 8 is not a multiple of micro-batch 4 x 4 ranks
    (["--nproc", "4", "--tiny"], "--nproc"),
    (["--nproc", "3"], "--nproc"),  # EP 2 does not divide 3 ranks
    (["--dense-iters", "0"], "--dense-iters"),
    (["--moe-iters", "-5"], "--moe-iters"),
    (["--corpus-bytes", "0"], "--corpus-bytes"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
]


@pytest.mark.parametrize("flags, flag", QUICKSTART_BAD_FLAGS)
def test_quickstart_bad_flag_exits_2_before_anything_runs(tmp_path, capsys, flags, flag):
    out = tmp_path / "qs"
    with pytest.raises(SystemExit) as exc:
        qs.main(["--out", str(out), *flags])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "quickstart", flag)
    assert not out.exists()  # nothing was written, let alone removed


def test_quickstart_foreign_out_exits_2_and_keeps_the_files(tmp_path, capsys):
    logs = tmp_path / "runs" / "mine" / "events.out.tfevents.1"
    logs.parent.mkdir(parents=True)
    logs.write_text("my logs")
    with pytest.raises(SystemExit) as exc:
        qs.main(["--out", str(tmp_path), "--tiny"])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "quickstart", "--out")
    assert logs.read_text() == "my logs" and sorted(os.listdir(tmp_path)) == ["runs"]


def test_quickstart_cli_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_dpsl.train.quickstart", "--out", str(tmp_path / "qs")]
        + ["--alpha", "-1"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    _one_line_error(proc.stderr, "quickstart", "--alpha")
