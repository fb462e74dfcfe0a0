"""The Megatron-LM user story on one GPU, stage by stage, for one Megatron-LM tag.

One definition of every command line: ``scripts/run_gpu_tests.sh`` runs the stages on the GPU
(``run``), and ``tests/unit/megatron_lm/test_launcher.py`` runs the Megatron-LM stages' exact argv
on CPU through the real call chain up to the first CUDA-only call (``stages()``), so the two cannot
drift.

    # on the GPU (run_gpu_tests.sh does this)
    python scripts/megatron_lm_story.py run --tag core_v0.19.0 \\
        --tree .gpu_carry/trees/core_v0.19.0 --work /tmp/story --out $OUT
    # print the commands
    python scripts/megatron_lm_story.py show --tag core_v0.19.0 --work /tmp/story

Stages (each a fresh ``torchrun --nproc-per-node 1`` or ``python -m`` process):

    dense_patched   Megatron-LM's own pretrain_gpt.py on the patched tree: tiny Llama-style dense
                    GPT, --mock-data, iterations 0 -> 4, save
    dense_launcher  the launcher on the unpatched tree: resumes that checkpoint, 4 -> 8, save
    upcycle         python -m megatron_dpsl.upcycle: dense -> 8 experts (G=2, top-4, exact scaling)
    moe_dpsl        the launcher, unpatched tree: loads the upcycled release checkpoint, trains with
                    --moe-router-load-balancing-type aux_loss dpsl (coefficient list), 0 -> 4, save
    moe_resume      the launcher, unpatched tree: resumes the DPSL run, 4 -> 8, save
    moe_groups      Megatron-LM's own pretrain_gpt.py on the patched tree: resumes the DPSL run with
                    modality priors (--moe-dpsl-num-groups 2) on a two-dataset blend, 8 -> 12

Each stage has a time limit; ``run`` writes ``story_<tag>.md`` (pass/fail, seconds, what was
checked) to ``--out`` and one log per stage to ``--out``/story/. Stages after a failed one are
skipped (they need its checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAGS = ("core_v0.16.1", "core_v0.19.0")
LAUNCHER = "megatron_dpsl.megatron_lm.pretrain_gpt"
NUM_EXPERTS, GRANULARITY, TOPK = 8, 2, 4
VOCAB = 1024
SEQ = 64

# A tiny Llama-style GPT: RoPE without learned positions, RMSNorm, SwiGLU, no biases, untied output.
MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--ffn-hidden-size",
    "128",
    "--num-attention-heads",
    "4",
    "--seq-length",
    str(SEQ),
    "--max-position-embeddings",
    str(SEQ),
    "--position-embedding-type",
    "rope",
    "--no-position-embedding",
    "--normalization",
    "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    # no Transformer Engine or apex on the GPU machine: the local spec, no TE-only fusions (0.19
    # refuses RoPE fusion), no persistent layer norm (the torch norm refuses it)
    "--transformer-impl",
    "local",
    "--no-gradient-accumulation-fusion",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
    # the fused softmax kernel (scaled_masked_softmax_cuda) needs apex; not on the image
    "--no-masked-softmax-fusion",
    "--bf16",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    str(VOCAB),
]
# The learning-rate schedule does not depend on --train-iters, so every resume matches its
# checkpoint.
TRAINING = [
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--lr",
    "1e-3",
    "--min-lr",
    "1e-4",
    "--lr-decay-style",
    "cosine",
    "--lr-decay-iters",
    "1000",
    "--lr-warmup-iters",
    "0",
    "--weight-decay",
    "0.01",
    "--clip-grad",
    "1.0",
    "--seed",
    "1234",
    "--log-interval",
    "1",
    "--eval-interval",
    "1000",
    "--eval-iters",
    "0",
    "--ckpt-format",
    "torch_dist",
]
MOE = [
    "--num-experts",
    str(NUM_EXPERTS),
    "--moe-router-topk",
    str(TOPK),
    "--moe-ffn-hidden-size",
    str(128 // GRANULARITY),
    "--moe-token-dispatcher-type",
    "alltoall",
    "--moe-router-load-balancing-type",
    "aux_loss",
    "dpsl",
    "--moe-aux-loss-coeff",
    "1e-3",
    "0.01",
    "--moe-dpsl-log-interval",
    "2",
]
SYMMETRIC = ["--moe-dpsl-alpha", "0.75"]
# modality priors: token group = the sample's dataset in the --data-path blend (patch 3/4)
GROUPS = [
    "--moe-dpsl-alpha-base",
    "0.75",
    "--moe-dpsl-alpha-shift",
    "0.5",
    "--moe-dpsl-num-groups",
    "2",
]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One process of the story.

    ``entry``: ``megatron_lm`` (the tree's own ``pretrain_gpt.py``), ``launcher`` (``python -m`` the
    launcher with ``MEGATRON_LM_PATH`` = the tree) or ``upcycle``. ``tree``:
    ``patched``/``unpatched``.
    ``expect``: regular expressions the stage's log must match.
    """

    name: str
    entry: str
    tree: str | None
    argv: tuple[str, ...]
    limit_s: int
    expect: tuple[str, ...] = ()
    iterations: int | None = None  # latest_checkpointed_iteration.txt of --save afterwards
    module: str = LAUNCHER  # the launcher an entry "launcher" runs (python -m)

    @property
    def save(self) -> str | None:
        argv = list(self.argv)
        return argv[argv.index("--save") + 1] if "--save" in argv else None


