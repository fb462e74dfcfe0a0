"""The quickstart: dense GPT -> granular upcycling -> three MoE runs (aux loss, DPSL, DPSL modality
priors).

    # 3-5 min on 2 CPU cores
    python -m megatron_dpsl.train.quickstart --out outputs/quickstart
    python -m megatron_dpsl.train.quickstart --out /tmp/qs --tiny              # smoke run, ~1 min

1. builds a byte-level corpus from text on this machine: Python stdlib sources (group 0, "code") and
   licence/copyright prose (group 1, "prose"), every byte tagged with its document's group
   (``megatron_dpsl.train.corpus``);
2. trains a tiny dense GPT (2 ranks, data parallel) and saves it in Megatron-LM's layout;
3. upcycles it with the converter (``megatron-dpsl-upcycle``) into 8 experts, granularity 2, top-4,
   virtual-group router, exact weight scaling (the MoE starts as the dense function);
4. trains the MoE three times under one ``torchrun`` launch with 2 ranks (EP=2): Megatron's
   ``aux_loss``; DPSL with a symmetric prior; DPSL with modality priors (α_b, α_s per group);
5. writes to ``--out``: PNG figures (per-expert routing histograms vs the Beta(α, A−α) pdf as in the
   paper's Fig. 7; CoV / entropy / distance-to-prior / validation-loss curves; per-modality usage),
   TensorBoard event files (``runs/*/tensorboard``), ``summary.json``, ``table.md`` and prints the
   table.

All training happens in one ``torchrun`` launch (``--worker``): each launch costs ~15 s of
megatron-core import on a laptop, so the stages run one after another in the same two processes.
While the workers import, this (launcher) process builds the corpus; once the workers have saved the
dense checkpoint it runs the converter (``megatron_dpsl.upcycle.upcycle``, a single-process tool)
and hands over through marker files (``moe_init.done`` / ``moe_init.failed``). If the converter is
missing or fails, the MoE runs start from a random initialisation and the report says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

from megatron_dpsl.train import out_dir
from megatron_dpsl.train.flag_checks import OneLineErrorParser, check_number
from megatron_dpsl.train.trainer import free_port  # stdlib-only at import time, like this module

GROUP_NAMES = ("code", "prose")


def _stamp(t0: float) -> str:
    """Seconds since ``t0``, the quickstart's start (progress lines)."""
    return f"[{time.time() - t0:6.1f} s]"


# ---------------------------------------------------------------------------------------------
# the plan: what each stage runs (plain data, written to JSON for the torchrun workers)


def model_sizes(tiny: bool) -> dict:
    """The dense GPT's (and the upcycled MoE's) shape: the full quickstart or the ``--tiny`` smoke
    run."""
    hidden, ffn, layers, heads = (32, 128, 2, 4) if tiny else (64, 256, 2, 4)
    return {
        "hidden": hidden,
        "ffn": ffn,
        "layers": layers,
        "heads": heads,
        "seq": 64 if tiny else 128,
    }


NUM_EXPERTS, GRANULARITY, TOPK = 8, 2, 4  # 8 experts, G = 2 (4 copies of the dense FFN), top-4


def common_argv(a: argparse.Namespace) -> list:
    """Trainer flags shared by the dense and the MoE runs: model, batch, data, seed, logging."""
    out, tiny, m = os.path.abspath(a.out), a.tiny, model_sizes(a.tiny)
    return [
        "--num-layers",
        m["layers"],
        "--hidden-size",
        m["hidden"],
        "--ffn-hidden-size",
        m["ffn"],
        "--num-attention-heads",
        m["heads"],
        "--seq-length",
        m["seq"],
        "--max-position-embeddings",
        m["seq"],
        "--vocab-size",
        256,
        "--disable-bias-linear",
        "--hidden-dropout",
        0.0,
        "--attention-dropout",
        0.0,
        "--micro-batch-size",
        4 if tiny else 8,
        "--global-batch-size",
        8 if tiny else 16,
        "--data-path",
        os.path.join(out, "corpus"),
        "--seed",
        a.seed,
        "--lr-decay-style",
        "cosine",
        "--log-interval",
        5 if tiny else 20,
        "--eval-iters",
        1 if tiny else 4,
        "--device",
        "cpu",  # the quickstart is the laptop demo: CPU + gloo even where a GPU exists
    ]


