"""The quickstart: dense GPT -> granular upcycling -> three MoE runs (aux loss, DPSL, DPSL modality priors).

    python -m megatron_dpsl.train.quickstart --out outputs/quickstart          # 3-5 min on 2 CPU cores
    python -m megatron_dpsl.train.quickstart --out /tmp/qs --tiny              # smoke run, ~1 min

1. builds a byte-level corpus from text on this machine: Python stdlib sources (group 0, "code") and
   licence/copyright prose (group 1, "prose"), every byte tagged with its document's group
   (``megatron_dpsl.train.corpus``);
2. trains a tiny dense GPT (2 ranks, data parallel) and saves it in Megatron-LM's layout;
3. upcycles it with the converter (``megatron-dpsl-upcycle``) into 8 experts, granularity 2, top-4, virtual-group
   router, exact weight scaling (the MoE starts as the dense function);
4. trains the MoE three times under one ``torchrun`` launch with 2 ranks (EP=2): Megatron's
   ``aux_loss``; DPSL with a symmetric prior; DPSL with modality priors (α_b, α_s per group);
5. writes to ``--out``: PNG figures (per-expert routing histograms vs the Beta(α, A−α) pdf as in the
   paper's Fig. 7; CoV / entropy / distance-to-prior / validation-loss curves; per-modality usage),
   TensorBoard event files (``runs/*/tensorboard``), ``summary.json``, ``table.md`` and prints the table.

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
import shutil
import subprocess
import sys
import time
from typing import List

from megatron_dpsl.train.trainer import free_port  # stdlib-only at import time, like this module

GROUP_NAMES = ("code", "prose")


def _stamp(t0: float) -> str:
    """Seconds since ``t0``, the quickstart's start (progress lines)."""
    return f"[{time.time() - t0:6.1f} s]"


# ---------------------------------------------------------------------------------------------
# the plan: what each stage runs (plain data, written to JSON for the torchrun workers)


