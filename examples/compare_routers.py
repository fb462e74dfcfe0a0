"""One comparison run: every router method of this plugin on the quickstart's corpus and upcycled
MoE (CPU).

    python examples/compare_routers.py                                # ~4 min on 2 CPU cores
    python examples/compare_routers.py --out /tmp/cmp --tiny          # smoke run (~1 min)

The stages are the quickstart's (``megatron_dpsl.train.quickstart``, one torchrun launch with 2
ranks):
the two-modality byte corpus (Python code vs English prose), the dense GPT, its upcycling to 8
experts (G=2, top-4, exact scaling), then one MoE run per method below, each from the same upcycled
checkpoint with the same seed, data order, steps and optimizer (EP=2). Only the router flags differ:

=====================
===================================================================================
run                    flags (each method's documented default coefficient; nothing was tuned here)
=====================
===================================================================================
aux_loss               Megatron's load-balancing loss, 1e-2 (Megatron-LM's recommended starting
value) z_loss                 aux_loss 1e-2 + z-loss 1e-3 (Megatron-LM's recommended value, ST-MoE's
c_z) expert_bias            aux-loss-free balancing: no loss, sigmoid scores (Megatron requires
                       them), expert bias updated by Megatron's finalize_model_grads at rate 1e-3
(Megatron's default) dpsl_symmetric         DPSL alone, λ 0.01 (the paper's and the config's
default), α = 1 (config default)
dpsl_modality          DPSL alone, λ 0.01, the paper's modality priors α_b 0.75, α_s 0.5 (Sec. 3.4)
variance_orthogonality Guo et al.'s recipe: aux_loss 1e-3, variance 1e-3, orthogonality 1e-4 (the
                       official code's config), paper forms
ac                     AC router on the MoE layers after the first (the paper keeps the first
                       standard), official LM defaults (eps 1e-4, clip 10, feature norm), with
aux_loss 1e-2 ac_dpsl                AC router (as ``ac``) with DPSL symmetric (as
``dpsl_symmetric``) instead of aux_loss
=====================
===================================================================================

Writes to ``--out``: ``table.md`` and ``summary.json`` (the table, wall and CPU time, each run's
flags), ``compare_usage.png`` (per-run expert usage by modality), ``compare_curves.png`` (validation
loss, CoV, entropy, distance to prior vs iteration) and TensorBoard logs under ``runs/``.
docs/comparison.md has the
measured table. A short CPU run on a byte corpus says nothing about downstream accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from megatron_dpsl.train import quickstart as qs
from megatron_dpsl.train.flag_checks import OneLineErrorParser, check_number

ALPHA = 1.0  # symmetric prior of the DPSL runs (DPSLTransformerConfig's default)
ALPHA_BASE, ALPHA_SHIFT = 0.75, 0.5  # modality priors (paper Sec. 3.4; the quickstart's)
Z_LOSS_COEFF = 1e-3
BIAS_UPDATE_RATE = 1e-3
GUO_COEFFS = (1e-3, 1e-3, 1e-4)  # aux_loss, variance, orthogonality

COLUMNS = (
    ("valid loss", "valid_loss", 4),
    ("CoV", "cov", 3),
    ("entropy", "entropy", 3),
    ("dist. to prior", "prior_distance", 5),
    ("code→E0-3", "code_on_experts_0_3", 3),
    ("prose→E4-7", "prose_on_experts_4_7", 3),
    ("ms/step", "ms_per_step", 0),
    ("CPU ms/step", "cpu_ms_per_step", 0),
)

TABLE_NOTES = (
    "Validation set after the last step, mean over the MoE layers. CoV: std/mean of the expert "
    "loads (top-k "
    "assignments). entropy: mean routing entropy (nats) of the softmax over all experts of the "
    "router logits. "
    "dist. to prior: Eq. 4 distance per expert (mean) between that softmax and the run's DPSL "
    "prior; runs "
    "without DPSL are measured against the symmetric Dir(1) reference. code→E0-3 / prose→E4-7: "
    "share of each "
    "modality's top-k assignments on the expert block the modality prior favours (0.5 = no "
    "preference). "
    "ms/step: median wall time of a training step (forward, backward, optimizer) on rank 0; "
    "CPU ms/step: the "
    "median CPU time rank 0's process spent in it (all its threads), less sensitive to other "
    "jobs on the machine."
)


def ac_layers(a: argparse.Namespace) -> list[int]:
    """Every MoE layer after the first (all layers are MoE layers; 1-based, Megatron's layer
    numbers)."""
    return list(range(2, qs.model_sizes(a.tiny)["layers"] + 1))


def method_runs(a: argparse.Namespace) -> dict[str, list]:
    """Run name -> the router flags it adds to the quickstart's MoE flags (see the module
    docstring)."""
    lam, lb, coeff = a.dpsl_coeff, "--moe-router-load-balancing-type", "--moe-aux-loss-coeff"
    ac = ["--moe-ac-layers", *ac_layers(a)]
    return {
        "aux_loss": qs.aux_loss_run(),
        "z_loss": qs.aux_loss_run() + ["--moe-z-loss-coeff", Z_LOSS_COEFF],
        "expert_bias": [
            lb,
            "none",
            "--moe-router-score-function",
            "sigmoid",
            "--moe-router-enable-expert-bias",
            "--moe-router-bias-update-rate",
            BIAS_UPDATE_RATE,
        ],
        "dpsl_symmetric": qs.dpsl_symmetric_run(lam, ALPHA),
        "dpsl_modality": qs.dpsl_modality_run(lam, ALPHA_BASE, ALPHA_SHIFT),
        "variance_orthogonality": [lb, "aux_loss", "variance", "orthogonality", coeff, *GUO_COEFFS],
        "ac": qs.aux_loss_run() + ac,
        "ac_dpsl": qs.dpsl_symmetric_run(lam, ALPHA) + ac,
    }


REPORT_FILES = ("summary.json", "table.md", "compare_usage.png", "compare_curves.png")


def check_flags(a: argparse.Namespace) -> None:
    """This example's own flag (the launch flags are ``quickstart.check_launch_args``'s)."""
    check_number("--dpsl-coeff", a.dpsl_coeff, 0)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for descendants (torchrun and its
    workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_report(out: str, names: list[str]) -> dict:
    """Table and figures of the finished runs ``names`` under ``out``; returns ``{"rows", "table",
    "figures"}``."""
    from megatron_dpsl.train import plots

    runs = qs.load_runs(out, names)
    rows = qs.table_rows(runs)
    figures = [os.path.join(out, "compare_usage.png"), os.path.join(out, "compare_curves.png")]
    plots.plot_usage(runs, figures[0], qs.GROUP_NAMES, ncols=4)
    plots.plot_curves(runs, figures[1])
    table = qs.format_table(rows, COLUMNS)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + TABLE_NOTES + "\n")
    return {
        "rows": rows,
        "table": table,
        "figures": figures,
        "upcycled": runs[0]["result"]["upcycled"],
        "argv": {run["name"]: run["result"]["argv"] for run in runs},
    }


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python examples/compare_routers.py", description=__doc__.splitlines()[0]
    )
    qs.add_launch_args(
        p, out="outputs/compare_routers", tiny_help="a very short run (smoke test, ~1 min)"
    )
    p.add_argument(
        "--dpsl-coeff",
        type=float,
        default=0.01,
        help="λ of the DPSL runs (default 0.01: the paper's and the config's default)",
    )
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    t_start = time.time()
    plan = qs.make_plan(a, method_runs(a))
    qs.prepare_launch(plan, a, "compare_routers", REPORT_FILES, checks=(check_flags,))
    meta = qs.run_plan(plan, a, t_start)
    report = write_report(plan["out"], qs.run_names(plan))
    summary = {
        "wall_s": time.time() - t_start,
        "cpu_s": cpu_seconds(),
        "seed": a.seed,
        "tiny": a.tiny,
        "dense_valid_loss": qs.dense_valid_loss(plan["out"]),
        "corpus": meta,
        "notes": TABLE_NOTES,
        **report,
    }
    with open(os.path.join(plan["out"], "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(
        f"\n=== results (dense model before upcycling: valid loss {summary['dense_valid_loss']:.4f}"
        f"{'' if summary['upcycled'] else '; UPCYCLING FAILED, MoE runs from scratch'})"
    )
    print(report["table"] + "\n\n" + TABLE_NOTES)
    print(f"\nfigures: {', '.join(report['figures'])}")
    print(
        f"compare_routers wall time: {summary['wall_s']:.0f} s, CPU time: {summary['cpu_s']:.0f} s"
    )
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
