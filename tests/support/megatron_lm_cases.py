"""The command lines the Megatron-LM tests run through the real call chain
(tests/support/megatron_lm_chain.py).

Two children per test session, one per tree (unpatched and patched copy of the tag of the installed
megatron-core), run side by side: every case and build of a tree shares one Megatron-LM import.
``run_reports`` returns ``{"unpatched": {name: report}, "patched": {name: report}}``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

# scripts/ (conftest's path): the GPU stages' argv, one definition
import megatron_lm_story as story

from support.common import child_env
from support.megatron_lm_vlm_cases import VLM_BUILD_ARGV, vlm_cases

CHAIN = Path(__file__).resolve().parent / "megatron_lm_chain.py"


def readme_argv(work: Path) -> list[str]:
    """A user's command line (README/docs): list-form load balancing with a coefficient per type,
    --load/--save, --mock-data, the NullTokenizer, TensorBoard."""
    return [
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "64",
        "--max-position-embeddings",
        "64",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        "10",
        "--lr",
        "3e-4",
        "--min-lr",
        "3e-5",
        "--lr-decay-style",
        "cosine",
        "--lr-warmup-iters",
        "2",
        "--bf16",
        "--num-experts",
        "8",
        "--moe-router-topk",
        "2",
        "--moe-token-dispatcher-type",
        "alltoall",
        "--moe-router-load-balancing-type",
        "aux_loss",
        "dpsl",
        "--moe-aux-loss-coeff",
        "1e-3",
        "0.01",
        "--moe-dpsl-alpha",
        "0.75",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "1024",
        "--mock-data",
        "--save",
        str(work / "ckpt"),
        "--load",
        str(work / "ckpt"),
        "--save-interval",
        "5",
        "--eval-interval",
        "5",
        "--eval-iters",
        "2",
        "--log-interval",
        "1",
        "--tensorboard-dir",
        str(work / "tb"),
    ]


def group_argv(work: Path) -> list[str]:
    """The same with modality priors on a two-dataset blend (patched checkouts)."""
    argv = readme_argv(work)
    i = argv.index("--moe-dpsl-alpha")
    del argv[i : i + 2]
    i = argv.index("--mock-data")
    argv[i : i + 1] = [
        "--data-path",
        "1",
        str(work / "code_text_document"),
        "1",
        str(work / "prose_text_document"),
    ]
    return [*argv, *story.GROUPS]


# What the builds parse (Megatron-LM's parse_args + validate_args, then the model on one gloo rank).
BUILD_ARGV = [
    "--num-layers",
    "2",
    "--hidden-size",
    "16",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "8",
    "--max-position-embeddings",
    "8",
    "--micro-batch-size",
    "1",
    "--num-experts",
    "4",
    "--transformer-impl",
    "local",
    "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion",
    "--no-persist-layer-norm",
    "--moe-router-load-balancing-type",
    "aux_loss",
    "dpsl",
    "--moe-aux-loss-coeff",
    "0.01",
    "0",
    "--moe-dpsl-alpha",
    "0.75",
    "--moe-dpsl-coeff",
    "0.02",
    "--moe-dpsl-gather",
    "global_batch",
    "--moe-dpsl-log-interval",
    "5",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "32",
]


# The baselines without DPSL (issue 14): variance + orthogonality losses and the AC router on layer
# 2.
BASELINES_BUILD_ARGV = [
    *BUILD_ARGV[: BUILD_ARGV.index("--moe-router-load-balancing-type")],
    "--moe-router-load-balancing-type",
    "aux_loss",
    "variance",
    "orthogonality",
    "--moe-aux-loss-coeff",
    "0.01",
    "0.001",
    "0.0001",
    "--moe-ac-layers",
    "2",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "32",
]


# --moe-layer-freq values the launcher (unpatched tree) and the patched pretrain_gpt.py parse:
# Megatron-LM's pattern syntax (2 layers), and two that its eval would never finish or would fill
# the memory with
LAYER_FREQS = {"pattern": "([1]*1+[0]*1)*1", "power": "[9**9**9]", "huge": "[1]*10**9"}


def _without(argv: list, flag: str, num_values: int) -> list:
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + num_values :]


def specs(trees: dict, work: Path) -> dict:
    """The child specs: ``{"unpatched": spec, "patched": spec}``."""
    stages = story.megatron_lm_stages(work / "story")
    out = {}
    for flavor in ("unpatched", "patched"):
        cases = [
            {
                "name": "megatron_lm_readme",
                "entry": "megatron_lm",
                "argv": readme_argv(work / flavor),
            },
            {"name": "launcher_readme", "entry": "launcher", "argv": readme_argv(work / flavor)},
            {"name": "launcher_groups", "entry": "launcher", "argv": group_argv(work / flavor)},
        ]
        if flavor == "patched":
            cases.append(
                {
                    "name": "megatron_lm_groups",
                    "entry": "megatron_lm",
                    "argv": group_argv(work / flavor),
                }
            )
        # --moe-layer-freq through the flag's bounded parser, not Megatron-LM's eval (issue 24)
        entry = "megatron_lm" if flavor == "patched" else "launcher"
        cases += [
            {
                "name": f"layer_freq_{name}",
                "entry": entry,
                "argv": [*readme_argv(work / flavor), "--moe-layer-freq", freq],
            }
            for name, freq in LAYER_FREQS.items()
        ]
        cases += [
            {"name": f"story_{s.name}", "entry": s.entry, "argv": list(s.argv)}
            for s in stages
            if s.tree == flavor
        ]
        out[flavor] = {
            "tree": trees[flavor],
            "patched": flavor == "patched",
            "cases": cases,
            "builds": [
                {"name": "build", "argv": BUILD_ARGV},
                {"name": "build_baselines", "argv": BASELINES_BUILD_ARGV},
            ],
        }
    out["unpatched"]["rehearse_upcycle"] = rehearsal(work / "rehearsal")
    # a middle pipeline stage of the patched tree with group priors (megatron_lm_stage.py)
    out["patched"]["middle_stage"] = {
        "argv": [
            *_without(BUILD_ARGV, "--moe-dpsl-alpha", 1),
            *("--micro-batch-size", "2"),
            # the plain expert MLP: no fused bias-gelu (needs swiglu), no bias (megatron-core's
            # SequentialMLP adds it in place to a TP-reduced view, which autograd refuses in
            # training)
            *("--no-bias-gelu-fusion", "--disable-bias-linear"),
            *("--hidden-dropout", "0", "--attention-dropout", "0"),  # the same values on every run
            *story.GROUPS,
        ],
        "argv_without_groups": BUILD_ARGV,
    }
    # the VLM launcher (megatron_lm_vlm_cases.py) and modality priors refused by the GPT launcher
    out["unpatched"]["cases"] += [
        *vlm_cases(work),
        {
            "name": "launcher_modality",
            "entry": "launcher",
            "argv": [*group_argv(work / "unpatched"), "--moe-dpsl-token-groups", "modality"],
        },
    ]
    out["unpatched"]["builds"].append({"name": "vlm_build", "kind": "vlm", "argv": VLM_BUILD_ARGV})
    return out


def rehearsal(work: Path) -> dict:
    """The story's dense -> upcycle -> moe_dpsl path (its own argv) under ``work``: see
    megatron_lm_chain.rehearse_upcycle."""
    by_name = {s.name: s for s in story.stages(work)}
    dense = by_name["dense_launcher"]
    return {
        "dense_argv": list(dense.argv),
        "upcycle_argv": list(by_name["upcycle"].argv),
        "moe_argv": list(by_name["moe_dpsl"].argv),
        "iteration": dense.iterations,
    }


def run_reports(trees: dict, work: Path, timeout: int = 600) -> dict:
    """Run both children side by side; ``{flavor: {name: report}}`` (AssertionError with the logs on
    failure)."""
    work = Path(work)
    procs = {}
    for flavor, spec in specs(trees, work).items():
        path = work / f"chain_{flavor}.json"
        path.write_text(json.dumps(spec))
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        procs[flavor] = (
            subprocess.Popen(
                [sys.executable, str(CHAIN), str(path)],
                stdout=out,
                stderr=err,
                text=True,
                env=child_env(PYTHONWARNINGS="ignore"),
            ),
            out,
            err,
        )
    reports = {}
    for flavor, (proc, out, err) in procs.items():
        rc = proc.wait(timeout=timeout)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        lines = stdout.strip().splitlines()
        if rc != 0 or not lines:
            raise AssertionError(
                f"chain child ({flavor}) failed, rc {rc}:\n{stdout[-3000:]}\n{stderr[-6000:]}"
            )
        reports[flavor] = json.loads(lines[-1])
    return reports