def _train(iters: int, save: str, load: str | None = None) -> list[str]:
    argv = ["--train-iters", str(iters), "--save", save, "--save-interval", str(iters)]
    if load is not None:
        # a resumed run trains to a new --train-iters, which changes the scheduler's decay lengths:
        # Megatron-LM refuses that without --override-opt_param-scheduler (the documented way to
        # extend a run)
        argv += ["--load", load, "--exit-on-missing-checkpoint", "--override-opt_param-scheduler"]
    return argv


def data_prefixes(work: Path) -> tuple[str, str]:
    """The two indexed datasets of the group-prior stage (``make_blend`` writes them): code,
    prose."""
    return str(work / "data" / "code_text_document"), str(work / "data" / "prose_text_document")


def stages(work: Path) -> list[Stage]:
    """The story's stages, writing under ``work`` (checkpoints, data)."""
    w = Path(work)
    dense, moe_init, moe = str(w / "ckpt_dense"), str(w / "ckpt_moe_init"), str(w / "ckpt_moe")
    code, prose = data_prefixes(w)
    lm_loss = r"lm loss: \d"
    dpsl = r"dpsl_loss: \d"
    return [
        Stage(
            "dense_patched",
            "megatron_lm",
            "patched",
            (*MODEL, *TRAINING, "--mock-data", *_train(4, dense)),
            150,
            (lm_loss,),
            4,
        ),
        Stage(
            "dense_launcher",
            "launcher",
            "unpatched",
            (*MODEL, *TRAINING, "--mock-data", *_train(8, dense, load=dense)),
            150,
            (lm_loss, r"iteration\s+8/"),
            8,
        ),
        Stage(
            "upcycle",
            "upcycle",
            None,
            (
                "--source",
                dense,
                "--output",
                moe_init,
                "--num-experts",
                str(NUM_EXPERTS),
                "--granularity",
                str(GRANULARITY),
                "--moe-router-topk",
                str(TOPK),
                "--weight-scaling",
                "exact",
                "--no-progress",
            ),
            90,
        ),
        Stage(
            "moe_dpsl",
            "launcher",
            "unpatched",
            (*MODEL, *MOE, *SYMMETRIC, *TRAINING, "--mock-data", *_train(4, moe, load=moe_init)),
            150,
            (lm_loss, dpsl, r"load_balancing_loss: \d"),
            4,
        ),
        Stage(
            "moe_resume",
            "launcher",
            "unpatched",
            (*MODEL, *MOE, *SYMMETRIC, *TRAINING, "--mock-data", *_train(8, moe, load=moe)),
            150,
            (lm_loss, dpsl, r"iteration\s+8/"),
            8,
        ),
        Stage(
            "moe_groups",
            "megatron_lm",
            "patched",
            (
                *MODEL,
                *MOE,
                *GROUPS,
                *TRAINING,
                "--data-path",
                "1",
                code,
                "1",
                prose,
                "--split",
                "100,0,0",
                *_train(12, moe, load=moe),
            ),
            150,
            (lm_loss, dpsl, r"iteration\s+12/"),
            12,
        ),
    ]


