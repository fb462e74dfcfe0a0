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
    assert ": error: " in lines[0] and lines[0].split(": error: ")[0].endswith(prog), lines[0]
    assert flag in lines[0].split(": error: ", 1)[1].split(":")[0], lines[0]  # the flag leads


QUICKSTART_BAD_FLAGS = [
    (["--alpha", "abc"], "--alpha"),  # argparse's own error, in one line
    (["--nproc"], "--nproc"),
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


# ---------------------------------------------------------------------------------------------
# the trainer (megatron-dpsl-train): the table fails in the flag checks before torch.distributed


TRAINER_BASE = [
    "--mock-data",
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--disable-bias-linear",
    "--device",
    "cpu",
]

TRAINER_BAD_FLAGS = [
    (["--eval-iters", "-1"], "--eval-iters"),
    (["--eval-iters", "0"], "--eval-iters"),
    (["--weight-decay", "-5"], "--weight-decay"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--min-lr=-1e-4"], "--min-lr"),
    (["--min-lr", "-1e-4"], "--min-lr"),  # argparse reads -1e-4 as a flag: its error, in one line
    (["--min-lr", "1"], "--min-lr"),  # above --lr
    (["--vocab-size", "0"], "--vocab-size"),
    (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by"),
    (["--init-method-std", "nan"], "--init-method-std"),
    (["--init-method-std", "0"], "--init-method-std"),
    (["--hidden-dropout", "1"], "--hidden-dropout"),
    (["--attention-dropout", "-0.1"], "--attention-dropout"),
    (["--adam-beta1", "1"], "--adam-beta1"),
    (["--adam-beta2", "nan"], "--adam-beta2"),
    (["--adam-eps", "0"], "--adam-eps"),
    (["--clip-grad", "-1"], "--clip-grad"),
    (["--clip-grad", "inf"], "--clip-grad"),
    (["--seed", "-1"], "--seed"),
    (["--train-iters", "0"], "--train-iters"),
    (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--global-batch-size", "0"], "--global-batch-size"),
    (["--lr-warmup-iters", "-1"], "--lr-warmup-iters"),
    (["--lr-decay-iters", "0"], "--lr-decay-iters"),
    (["--log-interval", "0"], "--log-interval"),
    (["--save-interval", "-2"], "--save-interval"),
    (["--ffn-hidden-size", "0"], "--ffn-hidden-size"),
    (["--num-query-groups", "3"], "--num-query-groups"),  # does not divide 4 heads
    (["--num-experts", "0"], "--num-experts"),
    (["--num-experts", "4", "--moe-router-topk", "0"], "--moe-router-topk"),
    (["--num-experts", "4", "--moe-router-topk", "5"], "--moe-router-topk"),
    (["--num-experts", "4", "--moe-z-loss-coeff", "-1"], "--moe-z-loss-coeff"),
    (["--num-experts", "4", "--moe-aux-loss-coeff", "nan"], "--moe-aux-loss-coeff"),
    (
        ["--num-experts", "4", "--moe-router-bias-update-rate", "inf"],
        "--moe-router-bias-update-rate",
    ),
    (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size"),  # world 1
    (["--pipeline-model-parallel-size", "0"], "--pipeline-model-parallel-size"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], "--num-layers-per-virtual-pipeline-stage"),
    (["--num-layers-per-virtual-pipeline-stage", "3"], "--num-layers-per-virtual-pipeline-stage"),
    (["--num-virtual-stages-per-pipeline-rank", "3"], "--num-virtual-stages-per-pipeline-rank"),
    (["--num-virtual-stages-per-pipeline-rank", "0"], "--num-virtual-stages-per-pipeline-rank"),
    (
        [
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            "--num-virtual-stages-per-pipeline-rank",
            "2",
        ],
        "--num-virtual-stages-per-pipeline-rank",  # argparse: not allowed with the other
    ),
    (["--recompute-granularity", "full"], "--recompute-method"),
    (
        ["--recompute-granularity", "full", "--recompute-method", "uniform"],
        "--recompute-num-layers",
    ),
    (["--recompute-granularity", "selective", "--recompute-method", "block"], "--recompute-method"),
    (["--recompute-modules", "moe"], "--recompute-modules"),
    (["--recompute-granularity", "partial"], "--recompute-granularity"),
    (["--recompute-num-layers", "0"], "--recompute-num-layers"),
    (
        ["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"],
        "--use-checkpoint-opt_param-scheduler",
    ),
]


@pytest.mark.parametrize("flags, flag", TRAINER_BAD_FLAGS)
def test_trainer_bad_flag_exits_2_before_distributed_setup(capsys, flags, flag):
    import torch.distributed as dist

    from megatron_dpsl.train.trainer import main

    was_initialized = dist.is_initialized()
    with pytest.raises(SystemExit) as exc:
        main([*TRAINER_BASE, *flags])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "megatron-dpsl-train", flag)
    assert dist.is_initialized() == was_initialized  # failed before torch.distributed


def test_trainer_flags_only_the_config_and_the_data_can_judge(tmp_path, capsys):
    """A DPSL prior (DPSLTransformerConfig's check) and a vocabulary smaller than the data's token
    ids: one line naming the flag, exit 2, instead of a traceback from inside torch."""
    from megatron_dpsl.train.trainer import main

    dpsl = ["--num-experts", "4", "--moe-router-load-balancing-type", "dpsl"]
    with pytest.raises(SystemExit) as exc:
        main([*TRAINER_BASE, *dpsl, "--moe-dpsl-alpha", "-1"])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "megatron-dpsl-train", "--moe-dpsl-alpha")

    for split in ("train", "valid"):  # byte data with token id 200
        (tmp_path / f"{split}_tokens.bin").write_bytes(bytes([200]) * 4096)
        (tmp_path / f"{split}_groups.bin").write_bytes(bytes(4096))
    base = [a for a in TRAINER_BASE if a != "--mock-data"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--data-path", str(tmp_path), "--vocab-size", "128"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    _one_line_error(err, "megatron-dpsl-train", "--vocab-size")
    assert "token id 200" in err


@pytest.mark.parametrize(
    "flags, flag",
    [(["--dpsl-coeff", "-1"], "--dpsl-coeff"), (["--nproc", "1"], "--nproc")],
)
def test_compare_routers_shares_the_up_front_checks(tmp_path, capsys, flags, flag):
    """examples/compare_routers.py launches the quickstart's stages: the same checks, its name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare_routers", os.path.join(REPO, "examples", "compare_routers.py")
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exc:
        example.main(["--out", str(out), *flags])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "compare_routers", flag)
    assert not out.exists()