def dense_stage(a: argparse.Namespace) -> dict:
    """Stage 2: the dense GPT (data parallel), saved in Megatron-LM's layout."""
    out = os.path.abspath(a.out)
    iters = a.dense_iters or (10 if a.tiny else 300)
    argv = common_argv(a) + [
        "--train-iters",
        iters,
        "--lr",
        3e-3,
        "--min-lr",
        3e-4,
        "--lr-warmup-iters",
        max(1, iters // 10),
        "--eval-interval",
        iters,
        "--save",
        os.path.join(out, "dense", "checkpoint"),
        "--tensorboard-dir",
        os.path.join(out, "dense", "tensorboard"),
    ]
    return {"kind": "train", "name": "dense", "argv": argv, "dir": os.path.join(out, "dense")}


def upcycle_stage(a: argparse.Namespace) -> dict:
    """Stage 3: the converter's options (dense checkpoint -> 8 experts, G = 2, top-4, exact
    scaling)."""
    out = os.path.abspath(a.out)
    options = dict(
        src=os.path.join(out, "dense", "checkpoint"),
        dst=os.path.join(out, "moe_init"),
        num_experts=NUM_EXPERTS,
        granularity=GRANULARITY,
        moe_router_topk=TOPK,
        router_init="virtual-group",
        weight_scaling="exact",
        seed=a.seed,
        force=True,
        progress=False,
    )
    return {"kind": "upcycle", "options": options, "dir": os.path.join(out, "moe_init")}


def moe_argv(a: argparse.Namespace) -> list:
    """Trainer flags of every MoE run: the upcycled model on 2 ranks (EP=2), loaded with
    --finetune."""
    iters = a.moe_iters or (8 if a.tiny else 120)
    return common_argv(a) + [
        "--num-experts",
        NUM_EXPERTS,
        "--moe-router-topk",
        TOPK,
        "--moe-ffn-hidden-size",
        model_sizes(a.tiny)["ffn"] // GRANULARITY,
        "--expert-model-parallel-size",
        2,
        "--train-iters",
        iters,
        "--lr",
        1e-3,
        "--min-lr",
        1e-4,
        "--lr-warmup-iters",
        max(1, iters // 20),
        "--eval-interval",
        max(1, iters // (2 if a.tiny else 6)),
        "--load",
        os.path.join(os.path.abspath(a.out), "moe_init"),
        "--finetune",
    ]


def aux_loss_run(coeff: float = 1e-2) -> list:
    """Megatron's load-balancing loss (GShard/Switch) at Megatron-LM's recommended starting
    coefficient."""
    return ["--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", coeff]


def dpsl_symmetric_run(lam: float, alpha: float) -> list:
    """DPSL alone with a symmetric prior Dir(α, ..., α)."""
    return [
        "--moe-router-load-balancing-type",
        "dpsl",
        "--moe-dpsl-coeff",
        lam,
        "--moe-dpsl-alpha",
        alpha,
    ]


def dpsl_modality_run(lam: float, alpha_base: float, alpha_shift: float) -> list:
    """DPSL alone with the paper's modality priors (Sec. 3.4): code -> experts 0-3, prose -> experts
    4-7."""
    return [
        "--moe-router-load-balancing-type",
        "dpsl",
        "--moe-dpsl-coeff",
        lam,
        "--moe-dpsl-alpha-base",
        alpha_base,
        "--moe-dpsl-alpha-shift",
        alpha_shift,
        "--moe-dpsl-num-groups",
        len(GROUP_NAMES),
    ]


# --out's entries every launch writes besides runs/<name> (the caller adds its report files)
STAGE_OUTPUTS = ("plan.json", "corpus", "dense", "moe_init", "moe_init.done", "moe_init.failed")
REPORT_FILES = ("summary.json", "table.md") + tuple(
    f"quickstart_{n}.png" for n in ("histograms", "curves", "usage")
)


def make_plan(a: argparse.Namespace, runs: dict[str, list]) -> dict:
    """The stages of one launch: dense, upcycle, then one MoE run per ``runs`` entry (name -> extra
    flags)."""
    out = os.path.abspath(a.out)
    stages = [dense_stage(a), upcycle_stage(a)]
    for name, extra in runs.items():
        d = os.path.join(out, "runs", name)
        stages.append(
            {
                "kind": "train",
                "name": name,
                "dir": d,
                "argv": moe_argv(a)
                + list(extra)
                + [
                    "--tensorboard-dir",
                    os.path.join(d, "tensorboard"),
                    "--routing-stats-path",
                    os.path.join(d, "routing_stats.pt"),
                ],
            }
        )
    for s in stages:
        if "argv" in s:
            s["argv"] = [str(x) for x in s["argv"]]
    return {
        "out": out,
        "stages": stages,
        "corpus_meta": os.path.join(out, "corpus", "meta.json"),
        # what the launch writes under --out (out_dir.claim records it; nothing else is touched)
        "outputs": [*STAGE_OUTPUTS, *(f"runs/{name}" for name in runs)],
    }


def build_plan(a: argparse.Namespace) -> dict:
    """The quickstart's plan: Megatron's aux loss, DPSL symmetric, DPSL modality priors."""
    return make_plan(
        a,
        {
            "aux_loss": aux_loss_run(),
            "dpsl_symmetric": dpsl_symmetric_run(a.dpsl_coeff, a.alpha),
            "dpsl_modality": dpsl_modality_run(a.dpsl_coeff, a.alpha_base, a.alpha_shift),
        },
    )


def _wait_for(paths: list[str], timeout: float, alive=lambda: True) -> str:
    """The first of ``paths`` to exist (polling; the stages hand over through files)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in paths:
            if os.path.exists(path):
                return path
        if not alive():
            raise RuntimeError(f"quickstart: gave up waiting for {paths[0]}: the other side exited")
        time.sleep(0.2)
    raise TimeoutError(f"quickstart: {paths[0]} did not appear within {timeout:.0f} s")


# ---------------------------------------------------------------------------------------------
# the torchrun worker


def _worker(plan_path: str) -> None:
    import torch.distributed as dist

    from megatron_dpsl.train.trainer import initialize_distributed, shutdown

    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    initialize_distributed(argparse.Namespace(device="cpu", distributed_backend="gloo"))
    _wait_for([plan["corpus_meta"]], timeout=600)  # the launcher builds it while we import
    upcycled = True
    try:
        for stage in plan["stages"]:
            if stage["kind"] == "upcycle":
                upcycled = _upcycle_verdict(stage, dist.get_rank())
            else:
                _train_stage(stage, plan["t0"], upcycled, dist.get_rank())
    finally:
        shutdown()


def _upcycle_verdict(stage: dict, rank: int) -> bool:
    """Whether the launcher's conversion succeeded (the converter is single-process and runs in
    the launcher), agreed on by every rank."""
    import torch.distributed as dist

    from megatron_dpsl.train.trainer import print_rank_0

    ok = [True]
    if rank == 0:
        done = _wait_for([stage["dir"] + ".done", stage["dir"] + ".failed"], timeout=1200)
        ok = [done.endswith(".done")]
    dist.broadcast_object_list(ok, src=0)
    if not ok[0]:
        print_rank_0(
            "!!! upcycling failed: the MoE runs start from a random initialisation instead"
        )
    return ok[0]


def _train_stage(stage: dict, t_start: float, upcycled: bool, rank: int) -> None:
    """One training stage; rank 0 writes its ``result.json``. Progress stamps count from the
    launcher's start ``t_start``."""
    from megatron_dpsl.train.arguments import parse_args
    from megatron_dpsl.train.trainer import pretrain, print_rank_0

    t0 = time.time()
    argv = list(stage["argv"])
    if not upcycled and "--load" in argv:
        i = argv.index("--load")
        del argv[i : i + 2]
        argv.remove("--finetune")
    print_rank_0(f"\n=== {_stamp(t_start)} {stage['name']}: megatron-dpsl-train {' '.join(argv)}")
    result = pretrain(parse_args(argv))
    if rank != 0:
        return
    os.makedirs(stage["dir"], exist_ok=True)
    with open(os.path.join(stage["dir"], "result.json"), "w", encoding="utf-8") as f:
        json.dump(_stage_result(stage, argv, result, time.time() - t0, upcycled), f)


def _stage_result(stage: dict, argv: list, result, wall_s: float, upcycled: bool) -> dict:
    """What ``result.json`` holds for one training stage."""
    return {
        "name": stage["name"],
        "argv": argv,
        "wall_s": wall_s,
        "train_losses": result.train_losses,
        "valid_losses": result.valid_losses,
        "aux_losses": result.aux_losses,
        "upcycled": upcycled,
        "optimizer_impl": result.optimizer_impl,
        "schedule_impl": result.schedule_impl,
        "step_seconds": result.step_seconds,
        "step_cpu_seconds": result.step_cpu_seconds,
        # aux-loss-free balancing: each MoE layer's final expert bias (else empty)
        "expert_bias": [
            m.expert_bias.tolist()
            for m in result.model.modules()
            if getattr(m, "expert_bias", None) is not None
        ],
    }


# ---------------------------------------------------------------------------------------------
# the report


def load_runs(out: str, names: list[str]) -> list[dict]:
    """Each run's ``result.json`` and routing statistics, in ``names`` order (the dicts ``plots``
    takes)."""
    import torch

    from megatron_dpsl.megatron_lm.args import dpsl_enabled
    from megatron_dpsl.train.arguments import parse_args

    runs = []
    for name in names:
        d = os.path.join(out, "runs", name)
        with open(os.path.join(d, "result.json"), encoding="utf-8") as f:
            result = json.load(f)
        stats = torch.load(os.path.join(d, "routing_stats.pt"), weights_only=False)
        runs.append(
            {
                "name": name,
                "prior": stats["prior"],
                "history": stats["history"],
                "valid_losses": [tuple(v) for v in result["valid_losses"]],
                "result": result,
                # without DPSL the distances are to the symmetric Dir(1) reference, not a prior of
                # the run
                "reference_prior": not dpsl_enabled(parse_args(result["argv"])),
            }
        )
    return runs


def table_rows(runs: list[dict]) -> list[dict]:
    """One row of final-evaluation metrics per run (layer means; see ``TABLE_NOTES``)."""
    rows = []
    for run in runs:
        final = run["history"][-1]
        layers = final["layers"]
        E = run["prior"].shape[-1]
        half = E // 2
        usage = sum(layer["group_usage"] for layer in layers) / len(layers)  # [G, E]
        aux = run["result"]["aux_losses"]
        dpsl = aux.get("dpsl_loss")
        steps, cpu_steps = (
            run["result"].get("step_seconds") or [],
            run["result"].get("step_cpu_seconds") or [],
        )
        rows.append(
            {
                "run": run["name"],
                "valid_loss": run["valid_losses"][-1][1],
                "cov": final["cov"],
                "entropy": final["entropy"],
                "prior_distance": final["prior_distance"],
                "ks_distance": final["ks_distance"],
                "code_on_experts_0_3": float(usage[0, :half].sum()),
                "prose_on_experts_4_7": float(usage[1, half:].sum()),
                "dpsl_loss": None if not dpsl else dpsl[-1][1],
                "load_balancing_loss": None
                if not aux.get("load_balancing_loss")
                else aux["load_balancing_loss"][-1][1],
                "wall_s": run["result"]["wall_s"],
                # the median: robust to the first step's one-off compilation and to other jobs on
                # the machine
                "ms_per_step": 1000.0 * statistics.median(steps) if steps else None,
                "cpu_ms_per_step": 1000.0 * statistics.median(cpu_steps)
                if cpu_steps
                else None,  # rank 0's process
            }
        )
    return rows


# (header, row key, decimals) of the quickstart's table
QUICKSTART_COLUMNS = (
    ("valid loss", "valid_loss", 4),
    ("CoV", "cov", 3),
    ("entropy", "entropy", 3),
    ("dist. to prior", "prior_distance", 5),
    ("KS", "ks_distance", 3),
    ("code→E0-3", "code_on_experts_0_3", 3),
    ("prose→E4-7", "prose_on_experts_4_7", 3),
    ("dpsl_loss", "dpsl_loss", 5),
    ("lb loss", "load_balancing_loss", 3),
    ("wall s", "wall_s", 0),
)


def format_table(rows: list[dict], columns=QUICKSTART_COLUMNS) -> str:
    """A Markdown table: the run name, then one column per ``(header, key, decimals)``; None prints
    as -."""
    head = "| run | " + " | ".join(h for h, _, _ in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for r in rows:
        cells = ["-" if r[key] is None else f"{r[key]:.{p}f}" for _, key, p in columns]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLE_NOTES = (
    "Validation set, final step, mean over MoE layers. CoV: std/mean of expert loads (top-k "
    "assignments). "
    "entropy: mean routing entropy (nats, softmax over all experts). dist. to prior: Eq. 4 "
    "distance per expert "
    "(mean), to the run's prior (aux_loss: to the symmetric Dir(1) reference); KS: "
    "Kolmogorov–Smirnov distance "
    "to the same marginals. code→E0-3 / prose→E4-7: share of each modality's top-k assignments "
    "landing on the "
    "expert block its modality prior favours (0.5 = no preference). dpsl_loss: λ·DPSL, lb "
    "loss: Megatron's "
    "load_balancing_loss / coeff (last training step)."
)


# ---------------------------------------------------------------------------------------------
# entry point


def add_launch_args(
    p: argparse.ArgumentParser, *, out: str, tiny_help: str
) -> argparse.ArgumentParser:
    """The flags of one launch (output, sizes, ranks, seed), shared with
    ``examples/compare_routers.py``."""
    p.add_argument(
        "--out",
        default=out,
        help="output directory: new, empty, or one this launch wrote before (its outputs there are "
        "replaced; files it did not write never are)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out the quickstart did not create, beside its files (an "
        "existing path named like an output is still refused, never replaced)",
    )
    p.add_argument("--tiny", action="store_true", help=tiny_help)
    p.add_argument("--nproc", type=int, default=2, help="ranks (EP = 2 needs 2)")
    p.add_argument(
        "--dense-iters", type=int, default=None, help="dense iterations (default 300, tiny 10)"
    )
    p.add_argument(
        "--moe-iters",
        type=int,
        default=None,
        help="iterations of each MoE run (default 120, tiny 8)",
    )
    p.add_argument(
        "--corpus-bytes",
        type=int,
        default=None,
        help="bytes per modality (default 1 MB, tiny 200 kB)",
    )
    p.add_argument("--seed", type=int, default=1234)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m megatron_dpsl.train.quickstart", description=__doc__.splitlines()[0]
    )
    add_launch_args(p, out="outputs/quickstart", tiny_help="a very short run (smoke test, ~1 min)")
    p.add_argument(
        "--dpsl-coeff",
        type=float,
        default=0.1,
        help="λ (the paper's default 0.01 suits long runs; this short run uses its ablation's 0.1)",
    )
    p.add_argument(
        "--alpha", type=float, default=1.0, help="symmetric prior α of the dpsl_symmetric run"
    )
    p.add_argument(
        "--alpha-base", type=float, default=0.75, help="α_b of the modality run (paper: 0.75)"
    )
    p.add_argument(
        "--alpha-shift", type=float, default=0.5, help="α_s of the modality run (paper: 0.5)"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # run_plan's torchrun ranks
    return p


# ---------------------------------------------------------------------------------------------
# up-front checks: every stage's flags, in this process, before anything runs or is removed


def check_launch_args(a: argparse.Namespace) -> None:
    """The flags of ``add_launch_args``; ValueError naming the flag."""
    check_number("--nproc", a.nproc, 2, integer=True, note="the MoE runs use expert parallelism 2")
    for flag, value in (
        ("--dense-iters", a.dense_iters),
        ("--moe-iters", a.moe_iters),
        ("--corpus-bytes", a.corpus_bytes),
    ):
        if value is not None:
            check_number(flag, value, 1, integer=True)
    check_number("--seed", a.seed, 0, 2**32 - 1, integer=True, note="NumPy's seed range")


def check_quickstart_flags(a: argparse.Namespace) -> None:
    """The quickstart's DPSL flags, by the priors' own validator under the user's flag names."""
    from megatron_dpsl.losses.priors import resolve_alpha

    check_number("--dpsl-coeff", a.dpsl_coeff, 0)
    resolve_alpha(NUM_EXPERTS, alpha=a.alpha, names={"alpha": "--alpha"})
    resolve_alpha(
        NUM_EXPERTS,
        alpha_base=a.alpha_base,
        alpha_shift=a.alpha_shift,
        num_groups=len(GROUP_NAMES),
        names={"alpha_base": "--alpha-base", "alpha_shift": "--alpha-shift"},
    )


def check_plan(plan: dict, nproc: int) -> None:
    """Every training stage's trainer flags, parsed and validated as its ``nproc`` workers will."""
    from megatron_dpsl.megatron_lm.args import check_given_flags
    from megatron_dpsl.train.arguments import parse_args, validate_args

    for stage in plan["stages"]:
        if stage["kind"] != "train":
            continue
        try:
            args = validate_args(parse_args(stage["argv"]), nproc)
            check_given_flags(args)
        except ValueError as err:
            raise ValueError(
                f"--nproc {nproc}: the {stage['name']} stage cannot run: {err}"
            ) from None


def prepare_launch(
    plan: dict, a: argparse.Namespace, prog: str, report_files=REPORT_FILES, checks=()
) -> None:
    """Before anything runs: check every flag (``checks``: more callables of ``a``), the plotting
    packages, then claim ``--out`` for the plan's outputs and ``report_files`` (``out_dir.claim``).

    Bad input prints one line naming the flag and exits with code 2, as argparse does.
    """
    try:
        check_launch_args(a)
        for check in checks:
            check(a)
        check_plan(plan, a.nproc)
        check_plot_dependencies(prog)
        out_dir.claim(plan["out"], [*plan["outputs"], *report_files], force=a.force)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _run_upcycle(plan: dict, alive) -> None:
    """Upcycle the dense checkpoint once the workers have saved it (here: the converter is
    single-process).

    Writes ``moe_init.done`` or ``moe_init.failed`` next to the output for the workers to read.
    """
    stage = next(s for s in plan["stages"] if s["kind"] == "upcycle")
    opts = dict(stage["options"])
    try:
        from megatron_dpsl.upcycle import upcycle
    except Exception as err:  # noqa: BLE001 - any import failure means: fall back, loudly
        print(
            f"!!! quickstart: the upcycler is unavailable ({err!r}); MoE runs start from scratch",
            flush=True,
        )
        open(stage["dir"] + ".failed", "w").close()
        return
    tracker = os.path.join(opts["src"], "latest_checkpointed_iteration.txt")
    try:
        _wait_for([tracker], timeout=1800, alive=alive)
    except RuntimeError:
        return  # the workers died before saving the dense model: main() reports their exit status
    src, dst = opts.pop("src"), opts.pop("dst")
    print(
        f"\n=== {_stamp(plan['t0'])} upcycle (megatron_dpsl.upcycle): {src} -> {dst} {opts}",
        flush=True,
    )
    try:
        upcycle(src, dst, **opts)
    except Exception as err:  # noqa: BLE001
        print(
            f"!!! quickstart: upcycling failed ({err!r}); MoE runs start from scratch", flush=True
        )
        open(stage["dir"] + ".failed", "w").close()
        return
    open(stage["dir"] + ".done", "w").close()


def check_plot_dependencies(prog: str) -> None:
    """SystemExit naming the package when the figures or TensorBoard logs could not be written."""
    missing = [m for m in ("matplotlib", "tensorboard") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"{prog}: needs {', '.join(missing)}: pip install 'megatron-dpsl[plots]' "
            "(or run bash scripts/quickstart.sh, which installs the test extras)"
        )


def run_plan(plan: dict, a: argparse.Namespace, t_start: float) -> dict:
    """Run every stage of ``plan`` in one torchrun launch of ``a.nproc`` ranks; returns the corpus
    metadata.

    Call ``prepare_launch`` first: it checks the flags and claims ``--out`` (this removes nothing).
    Builds the corpus and runs the converter in this process while the workers import and train.
    SystemExit if the workers fail.
    """
    return launch_plan(
        plan,
        a.nproc,
        t_start,
        module="megatron_dpsl.train.quickstart",
        prog="quickstart",
        while_importing=lambda: _build_corpus(plan["out"], a, t_start),
    )


def launch_plan(
    plan: dict, nproc: int, t_start: float, *, module: str, prog: str, while_importing=None
):
    """Write ``plan`` to ``<out>/plan.json`` and run it in one torchrun launch of ``nproc`` ``module
    --worker`` ranks on this host (the quickstart's and the VLM demo's). The workers spend ~15 s
    importing megatron-core: meanwhile this process runs ``while_importing()`` (if given) and the
    converter (``plan["upcycle"]``). Returns ``while_importing``'s result; SystemExit naming
    ``prog`` if the workers fail.
    """
    out = plan["out"]
    os.makedirs(out, exist_ok=True)
    plan["t0"] = t_start
    plan_path = os.path.join(out, "plan.json")
    with open(plan_path, "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONWARNINGS"] = env.get("PYTHONWARNINGS", "ignore")
    cmd = _torchrun_command(nproc, plan_path, module)
    print(
        f"=== {_stamp(t_start)} torchrun (one launch, {nproc} ranks, every training stage): "
        f"{' '.join(cmd[1:])}",
        flush=True,
    )
    proc = subprocess.Popen(cmd, env=env)
    try:
        result = while_importing() if while_importing is not None else None
        _run_upcycle(plan, alive=lambda: proc.poll() is None)
        returncode = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if returncode != 0:
        raise SystemExit(
            f"{prog}: the torchrun workers failed (exit {returncode}); see the log above"
        )
    return result


def _torchrun_command(nproc: int, plan_path: str, module: str) -> list[str]:
    """One torchrun launch of ``nproc`` ``module --worker plan_path`` ranks on this host."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--nnodes",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        module,
        "--worker",
        plan_path,
    ]


def _build_corpus(out: str, a: argparse.Namespace, t_start: float) -> dict:
    """The byte-level corpus under ``out/corpus`` (the workers wait for its metadata)."""
    from megatron_dpsl.train.corpus import build_corpus

    print(f"=== {_stamp(t_start)} corpus: {os.path.join(out, 'corpus')}", flush=True)
    meta = build_corpus(
        os.path.join(out, "corpus"),
        a.corpus_bytes or (200_000 if a.tiny else 1_000_000),
        seed=a.seed,
    )
    for split, m in meta["splits"].items():
        print(
            f"    {split}: {m['num_tokens']} byte tokens, per group "
            f"{dict(zip(GROUP_NAMES, m['tokens_per_group']))}",
            flush=True,
        )
    return meta


def run_names(plan: dict) -> list[str]:
    """The MoE runs of ``plan``, in order."""
    return [s["name"] for s in plan["stages"] if s["kind"] == "train" and s["name"] != "dense"]


def dense_valid_loss(out: str) -> float:
    """The dense model's final validation loss (before upcycling)."""
    with open(os.path.join(out, "dense", "result.json"), encoding="utf-8") as f:
        return json.load(f)["valid_losses"][-1][1]


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return {}
    t_start = time.time()
    plan = build_plan(a)
    prepare_launch(plan, a, "quickstart", checks=(check_quickstart_flags,))
    out = plan["out"]
    meta = run_plan(plan, a, t_start)

    print(f"=== {_stamp(t_start)} figures and table", flush=True)
    from megatron_dpsl.train import plots

    runs = load_runs(out, run_names(plan))
    figures = plots.write_all(runs, out, GROUP_NAMES)
    rows = table_rows(runs)
    table = format_table(rows)
    wall = time.time() - t_start
    summary = {
        "wall_s": wall,
        "rows": rows,
        "figures": figures,
        "dense_valid_loss": dense_valid_loss(out),
        "upcycled": runs[0]["result"]["upcycled"],
        "corpus": meta,
        "notes": TABLE_NOTES,
    }
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + TABLE_NOTES + "\n")
    print(
        f"\n=== results (dense model before upcycling: valid loss {summary['dense_valid_loss']:.4f}"
        f"{'' if summary['upcycled'] else '; UPCYCLING FAILED, MoE runs from scratch'})"
    )
    print(table)
    print("\n" + TABLE_NOTES)
    print(
        f"\nfigures: {', '.join(figures)}\nTensorBoard: tensorboard --logdir "
        f"{os.path.join(out, 'runs')}"
    )
    print(f"quickstart wall time: {wall:.0f} s")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