def megatron_lm_stages(work: Path) -> list[Stage]:
    """The stages that run Megatron-LM (what the CPU test takes to the CUDA boundary)."""
    return [s for s in stages(work) if s.entry != "upcycle"]


# --------------------------------------------------------------------------- running (GPU machine)


def command(stage: Stage, trees: dict, port: int) -> tuple[list[str], dict]:
    """``(cmd, extra env)`` of ``stage``; ``trees``: {"patched": dir, "unpatched": dir}."""
    py = sys.executable
    # the tree first on sys.path, as `python pretrain_gpt.py` in a checkout has it: its
    # megatron/core is used (the upcycler too: the tag's megatron-core reads and writes its
    # checkpoints)
    root = trees[stage.tree or "unpatched"]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    if stage.entry == "upcycle":
        return [py, "-m", "megatron_dpsl.upcycle", *stage.argv], env
    run = [py, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(port)]
    env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if stage.entry == "launcher":
        env["MEGATRON_LM_PATH"] = root
        return [*run, "-m", stage.module, *stage.argv], env
    return [*run, os.path.join(root, "pretrain_gpt.py"), *stage.argv], env


def prepare_trees(tree: Path, work: Path) -> dict:
    """The unpatched tree as carried, and a patched copy of it under ``work``."""
    sys.path.insert(0, str(REPO))
    from megatron_dpsl.megatron_lm.patching import apply_patches

    patched = Path(work).resolve() / "tree_patched"
    if not patched.exists():
        shutil.copytree(tree, patched, symlinks=True)
    apply_patches(patched, REPO / "patches")  # this checkout's sets (an installed package has none)
    return {"unpatched": str(Path(tree).resolve()), "patched": str(patched)}


def make_blend(work: Path, tree: str) -> None:
    """Two tiny indexed datasets (Megatron's own builder, the tree's megatron/core): token ids from
    two
    disjoint halves of the vocabulary, so the two groups differ."""
    code = f"""
import sys, numpy as np, torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
rng = np.random.default_rng(0)
for prefix, lo in zip(sys.argv[1:3], (1, {VOCAB // 2})):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(64):
        tokens = rng.integers(lo, lo + {VOCAB // 2 - 1}, size=4 * {SEQ}).astype(np.int32)
        b.add_document(torch.from_numpy(tokens), [4 * {SEQ}])
    b.finalize(prefix + ".idx")
"""
    Path(work, "data").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-c", code, *data_prefixes(work)],
        check=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")])),
        },
    )


_ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|")  # Megatron-LM's training_log line
_METRIC = re.compile(r"\| ([a-z_ ]+): ([-+]?\d\.\d+E[-+]\d+)")
SHOWN = ("lm loss", "dpsl_loss", "load_balancing_loss", "variance_loss", "orthogonality_loss")


def log_summary(log: str) -> str:
    """The last training_log line's iteration and losses, e.g. "iteration 8/8, lm loss 6.873,
    dpsl_loss
    0.00573" ("" when the log has none: the upcycle stage)."""
    last = next((line for line in reversed(log.splitlines()) if _ITERATION.search(line)), None)
    if last is None:
        return ""
    metrics = dict(_METRIC.findall(last))
    parts = ["iteration {}/{}".format(*_ITERATION.search(last).groups())]
    return ", ".join(parts + [f"{k} {float(metrics[k]):.4g}" for k in SHOWN if k in metrics])


