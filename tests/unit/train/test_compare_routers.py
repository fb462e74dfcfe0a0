"""examples/compare_routers.py: the runs it plans, its table and figure, and (slow) the whole tiny
run.

The fast tests check what makes the comparison fair (every run has the quickstart's MoE flags,
budget and seed; only the router flags differ; each method's flags build the config they are
documented to) and the report's assembly from run directories with known routing. The slow test
launches the tiny comparison end to end (torchrun, 2 ranks, EP=2, ~40 s on an idle 2-core machine).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from support.common import child_env

REPO = pathlib.Path(__file__).resolve().parents[3]
RUNS = (
    "aux_loss",
    "z_loss",
    "expert_bias",
    "dpsl_symmetric",
    "dpsl_modality",
    "variance_orthogonality",
    "ac",
    "ac_dpsl",
)


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "compare_routers", REPO / "examples" / "compare_routers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cr = _load_example()
from megatron_dpsl.train import quickstart as qs  # noqa: E402


def _plan(tmp_path, *flags):
    a = cr.build_parser().parse_args(["--out", str(tmp_path), *flags])
    return a, qs.make_plan(a, cr.method_runs(a))


def test_every_run_has_the_same_model_budget_and_seed(tmp_path):
    a, plan = _plan(tmp_path)
    stages = {s["name"]: s for s in plan["stages"] if s["kind"] == "train"}
    assert list(stages) == ["dense", *RUNS]
    common = [str(x) for x in qs.moe_argv(a)]
    for name in RUNS:
        argv = stages[name]["argv"]
        assert argv[: len(common)] == common, (
            name
        )  # upcycled checkpoint, iterations, LR schedule, seed, EP=2
        assert "--finetune" in common and "--seed" in common and "--train-iters" in common
    # the aux_loss run is the quickstart's, flag for flag
    quickstart_plan = qs.build_plan(qs.build_parser().parse_args(["--out", str(tmp_path)]))
    quickstart = {s["name"]: s for s in quickstart_plan["stages"] if s["kind"] == "train"}
    assert stages["aux_loss"]["argv"] == quickstart["aux_loss"]["argv"]
    assert stages["dense"]["argv"] == quickstart["dense"]["argv"]


# run -> config fields its flags must set (each method's documented default, docs/comparison.md)
EXPECTED = {
    "aux_loss": dict(
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=None
    ),
    "z_loss": dict(
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3
    ),
    "expert_bias": dict(
        moe_router_load_balancing_type="none",
        moe_router_enable_expert_bias=True,
        moe_router_score_function="sigmoid",
        moe_router_bias_update_rate=1e-3,
    ),
    "dpsl_symmetric": dict(
        moe_dpsl_enabled=True, moe_dpsl_coeff=0.01, moe_dpsl_alpha=1.0, moe_ac_layers=None
    ),
    "dpsl_modality": dict(
        moe_dpsl_enabled=True,
        moe_dpsl_coeff=0.01,
        moe_dpsl_alpha_base=0.75,
        moe_dpsl_alpha_shift=0.5,
        moe_dpsl_num_groups=2,
    ),
    "variance_orthogonality": dict(
        moe_variance_coeff=1e-3,
        moe_orthogonality_coeff=1e-4,
        moe_dpsl_enabled=False,
        moe_variance_loss_form="paper",
        moe_orthogonality_loss_form="paper",
    ),
    "ac": dict(
        moe_ac_layers=[2], moe_router_load_balancing_type="aux_loss", moe_dpsl_enabled=False
    ),
    "ac_dpsl": dict(
        moe_ac_layers=[2], moe_dpsl_enabled=True, moe_dpsl_coeff=0.01, moe_dpsl_alpha=1.0
    ),
}


@pytest.mark.parametrize("name", RUNS)
def test_each_run_builds_its_method(tmp_path, name):
    from megatron_dpsl.train.arguments import parse_args, validate_args
    from megatron_dpsl.train.model import config_from_args

    _, plan = _plan(tmp_path)
    argv = next(s["argv"] for s in plan["stages"] if s.get("name") == name)
    config = config_from_args(
        validate_args(parse_args(argv), world_size=2), use_cpu_initialization=True
    )
    for field, value in EXPECTED[name].items():
        assert getattr(config, field) == value, (name, field)
    assert config.moe_router_enable_expert_bias == (name == "expert_bias")
    assert (config.moe_z_loss_coeff is not None) == (name == "z_loss")


# ---------------------------------------------------------------------------------------------
# the report, from run directories with known routing


def _fake_run(out, a, name, *, specialised: bool, step_seconds, valid_loss, step_cpu_seconds=None):
    """A finished run's files: routing that sends code to experts 0-3 and prose to 4-7 (or round
    robin)."""
    from megatron_dpsl.tracking.routing_stats import summarize

    n, E = 64, 8
    ids = torch.arange(n) % 2  # code, prose, code, ...
    rmap = torch.zeros(n, E, dtype=torch.bool)
    for t in range(n):
        block = (
            int(ids[t]) * 4 if specialised else (t // 2) % 2 * 4
        )  # round robin: half of each modality
        rmap[t, block : block + 4] = True
    probs = torch.softmax(torch.randn(n, E, generator=torch.Generator().manual_seed(0)), -1)
    layers = [{"probs": probs, "routing_map": rmap, "group_ids": ids}] * 2
    summary = summarize(layers, torch.ones(E, dtype=torch.float64), num_groups=2)
    summary["iteration"] = 20
    d = os.path.join(out, "runs", name)
    os.makedirs(d)
    torch.save(
        {"history": [summary], "prior": torch.ones(E, dtype=torch.float64)},
        os.path.join(d, "routing_stats.pt"),
    )
    argv = [str(x) for x in qs.moe_argv(a) + cr.method_runs(a)[name]]
    with open(os.path.join(d, "result.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "name": name,
                "argv": argv,
                "wall_s": 1.0,
                "valid_losses": [[10, 9.0], [20, valid_loss]],
                "train_losses": [],
                "aux_losses": {},
                "upcycled": True,
                "step_seconds": step_seconds,
                "step_cpu_seconds": step_cpu_seconds,
            },
            f,
        )
    return summary


def test_report_table_and_figures(tmp_path):
    a = cr.build_parser().parse_args(["--out", str(tmp_path)])
    spec = _fake_run(
        str(tmp_path),
        a,
        "dpsl_modality",
        specialised=True,
        step_seconds=[2.0, 0.25, 0.5],
        valid_loss=2.5,
        step_cpu_seconds=[3.0, 0.375, 0.75],
    )
    _fake_run(str(tmp_path), a, "aux_loss", specialised=False, step_seconds=[0.1], valid_loss=2.75)
    report = cr.write_report(str(tmp_path), ["dpsl_modality", "aux_loss"])

    rows = {r["run"]: r for r in report["rows"]}
    assert list(rows) == ["dpsl_modality", "aux_loss"]
    assert (
        rows["dpsl_modality"]["code_on_experts_0_3"] == 1.0
        and rows["dpsl_modality"]["prose_on_experts_4_7"] == 1.0
    )
    assert (
        rows["aux_loss"]["code_on_experts_0_3"] == 0.5
        and rows["aux_loss"]["prose_on_experts_4_7"] == 0.5
    )
    assert (
        rows["dpsl_modality"]["ms_per_step"] == 500.0
    )  # the median: the first step's compile does not count
    assert (
        rows["dpsl_modality"]["cpu_ms_per_step"] == 750.0
        and rows["aux_loss"]["cpu_ms_per_step"] is None
    )
    assert (
        rows["dpsl_modality"]["valid_loss"] == 2.5 and rows["dpsl_modality"]["cov"] == 0.0
    )  # 4 x 32 per expert
    assert rows["dpsl_modality"]["entropy"] == pytest.approx(spec["entropy"])
    table = (tmp_path / "table.md").read_text()
    assert table.startswith(report["table"])
    assert (
        "| run | valid loss | CoV | entropy | dist. to prior | code→E0-3 | prose→E4-7 | "
        "ms/step | CPU ms/step |" in table
    )
    assert (
        "| dpsl_modality | 2.5000 | 0.000 |" in table and "| 1.000 | 1.000 | 500 | 750 |" in table
    )
    assert "| aux_loss | 2.7500 |" in table and "| 0.500 | 0.500 | 100 | - |" in table
    for path in report["figures"]:
        assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["argv"]["aux_loss"][-4:] == [
        "--moe-router-load-balancing-type",
        "aux_loss",
        "--moe-aux-loss-coeff",
        "0.01",
    ]


# ---------------------------------------------------------------------------------------------
# end to end


# each run's losses in Megatron's tracker (last training step): what shows the method was on
LOSSES = {
    "aux_loss": {"load_balancing_loss"},
    "z_loss": {"load_balancing_loss", "z_loss"},
    "expert_bias": set(),
    "dpsl_symmetric": {"dpsl_loss"},
    "dpsl_modality": {"dpsl_loss"},
    "variance_orthogonality": {"load_balancing_loss", "variance_loss", "orthogonality_loss"},
    "ac": {"load_balancing_loss"},
    "ac_dpsl": {"dpsl_loss"},
}


@pytest.mark.slow  # one torchrun launch: dense, upcycling, 8 MoE runs (~40 s idle, 2 cores)
@pytest.mark.distributed
def test_compare_routers_tiny_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "examples/compare_routers.py", "--tiny", "--out", str(out)],
        cwd=REPO,
        env=child_env(PYTHONWARNINGS="ignore"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert (
        "| run | valid loss | CoV |" in proc.stdout and "compare_routers wall time:" in proc.stdout
    )

    summary = json.loads((out / "summary.json").read_text())
    assert summary["upcycled"] is True and summary["cpu_s"] > 0 and summary["wall_s"] > 0
    assert [r["run"] for r in summary["rows"]] == list(RUNS)
    for r in summary["rows"]:
        for key in (
            "valid_loss",
            "cov",
            "entropy",
            "prior_distance",
            "code_on_experts_0_3",
            "prose_on_experts_4_7",
            "ms_per_step",
            "cpu_ms_per_step",
        ):
            assert math.isfinite(r[key]), (r["run"], key)
        assert 0 < r["valid_loss"] < math.log(256) + 1
    for name in RUNS:
        result = json.loads((out / "runs" / name / "result.json").read_text())
        tracked = {
            k
            for k, v in result["aux_losses"].items()
            if not k.startswith("dpsl_") or k == "dpsl_loss"
        }
        assert tracked == LOSSES[name], name
        assert len(result["step_seconds"]) == len(result["train_losses"]) == 8
        # Megatron's expert-bias update ran in the 2-rank run (rank 0's routers; the update
        # all-reduces loads)
        biases = result["expert_bias"]
        assert len(biases) == (2 if name == "expert_bias" else 0)
        assert all(any(b != 0 for b in layer) for layer in biases)
        assert all(
            max(abs(b) for b in layer) <= 8 * 1e-3 + 1e-9 for layer in biases
        )  # one step per iteration
    for path in summary["figures"]:
        assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
