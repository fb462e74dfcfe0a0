"""The VLM stage of the GPU story: an MoE LLaVA at the paper's shapes through
``megatron_dpsl.megatron_lm.pretrain_vlm``.

Two runs of Megatron-LM's ``pretrain_vlm`` flow (its mock multimodal data) on the unpatched tree,
the same random-init model and seed, differing only in the router loss:

    vlm_aux    --moe-router-load-balancing-type aux_loss (coefficient 0.01): the baseline
    vlm_dpsl   --moe-router-load-balancing-type dpsl (λ 0.01) with the paper's modality priors
               (α_b 0.75, α_s 0.5, vision on experts 0-1, text on 2-3; --moe-dpsl-token-groups
               modality)

Model: CLIP ViT-L/14 at 336 px without the class token (24 layers, hidden 1024: 576 image rows,
``--freeze-ViT``), a Llama-3.2-1B-shaped language model (16 layers, hidden 2048, 32/8 heads, FFN
8192, RoPE θ 500000 with llama3 scaling factor 32, tied embeddings) with 4 full-FFN experts, top-2.
The TE spec when Transformer Engine is importable, else the local one. ``run`` writes
``vlm_<tag>.md``: each stage's result, its median step time (iterations after the first ``WARMUP``)
and losses, DPSL's step-time overhead over aux_loss, and ``dpsl_loss`` per layer (TensorBoard,
``--moe-per-layer-logging``).

    python scripts/megatron_lm_vlm_story.py run --tag core_v0.19.0 --tree
    .gpu_carry/trees/core_v0.19.0 \\
        --work /tmp/vlm --out $OUT              # on the GPU (run_gpu_tests.sh's vlm stage)
    python scripts/megatron_lm_vlm_story.py show --tag core_v0.19.0 --work /tmp/vlm --te

"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import megatron_lm_story as story

LAUNCHER = "megatron_dpsl.megatron_lm.pretrain_vlm"
ITERS, WARMUP = 12, 3

VISION = [
    "--vision-model-type",
    "clip",
    "--encoder-num-layers",
    "24",
    "--img-h",
    "336",
    "--img-w",
    "336",
    "--patch-dim",
    "14",
    "--disable-vision-class-token",
    "--freeze-ViT",
]
# Llama-3.2-1B's shapes (its config.json); text rows: 448 + 576 image rows = 1024 positions, the
# paper's T
LANGUAGE = [
    "--decoder-num-layers",
    "16",
    "--hidden-size",
    "2048",
    "--ffn-hidden-size",
    "8192",
    "--num-attention-heads",
    "32",
    "--group-query-attention",
    "--num-query-groups",
    "8",
    "--kv-channels",
    "64",
    "--seq-length",
    "448",
    "--max-position-embeddings",
    "2048",
    "--position-embedding-type",
    "rope",
    "--rotary-base",
    "500000",
    "--use-rope-scaling",
    "--rope-scaling-factor",
    "32",
    "--normalization",
    "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "128256",
    "--num-experts",
    "4",
    "--moe-router-topk",
    "2",
    "--moe-token-dispatcher-type",
    "alltoall",
]
TRAINING = [
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--lr",
    "2e-5",
    "--min-lr",
    "2e-6",
    "--lr-decay-style",
    "cosine",
    "--lr-warmup-iters",
    "0",
    "--clip-grad",
    "1.0",
    "--seed",
    "1234",
    "--bf16",
    "--train-iters",
    str(ITERS),
    "--log-interval",
    "1",
    "--eval-iters",
    "0",
    "--eval-interval",
    "1000",
    "--ckpt-format",
    "torch",
    "--no-gradient-accumulation-fusion",
    "--moe-per-layer-logging",
]
# no Transformer Engine: the local spec and none of the TE/apex-only fusions (as the GPT story)
LOCAL = [
    "--transformer-impl",
    "local",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
    "--no-masked-softmax-fusion",
]
TE = ["--transformer-impl", "transformer_engine"]
AUX = ["--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.01"]
DPSL = [
    "--moe-router-load-balancing-type",
    "dpsl",
    "--moe-aux-loss-coeff",
    "0.01",
    "--moe-dpsl-alpha-base",
    "0.75",
    "--moe-dpsl-alpha-shift",
    "0.5",
    "--moe-dpsl-num-groups",
    "2",
    "--moe-dpsl-token-groups",
    "modality",
    "--moe-dpsl-log-interval",
    "4",
]


def have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def stages(work: Path, te: bool) -> list[story.Stage]:
    """The two runs, writing TensorBoard events under ``work``."""
    impl = TE if te else LOCAL
    out = []
    for name, loss, expect in (
        ("vlm_aux", AUX, r"load_balancing_loss: \d"),
        ("vlm_dpsl", DPSL, r"dpsl_loss: \d"),
    ):
        tb = ["--tensorboard-dir", str(Path(work) / f"tb_{name}")]
        argv = (*VISION, *LANGUAGE, *impl, *TRAINING, *loss, *tb)
        out.append(
            story.Stage(
                name,
                "launcher",
                "unpatched",
                argv,
                150,
                (r"lm loss: \d", expect, rf"iteration\s+{ITERS}/"),
                module=LAUNCHER,
            )
        )
    return out


_STEP_MS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)")


def step_ms(log: str) -> float | None:
    """Median ``elapsed time per iteration`` over the iterations after the first ``WARMUP``."""
    times = [float(ms) for it, ms in _STEP_MS.findall(log) if int(it) > WARMUP]
    return statistics.median(times) if times else None


def per_layer(tb_dir: Path, name: str = "dpsl_loss") -> dict:
    """``{layer: last value}`` of ``moe/<name>_layer_<i>`` in the TensorBoard events ({} without
    tensorboard)."""
    if not Path(tb_dir).is_dir():
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    prefix = f"moe/{name}_layer_"
    return {
        int(tag[len(prefix) :]): acc.Scalars(tag)[-1].value
        for tag in acc.Tags().get("scalars", [])
        if tag.startswith(prefix)
    }


def report(tag: str, rows: list[dict], work: Path) -> str:
    """The markdown summary of a finished run."""
    lines = [
        f"# VLM stage, {tag} ({'TE' if rows and rows[0]['te'] else 'local'} spec)",
        "",
        "| stage | result | s | ms/iteration (median, iterations > 3) | last logged losses |",
        "|---|---|---:|---:|---|",
    ]
    lines += [
        f"| {r['name']} | {r['result']} | {r['seconds']:.0f} | {r['ms'] or '-'} | {r['notes']} |"
        for r in rows
    ]
    ms = {r["name"]: r["ms"] for r in rows}
    if ms.get("vlm_aux") and ms.get("vlm_dpsl"):
        lines += [
            "",
            "DPSL step-time overhead over aux_loss: "
            f"{100 * (ms['vlm_dpsl'] / ms['vlm_aux'] - 1):+.1f} %",
        ]
    layers = per_layer(Path(work) / "tb_vlm_dpsl")
    if layers:
        lines += ["", "| layer | " + " | ".join(map(str, sorted(layers))) + " |"]
        lines += ["|---|" + "---:|" * len(layers)]
        lines += [
            "| dpsl_loss | " + " | ".join(f"{layers[i]:.4g}" for i in sorted(layers)) + " |",
            "",
            f"mean over the {len(layers)} MoE layers: {sum(layers.values()) / len(layers):.4g} "
            "(core_v0.16.1's console dpsl_loss divides the sum by --encoder-num-layers; "
            "docs/vlm.md)",
        ]
    return "\n".join(lines) + "\n"


def run(tag: str, tree: Path, work: Path, out: Path, port: int) -> int:
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    (out / "story").mkdir(parents=True, exist_ok=True)
    trees = {"unpatched": str(Path(tree).resolve())}
    te, rows = have_te(), []
    for stage in stages(work, te):
        cmd, env = story.command(stage, trees, port)
        log_path = out / "story" / f"{tag}_{stage.name}.log"
        t0 = time.time()
        rc = story.run_logged(cmd, env, log_path, stage.limit_s, work)
        log = log_path.read_text(errors="replace")
        problems = [f"rc={rc}"] if rc != 0 else story.check(stage, log)
        rows.append(
            {
                "name": stage.name,
                "te": te,
                "result": "FAIL" if problems else "pass",
                "seconds": time.time() - t0,
                "ms": step_ms(log),
                "notes": "; ".join(problems) or story.log_summary(log),
            }
        )
        (out / f"vlm_{tag}.md").write_text(report(tag, rows, work))
        print(rows[-1], flush=True)
    return 1 if any(r["result"] != "pass" for r in rows) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run both stages (a GPU machine)")
    p_run.add_argument("--tag", choices=story.TAGS, required=True)
    p_run.add_argument("--tree", type=Path, required=True, help="unpatched Megatron-LM tree")
    p_run.add_argument("--work", type=Path, required=True)
    p_run.add_argument("--out", type=Path, required=True)
    p_run.add_argument("--port", type=int, default=29700)
    p_show = sub.add_parser("show", help="print both stages' commands")
    p_show.add_argument("--tag", choices=story.TAGS, required=True)
    p_show.add_argument("--work", type=Path, default=Path("/tmp/vlm"))
    p_show.add_argument("--tree", type=Path, default=None)
    p_show.add_argument("--te", action="store_true", help="the TE spec's command lines")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.tag, args.tree, args.work, args.out, args.port)
    trees = {"unpatched": str(args.tree or f"<{args.tag} tree>")}
    for stage in stages(args.work, args.te):
        cmd, env = story.command(stage, trees, 29700)
        print(f"# {stage.name} (limit {stage.limit_s} s)")
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