def build_plan(a: argparse.Namespace) -> dict:
    out = os.path.abspath(a.out)
    tiny = a.tiny
    hidden, ffn, layers, heads = (32, 128, 2, 4) if tiny else (64, 256, 2, 4)
    seq = 64 if tiny else 128
    dense_iters = a.dense_iters or (10 if tiny else 300)
    moe_iters = a.moe_iters or (8 if tiny else 120)
    eval_interval = max(1, moe_iters // (2 if tiny else 6))
    E, G, K = 8, 2, 4
    common = [
        "--num-layers", layers, "--hidden-size", hidden, "--ffn-hidden-size", ffn, "--num-attention-heads", heads,
        "--seq-length", seq, "--max-position-embeddings", seq, "--vocab-size", 256, "--disable-bias-linear",
        "--hidden-dropout", 0.0, "--attention-dropout", 0.0, "--micro-batch-size", 4 if tiny else 8,
        "--global-batch-size", 8 if tiny else 16, "--data-path", os.path.join(out, "corpus"), "--seed", a.seed,
        "--lr-decay-style", "cosine", "--log-interval", 5 if tiny else 20, "--eval-iters", 1 if tiny else 4,
        "--device", "cpu",  # the quickstart is the laptop demo: CPU + gloo even where a GPU exists
    ]
    dense = common + [
        "--train-iters", dense_iters, "--lr", 3e-3, "--min-lr", 3e-4, "--lr-warmup-iters", max(1, dense_iters // 10),
        "--eval-interval", dense_iters, "--save", os.path.join(out, "dense", "checkpoint"),
        "--tensorboard-dir", os.path.join(out, "dense", "tensorboard"),
    ]
    upcycle = dict(
        src=os.path.join(out, "dense", "checkpoint"), dst=os.path.join(out, "moe_init"), num_experts=E,
        granularity=G, moe_router_topk=K, router_init="virtual-group", weight_scaling="exact", seed=a.seed,
        force=True, progress=False,
    )
    moe_common = common + [
        "--num-experts", E, "--moe-router-topk", K, "--moe-ffn-hidden-size", ffn // G,
        "--expert-model-parallel-size", 2, "--train-iters", moe_iters, "--lr", 1e-3, "--min-lr", 1e-4,
        "--lr-warmup-iters", max(1, moe_iters // 20), "--eval-interval", eval_interval,
        "--load", os.path.join(out, "moe_init"), "--finetune",
    ]
    lam = a.dpsl_coeff
    runs = {
        "aux_loss": ["--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", 1e-2],
        "dpsl_symmetric": ["--moe-router-load-balancing-type", "dpsl", "--moe-dpsl-coeff", lam,
                           "--moe-dpsl-alpha", a.alpha],
        "dpsl_modality": ["--moe-router-load-balancing-type", "dpsl", "--moe-dpsl-coeff", lam,
                          "--moe-dpsl-alpha-base", a.alpha_base, "--moe-dpsl-alpha-shift", a.alpha_shift,
                          "--moe-dpsl-num-groups", len(GROUP_NAMES)],
    }
    stages = [{"kind": "train", "name": "dense", "argv": dense, "dir": os.path.join(out, "dense")},
              {"kind": "upcycle", "options": upcycle, "dir": os.path.join(out, "moe_init")}]
    for name, extra in runs.items():
        d = os.path.join(out, "runs", name)
        stages.append({
            "kind": "train", "name": name, "dir": d,
            "argv": moe_common + extra + ["--tensorboard-dir", os.path.join(d, "tensorboard"),
                                          "--routing-stats-path", os.path.join(d, "routing_stats.pt")],
        })
    for s in stages:
        if "argv" in s:
            s["argv"] = [str(x) for x in s["argv"]]
    return {"out": out, "stages": stages, "corpus_meta": os.path.join(out, "corpus", "meta.json")}


def _wait_for(paths: List[str], timeout: float, alive=lambda: True) -> str:
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

    from megatron_dpsl.train.arguments import parse_args
    from megatron_dpsl.train.trainer import initialize_distributed, pretrain, print_rank_0, shutdown

    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    t_start = plan["t0"]  # progress stamps count from the launcher's start
    initialize_distributed(argparse.Namespace(device="cpu", distributed_backend="gloo"))
    rank = dist.get_rank()
    _wait_for([plan["corpus_meta"]], timeout=600)  # the launcher builds it while we import
    upcycled = True
    try:
        for stage in plan["stages"]:
            t0 = time.time()
            if stage["kind"] == "upcycle":
                # the launcher process converts (the converter is single-process); wait for its verdict
                ok = [True]
                if rank == 0:
                    done = _wait_for([stage["dir"] + ".done", stage["dir"] + ".failed"], timeout=1200)
                    ok = [done.endswith(".done")]
                dist.broadcast_object_list(ok, src=0)
                upcycled = ok[0]
                if not upcycled:
                    print_rank_0("!!! upcycling failed: the MoE runs start from a random initialisation instead")
                continue
            argv = list(stage["argv"])
            if not upcycled and "--load" in argv:
                i = argv.index("--load")
                del argv[i : i + 2]
                argv.remove("--finetune")
            print_rank_0(f"\n=== {_stamp(t_start)} {stage['name']}: megatron-dpsl-train {' '.join(argv)}")
            result = pretrain(parse_args(argv))
            if rank == 0:
                os.makedirs(stage["dir"], exist_ok=True)
                with open(os.path.join(stage["dir"], "result.json"), "w", encoding="utf-8") as f:
                    json.dump({
                        "name": stage["name"], "argv": argv, "wall_s": time.time() - t0,
                        "train_losses": result.train_losses, "valid_losses": result.valid_losses,
                        "aux_losses": result.aux_losses, "upcycled": upcycled,
                        "optimizer_impl": result.optimizer_impl, "schedule_impl": result.schedule_impl,
                    }, f)
    finally:
        shutdown()


# ---------------------------------------------------------------------------------------------
# the report


def load_runs(out: str, names: List[str]) -> List[dict]:
    import torch

    runs = []
    for name in names:
        d = os.path.join(out, "runs", name)
        with open(os.path.join(d, "result.json"), encoding="utf-8") as f:
            result = json.load(f)
        stats = torch.load(os.path.join(d, "routing_stats.pt"), weights_only=False)
        runs.append({
            "name": name, "prior": stats["prior"], "history": stats["history"],
            "valid_losses": [tuple(v) for v in result["valid_losses"]], "result": result,
            "reference_prior": name == "aux_loss",
        })
    return runs


def table_rows(runs: List[dict]) -> List[dict]:
    rows = []
    for run in runs:
        final = run["history"][-1]
        layers = final["layers"]
        E = run["prior"].shape[-1]
        half = E // 2
        usage = sum(l["group_usage"] for l in layers) / len(layers)  # [G, E]
        aux = run["result"]["aux_losses"]
        dpsl = aux.get("dpsl_loss")
        rows.append({
            "run": run["name"],
            "valid_loss": run["valid_losses"][-1][1],
            "cov": final["cov"],
            "entropy": final["entropy"],
            "prior_distance": final["prior_distance"],
            "ks_distance": final["ks_distance"],
            "code_on_experts_0_3": float(usage[0, :half].sum()),
            "prose_on_experts_4_7": float(usage[1, half:].sum()),
            "dpsl_loss": None if not dpsl else dpsl[-1][1],
            "load_balancing_loss": None if not aux.get("load_balancing_loss") else aux["load_balancing_loss"][-1][1],
            "wall_s": run["result"]["wall_s"],
        })
    return rows


def format_table(rows: List[dict]) -> str:
    head = ("| run | valid loss | CoV | entropy | dist. to prior | KS | code→E0-3 | prose→E4-7 | dpsl_loss | "
            "lb loss | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v, p=4: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['run']} | {fmt(r['valid_loss'])} | {fmt(r['cov'], 3)} | {fmt(r['entropy'], 3)} | "
            f"{fmt(r['prior_distance'], 5)} | {fmt(r['ks_distance'], 3)} | {fmt(r['code_on_experts_0_3'], 3)} | "
            f"{fmt(r['prose_on_experts_4_7'], 3)} | {fmt(r['dpsl_loss'], 5)} | {fmt(r['load_balancing_loss'], 3)} | "
            f"{r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


TABLE_NOTES = (
    "Validation set, final step, mean over MoE layers. CoV: std/mean of expert loads (top-k assignments). "
    "entropy: mean routing entropy (nats, softmax over all experts). dist. to prior: Eq. 4 distance per expert "
    "(mean), to the run's prior (aux_loss: to the symmetric Dir(1) reference); KS: Kolmogorov–Smirnov distance "
    "to the same marginals. code→E0-3 / prose→E4-7: share of each modality's top-k assignments landing on the "
    "expert block its modality prior favours (0.5 = no preference). dpsl_loss: λ·DPSL, lb loss: Megatron's "
    "load_balancing_loss / coeff (last training step)."
)


# ---------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_dpsl.train.quickstart", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/quickstart", help="output directory")
    p.add_argument("--tiny", action="store_true", help="a very short run (smoke test, ~1 min)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (EP = 2 needs 2)")
    p.add_argument("--dense-iters", type=int, default=None)
    p.add_argument("--moe-iters", type=int, default=None)
    p.add_argument("--dpsl-coeff", type=float, default=0.1,
                   help="λ (the paper's default 0.01 suits long runs; this short run uses its ablation's 0.1)")
    p.add_argument("--alpha", type=float, default=1.0, help="symmetric prior α of the dpsl_symmetric run")
    p.add_argument("--alpha-base", type=float, default=0.75, help="α_b of the modality run (paper: 0.75)")
    p.add_argument("--alpha-shift", type=float, default=0.5, help="α_s of the modality run (paper: 0.5)")
    p.add_argument("--corpus-bytes", type=int, default=None, help="bytes per modality (default 1 MB, tiny 200 kB)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def _run_upcycle(plan: dict, alive) -> None:
    """Upcycle the dense checkpoint once the workers have saved it (here: the converter is single-process).

    Writes ``moe_init.done`` or ``moe_init.failed`` next to the output for the workers to read.
    """
    stage = next(s for s in plan["stages"] if s["kind"] == "upcycle")
    opts = dict(stage["options"])
    try:
        from megatron_dpsl.upcycle import upcycle
    except Exception as err:  # noqa: BLE001 - any import failure means: fall back, loudly
        print(f"!!! quickstart: the upcycler is unavailable ({err!r}); MoE runs start from scratch", flush=True)
        open(stage["dir"] + ".failed", "w").close()
        return
    tracker = os.path.join(opts["src"], "latest_checkpointed_iteration.txt")
    try:
        _wait_for([tracker], timeout=1800, alive=alive)
    except RuntimeError:
        return  # the workers died before saving the dense model: main() reports their exit status
    src, dst = opts.pop("src"), opts.pop("dst")
    print(f"\n=== {_stamp(plan['t0'])} upcycle (megatron_dpsl.upcycle): {src} -> {dst} {opts}", flush=True)
    try:
        upcycle(src, dst, **opts)
    except Exception as err:  # noqa: BLE001
        print(f"!!! quickstart: upcycling failed ({err!r}); MoE runs start from scratch", flush=True)
        open(stage["dir"] + ".failed", "w").close()
        return
    open(stage["dir"] + ".done", "w").close()


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return {}
    t_start = time.time()
    missing = [m for m in ("matplotlib", "tensorboard") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"quickstart: needs {', '.join(missing)}: pip install 'megatron-dpsl[plots]' "
                         "(or run bash scripts/quickstart.sh, which installs the test extras)")
    out = os.path.abspath(a.out)
    for sub in ("dense", "moe_init", "runs", "corpus"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    for marker in ("moe_init.done", "moe_init.failed"):
        if os.path.exists(os.path.join(out, marker)):
            os.remove(os.path.join(out, marker))
    os.makedirs(out, exist_ok=True)

    plan = build_plan(a)
    plan["t0"] = t_start
    plan_path = os.path.join(out, "plan.json")
    with open(plan_path, "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONWARNINGS"] = env.get("PYTHONWARNINGS", "ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc), "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "megatron_dpsl.train.quickstart", "--worker", plan_path]
    # The workers spend ~15 s importing megatron-core: build the corpus and import the converter meanwhile.
    print(f"=== {_stamp(t_start)} torchrun (one launch, {a.nproc} ranks, all training stages): {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    try:
        from megatron_dpsl.train.corpus import build_corpus

        print(f"=== {_stamp(t_start)} corpus: {os.path.join(out, 'corpus')}", flush=True)
        meta = build_corpus(os.path.join(out, "corpus"), a.corpus_bytes or (200_000 if a.tiny else 1_000_000), seed=a.seed)
        for split, m in meta["splits"].items():
            print(f"    {split}: {m['num_tokens']} byte tokens, per group {dict(zip(GROUP_NAMES, m['tokens_per_group']))}",
                  flush=True)
        _run_upcycle(plan, alive=lambda: proc.poll() is None)
        returncode = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if returncode != 0:
        raise SystemExit(f"quickstart: the torchrun workers failed (exit {returncode}); see the log above")

    print(f"=== {_stamp(t_start)} figures and table", flush=True)
    from megatron_dpsl.train import plots

    names = [s["name"] for s in plan["stages"] if s["kind"] == "train" and s["name"] != "dense"]
    runs = load_runs(out, names)
    figures = plots.write_all(runs, out, GROUP_NAMES)
    rows = table_rows(runs)
    table = format_table(rows)
    wall = time.time() - t_start
    with open(os.path.join(out, "dense", "result.json"), encoding="utf-8") as f:
        dense = json.load(f)
    summary = {
        "wall_s": wall, "rows": rows, "figures": figures, "dense_valid_loss": dense["valid_losses"][-1][1],
        "upcycled": runs[0]["result"]["upcycled"], "corpus": meta, "notes": TABLE_NOTES,
    }
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + TABLE_NOTES + "\n")
    print(f"\n=== results (dense model before upcycling: valid loss {summary['dense_valid_loss']:.4f}"
          f"{'' if summary['upcycled'] else '; UPCYCLING FAILED, MoE runs from scratch'})")
    print(table)
    print("\n" + TABLE_NOTES)
    print(f"\nfigures: {', '.join(figures)}\nTensorBoard: tensorboard --logdir {os.path.join(out, 'runs')}")
    print(f"quickstart wall time: {wall:.0f} s")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