def check(stage: Stage, log: str) -> list[str]:
    """What is wrong with a finished stage (empty: passed)."""
    problems = [f"log lacks /{pattern}/" for pattern in stage.expect if not re.search(pattern, log)]
    if stage.iterations is not None:
        tracker = Path(stage.save) / "latest_checkpointed_iteration.txt"
        got = tracker.read_text().strip() if tracker.is_file() else "missing"
        if got != str(stage.iterations):
            problems.append(f"{tracker}: {got}, expected {stage.iterations}")
    return problems


def run_logged(cmd: list[str], env: dict, log_path: Path, limit_s: int, cwd: Path):
    """Run ``cmd`` (``env`` added) with its output in ``log_path`` (headed by the command); the
    return code,
    or ``"timeout"`` after ``limit_s`` seconds."""
    with open(log_path, "w") as log:
        log.write(
            "$ "
            + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            + " "
            + shlex.join(cmd)
            + "\n"
        )
        log.flush()
        try:
            return subprocess.run(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                timeout=limit_s,
                cwd=cwd,
            ).returncode
        except subprocess.TimeoutExpired:
            return "timeout"


def run(tag: str, tree: Path, work: Path, out: Path, only: list[str] | None, port: int) -> int:
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    summary = out / f"story_{tag}.md"
    lines = [
        f"# Megatron-LM story, {tag}",
        "",
        "| stage | result | s | notes |",
        "|---|---|---:|---|",
    ]
    trees = prepare_trees(Path(tree), work)
    failed = False
    for stage in stages(work):
        if only and stage.name not in only:
            continue
        if failed:
            lines.append(f"| {stage.name} | skipped | 0 | an earlier stage failed |")
            continue
        if stage.name == "moe_groups":
            make_blend(work, trees["patched"])
        cmd, env = command(stage, trees, port)
        t0 = time.time()
        (out / "story").mkdir(exist_ok=True)
        log_path = out / "story" / f"{tag}_{stage.name}.log"
        rc = run_logged(cmd, env, log_path, stage.limit_s, work)
        seconds = time.time() - t0
        problems = [f"rc={rc}"] if rc != 0 else check(stage, log_path.read_text(errors="replace"))
        failed = bool(problems)
        notes = "; ".join(problems) or log_summary(log_path.read_text(errors="replace")) or "ok"
        lines.append(f"| {stage.name} | {'FAIL' if failed else 'pass'} | {seconds:.0f} | {notes} |")
        summary.write_text("\n".join(lines) + "\n")
        print(lines[-1], flush=True)
    summary.write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the stages (a GPU machine)")
    p_run.add_argument("--tag", choices=TAGS, required=True)
    p_run.add_argument(
        "--tree", type=Path, required=True, help="unpatched Megatron-LM tree of --tag"
    )
    p_run.add_argument("--work", type=Path, required=True)
    p_run.add_argument("--out", type=Path, required=True)
    p_run.add_argument(
        "--stages", nargs="+", default=None, help="only these (they depend on earlier ones)"
    )
    p_run.add_argument("--port", type=int, default=29500)
    p_show = sub.add_parser("show", help="print every stage's command")
    p_show.add_argument("--tag", choices=TAGS, required=True)
    p_show.add_argument("--work", type=Path, default=Path("/tmp/story"))
    p_show.add_argument(
        "--tree", type=Path, default=None, help="unpatched Megatron-LM tree of --tag"
    )
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.tag, args.tree, args.work, args.out, args.stages, args.port)
    trees = {
        "patched": str(args.work / "tree_patched"),
        "unpatched": str(args.tree or f"<{args.tag} tree>"),
    }
    for stage in stages(args.work):
        cmd, env = command(stage, trees, 29500)
        print(f"# {stage.name} (limit {stage.limit_s} s)")
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
