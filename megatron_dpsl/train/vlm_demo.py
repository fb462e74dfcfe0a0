"""The paper's setting on a CPU: an upcycled MoE vision-language model with modality priors.

    python -m megatron_dpsl.train.vlm_demo --out outputs/vlm          # a few minutes on 2 CPU cores
    python -m megatron_dpsl.train.vlm_demo --out /tmp/vlm --tiny      # smoke run

1. data: procedural 32×32 images of coloured shapes with captions and question/answer text, 5 %
   text-only rows (``megatron_dpsl.train.vlm_data``; generated on the fly, deterministic, no
   download);
2. stage I, projector alignment: a real Megatron-Core ``LLaVAModel`` (CLIP ViT, LLaVA-1.5's
   two-layer GELU projector, a dense GPT) trained with ``--freeze-LM --freeze-ViT``;
3. stage II-a, dense: every part trained, saved in Megatron-LM's ``torch_dist`` layout;
4. upcycling (``megatron_dpsl.upcycle``): the language model's FFNs become 4 experts, top-2 (the
   paper's 2in4), copies plus N(0, 0.01²) noise; the ViT and the projector are copied;
5. stage II-b, MoE: three runs from the same upcycled checkpoint and seed, ViT frozen, experts split
   over 2 ranks (EP=2): Megatron's aux loss; DPSL with a symmetric prior; DPSL with the paper's
   modality priors (vision tokens → experts 0-1, text → experts 2-3). Modality ids come from the
   model itself;
6. report (``vlm_report``): one table (held-out caption loss and answer accuracy; per MoE layer CoV,
   distance to the modality prior per modality, share of vision tokens on experts 0-1 and of text on
   2-3) and one figure (Fig. 7-style histograms and expert usage per modality and layer).

Every training stage runs in one ``torchrun`` launch of 2 ranks (the embedded trainer,
``megatron_dpsl.train.trainer`` with ``--llava``); this process runs the converter once the dense
checkpoint exists. Each stage's exact trainer command line is printed and stored in ``plan.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from megatron_dpsl.train import quickstart

NUM_EXPERTS, TOPK = 4, 2  # the paper's 2in4
# what a launch writes under --out (out_dir.claim records it; a later launch replaces only these)
STAGE_OUTPUTS = ("plan.json", "align", "dense", "moe_init", "moe_init.done", "moe_init.failed")
REPORT_FILES = ("summary.json", "table.md", "vlm_modality_usage.png")


# the tiny LLaVA of VLM_NOTES §6.2: a 2-layer CLIP ViT (width 32, 8×8 patches: 16 image rows without
# the
# class token), LLaVA-1.5's projector, a 2-layer GPT (width 64, FFN 256, RoPE); rows are 16 text
# tokens
MODEL_FLAGS = {
    "--llava": True,
    "--device": "cpu",  # the laptop demo: CPU + gloo even where a GPU exists
    "--num-layers": 2,
    "--hidden-size": 64,
    "--ffn-hidden-size": 256,
    "--num-attention-heads": 4,
    "--position-embedding-type": "rope",
    "--disable-bias-linear": True,
    "--seq-length": 32,
    "--vocab-size": 64,
    "--encoder-num-layers": 2,
    "--vision-hidden-size": 32,
    "--patch-dim": 8,
    "--disable-vision-class-token": True,
    "--hidden-dropout": 0.0,
    "--attention-dropout": 0.0,
    "--micro-batch-size": 8,
    "--global-batch-size": 16,
    "--lr-decay-style": "cosine",
}
ITERATIONS = {"align": 100, "dense": 2000, "moe": 300}
TINY_ITERATIONS = {"align": 4, "dense": 6, "moe": 4}


def flags(table: dict) -> list[str]:
    """``{"--flag": value}`` as a command line: ``True`` is a bare switch, ``None``/``False`` are
    left out."""
    argv: list[str] = []
    for flag, value in table.items():
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def model_argv(a: argparse.Namespace) -> list[str]:
    """Trainer flags of every stage: the model, the batch, the seed and the logging."""
    return flags(MODEL_FLAGS) + flags(
        {
            "--seed": a.seed,
            "--log-interval": 5 if a.tiny else 25,
            "--eval-iters": 1 if a.tiny else 8,
        }
    )


def iterations(a: argparse.Namespace, stage: str) -> int:
    """Iterations of ``stage`` (``align``, ``dense`` or each ``moe`` run): flag, else default."""
    return getattr(a, f"{stage}_iters") or (TINY_ITERATIONS if a.tiny else ITERATIONS)[stage]


def schedule(iters: int, lr: float, eval_every: int) -> dict:
    """Length, cosine LR from ``lr`` to ``lr / 10`` after a 10 % warm-up, evaluation interval."""
    return {
        "--train-iters": iters,
        "--lr": lr,
        "--min-lr": lr / 10,
        "--lr-warmup-iters": max(1, iters // 10),
        "--eval-interval": eval_every,
    }


def train_stage(a: argparse.Namespace, name: str, table: dict) -> dict:
    """A training stage: ``model_argv`` + ``table``, with its TensorBoard (MoE: routing) files."""
    out = os.path.abspath(a.out)
    d = os.path.join(out, name) if name in ("align", "dense") else os.path.join(out, "runs", name)
    extra = {"--tensorboard-dir": os.path.join(d, "tensorboard")}
    if "--num-experts" in table:
        extra["--routing-stats-path"] = os.path.join(d, "routing_stats.pt")
    return {
        "kind": "train",
        "name": name,
        "dir": d,
        "argv": model_argv(a) + flags({**table, **extra}),
    }


def dense_stages(a: argparse.Namespace) -> list[dict]:
    """Stage I (projector only; lr 1e-3 as the paper's) and stage II-a (every part), each saved."""
    out = os.path.abspath(a.out)
    align, dense = iterations(a, "align"), iterations(a, "dense")
    align_flags = {
        **schedule(align, 1e-3, align),
        "--freeze-LM": True,
        "--freeze-ViT": True,
        "--save": os.path.join(out, "align", "checkpoint"),
    }
    dense_flags = {
        **schedule(dense, 3e-3, dense),
        "--load": os.path.join(out, "align", "checkpoint"),
        "--finetune": True,
        "--save": os.path.join(out, "dense", "checkpoint"),
    }
    return [train_stage(a, "align", align_flags), train_stage(a, "dense", dense_flags)]


def upcycle_stage(a: argparse.Namespace) -> dict:
    """The converter's options: each language FFN → 4 copies + N(0, 0.01²) noise (paper), top-2."""
    out = os.path.abspath(a.out)
    options = dict(
        src=os.path.join(out, "dense", "checkpoint"),
        dst=os.path.join(out, "moe_init"),
        num_experts=NUM_EXPERTS,
        granularity=1,
        moe_router_topk=TOPK,
        expert_noise_std=0.01,
        seed=a.seed,
        force=True,
        progress=False,
    )
    return {"kind": "upcycle", "options": options, "dir": os.path.join(out, "moe_init")}


def moe_flags(a: argparse.Namespace) -> dict:
    """Flags of every MoE run: the upcycled model, ViT frozen, experts split over 2 ranks (EP=2)."""
    n = iterations(a, "moe")
    return {
        **schedule(n, 1e-3, max(1, n // 4)),
        "--lr-warmup-iters": max(1, n // 20),
        "--num-experts": NUM_EXPERTS,
        "--moe-router-topk": TOPK,
        "--expert-model-parallel-size": 2,
        "--freeze-ViT": True,
        "--load": os.path.join(os.path.abspath(a.out), "moe_init"),
        "--finetune": True,
    }


def moe_runs(a: argparse.Namespace) -> dict[str, list]:
    """The three methods, from the same checkpoint and seed (the quickstart's flag builders)."""
    return {
        "aux_loss": quickstart.aux_loss_run(),
        "dpsl_symmetric": quickstart.dpsl_symmetric_run(a.dpsl_coeff, a.alpha),
        "dpsl_modality": quickstart.dpsl_modality_run(a.dpsl_coeff, a.alpha_base, a.alpha_shift),
    }


def make_plan(a: argparse.Namespace) -> dict:
    """Every stage of the one launch, in order, plus what the workers need to evaluate."""
    stages = dense_stages(a) + [upcycle_stage(a)]
    for name, run in moe_runs(a).items():
        stage = train_stage(a, name, moe_flags(a))
        stage["argv"] += [str(x) for x in run]
        stages.append(stage)
    return {
        "out": os.path.abspath(a.out),
        "stages": stages,
        "outputs": [*STAGE_OUTPUTS, *(f"runs/{name}" for name in moe_runs(a))],
        "seed": a.seed,
        "eval_samples": 64 if a.tiny else 512,
    }


# ---------------------------------------------------------------------------------------------
# the torchrun workers


def _await_upcycle(stage: dict) -> bool:
    """Whether the launcher's converter succeeded (rank 0 waits for its marker, then tells all)."""
    import torch.distributed as dist

    ok = [True]
    if dist.get_rank() == 0:
        done = quickstart._wait_for([stage["dir"] + ".done", stage["dir"] + ".failed"], 1800)
        ok = [done.endswith(".done")]
    dist.broadcast_object_list(ok, src=0)
    return ok[0]


def _without_load(argv: list[str]) -> list[str]:
    """``argv`` without ``--load DIR --finetune`` (the MoE runs' fallback when upcycling failed)."""
    argv = list(argv)
    i = argv.index("--load")
    del argv[i : i + 2]
    argv.remove("--finetune")
    return argv


def _train(stage: dict, plan: dict, argv: list[str], upcycled: bool) -> None:
    """One training stage, then the held-out metrics; rank 0 writes ``result.json``."""
    import torch.distributed as dist

    from megatron_dpsl.train.arguments import parse_args
    from megatron_dpsl.train.trainer import pretrain
    from megatron_dpsl.train.vlm_eval import held_out_metrics

    t0 = time.time()
    result = pretrain(parse_args(argv))
    model = result.model
    held_out = held_out_metrics(
        model,
        seed=plan["seed"],
        num_samples=plan["eval_samples"],
        micro_batch_size=result.args.micro_batch_size,
        img_seq_len=model.img_seq_len,
        device=next(model.parameters()).device,
    )
    if dist.get_rank() != 0:
        return
    os.makedirs(stage["dir"], exist_ok=True)
    record = {
        "name": stage["name"],
        "argv": argv,
        "wall_s": time.time() - t0,
        "train_losses": result.train_losses,
        "valid_losses": result.valid_losses,
        "aux_losses": result.aux_losses,
        "held_out": held_out,
        "upcycled": upcycled,
        "step_seconds": result.step_seconds,
    }
    with open(os.path.join(stage["dir"], "result.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)


def _worker(plan_path: str) -> None:
    """A torchrun rank: every stage of the plan in order (the converter runs in the launcher)."""
    from megatron_dpsl.train.trainer import (
        initialize_distributed,
        print_rank_0,
        shutdown,
    )

    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    initialize_distributed(argparse.Namespace(device="cpu", distributed_backend="gloo"))
    upcycled = True
    try:
        for stage in plan["stages"]:
            if stage["kind"] == "upcycle":
                upcycled = _await_upcycle(stage)
                if not upcycled:
                    print_rank_0(
                        "!!! upcycling failed: the MoE runs start from a random initialisation"
                    )
                continue
            argv = stage["argv"]
            if not upcycled and "--load" in argv and stage["name"] not in ("align", "dense"):
                argv = _without_load(argv)
            print_rank_0(
                f"\n=== {quickstart._stamp(plan['t0'])} {stage['name']}: "
                f"megatron-dpsl-train {' '.join(argv)}"
            )
            _train(stage, plan, argv, upcycled)
    finally:
        shutdown()


# ---------------------------------------------------------------------------------------------
# the launcher


def check_flags(a: argparse.Namespace) -> None:
    """The demonstration's own flags; ValueError naming the flag."""
    from megatron_dpsl.losses.priors import resolve_alpha
    from megatron_dpsl.train.flag_checks import check_number

    check_number("--nproc", a.nproc, 2, integer=True, note="the MoE runs use expert parallelism 2")
    for stage in ITERATIONS:
        value = getattr(a, f"{stage}_iters")
        if value is not None:
            check_number(f"--{stage}-iters", value, 1, integer=True)
    check_number("--seed", a.seed, 0, 2**32 - 1, integer=True, note="NumPy's seed range")
    check_number("--dpsl-coeff", a.dpsl_coeff, 0)
    resolve_alpha(NUM_EXPERTS, alpha=a.alpha, names={"alpha": "--alpha"})
    resolve_alpha(
        NUM_EXPERTS,
        alpha_base=a.alpha_base,
        alpha_shift=a.alpha_shift,
        num_groups=2,
        names={"alpha_base": "--alpha-base", "alpha_shift": "--alpha-shift"},
    )


def prepare(plan: dict, a: argparse.Namespace) -> None:
    """Before anything runs: every flag (ours and every stage's trainer flags), the plotting
    packages, then claim ``--out`` for the outputs (``out_dir.claim``: nothing else is touched).

    Bad input prints one line naming the flag and exits with code 2, as argparse does.
    """
    from megatron_dpsl.train import out_dir

    try:
        check_flags(a)
        quickstart.check_plan(plan, a.nproc)
        quickstart.check_plot_dependencies("vlm_demo")
        out_dir.claim(plan["out"], [*plan["outputs"], *REPORT_FILES], force=a.force)
    except ValueError as err:
        print(f"vlm_demo: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run_plan(plan: dict, nproc: int, t_start: float) -> None:
    """Run every stage of ``plan`` in one torchrun launch; the converter runs here. SystemExit on
    failure."""
    quickstart.launch_plan(
        plan, nproc, t_start, module="megatron_dpsl.train.vlm_demo", prog="vlm_demo"
    )


# ---------------------------------------------------------------------------------------------
# the report


def _read_result(stage_dir: str) -> dict:
    with open(os.path.join(stage_dir, "result.json"), encoding="utf-8") as f:
        return json.load(f)


def load_runs(plan: dict) -> list[dict]:
    """Each MoE run's ``{"name", "layers" (final validation, per MoE layer), "held_out",
    "result"}``."""
    import torch

    runs = []
    for stage in plan["stages"]:
        if stage["kind"] != "train" or stage["name"] in ("align", "dense"):
            continue
        result = _read_result(stage["dir"])
        stats = torch.load(os.path.join(stage["dir"], "routing_stats.pt"), weights_only=False)
        runs.append(
            {
                "name": stage["name"],
                "layers": stats["history"][-1]["layers"],
                "held_out": {k: result["held_out"][k] for k in ("caption_loss", "answer_accuracy")},
                "result": result,
            }
        )
    return runs


def write_report(plan: dict, a: argparse.Namespace, wall_s: float) -> dict:
    """The table (``table.md``, printed), the figure and ``summary.json`` under ``plan["out"]``."""
    from megatron_dpsl.train import vlm_report

    out = plan["out"]
    runs = load_runs(plan)
    prior = vlm_report.modality_prior(NUM_EXPERTS, a.alpha_base, a.alpha_shift)
    rows = vlm_report.table_rows(runs, prior)
    figure = os.path.join(out, "vlm_modality_usage.png")
    vlm_report.plot_modality_usage(runs, prior, figure)
    dense = _read_result(os.path.join(out, "dense"))["held_out"]
    summary = {
        "wall_s": wall_s,
        "rows": rows,
        "dense_held_out": dense,
        "upcycled": runs[0]["result"]["upcycled"],
        "figure": figure,
        "notes": vlm_report.TABLE_NOTES,
    }
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    table = vlm_report.format_table(rows)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + vlm_report.TABLE_NOTES + "\n")
    print(
        f"\n=== results (dense model before upcycling: caption loss {dense['caption_loss']:.4f}, "
        f"answer accuracy {dense['answer_accuracy']:.3f}"
        f"{'' if summary['upcycled'] else '; UPCYCLING FAILED'})"
    )
    print(
        table + "\n\n" + vlm_report.TABLE_NOTES + f"\n\nfigure: {figure}\nwall time: {wall_s:.0f} s"
    )
    return summary


# ---------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_dpsl.train.vlm_demo",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--out",
        default="outputs/vlm",
        help="output directory (a later launch replaces only what an earlier one wrote there)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out the demonstration did not create, beside its files (an "
        "existing path named like an output is still refused, never replaced)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a few iterations per stage (the smoke test)",
    )
    p.add_argument("--nproc", type=int, default=2, help="ranks (EP = 2 needs 2)")
    for stage in ITERATIONS:
        p.add_argument(
            f"--{stage}-iters",
            type=int,
            default=None,
            help=f"iterations of the {stage} stage{'s' if stage == 'moe' else ''} "
            f"(default {ITERATIONS[stage]})",
        )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--dpsl-coeff",
        type=float,
        default=0.1,
        help="λ of both DPSL runs (the quickstart's)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.75,
        help="α of the symmetric run (the paper's for Llama)",
    )
    p.add_argument(
        "--alpha-base",
        type=float,
        default=0.75,
        help="α_b of the modality priors (paper: 0.75)",
    )
    p.add_argument(
        "--alpha-shift",
        type=float,
        default=0.5,
        help="α_s of the modality priors (paper: 0.5)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # run_plan's torchrun ranks
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return {}
    t_start = time.time()
    plan = make_plan(a)
    prepare(plan, a)
    run_plan(plan, a.nproc, t_start)
    print(f"=== {quickstart._stamp(t_start)} table and figure", flush=True)
    return write_report(plan, a, time.time() - t_start)


if __name__ == "__main__":
    main(sys.argv[1:])
