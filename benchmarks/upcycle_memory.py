"""Peak memory and time of the upcycler on a synthetic ~1B-parameter dense checkpoint.

    # TinyLlama-1.1B shapes, fp32 (4.4 GB in, ~14 GB out)
    python benchmarks/upcycle_memory.py
    python benchmarks/upcycle_memory.py --quick         # ~60M params smoke run
    # the paper's 8in16
    python benchmarks/upcycle_memory.py --num-experts 16 --granularity 4 --topk 8

The dense checkpoint is written in the Megatron-LM layout with the converter's own streaming writer
(random weights, one layer at a time). The conversion runs in a child process
(``python -m megatron_dpsl.upcycle``) so its peak RSS is measured alone (``ru_maxrss`` of the
child). Streaming means that peak should track one layer (source layer + its upcycled pieces) plus
the embedding/output tensors, not the model: the table reports both ratios. Needs ~4x the dense size
free on disk for the default 2in4 (checked with shutil.disk_usage before writing); cleans up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_dpsl.upcycle.pieces import Piece  # noqa: E402
from megatron_dpsl.upcycle.writer import write_torch_dist  # noqa: E402

SHAPES = {  # TinyLlama-1.1B: 22 layers, H 2048, F 5632, 32 heads / 4 KV groups, V 32000
    "full": dict(layers=22, hidden=2048, ffn=5632, heads=32, groups=4, vocab=32000),
    "quick": dict(layers=4, hidden=512, ffn=1536, heads=8, groups=2, vocab=32000),
}


def dense_layer(s, dtype, meta, gen):
    H, F, d = s["hidden"], s["ffn"], s["hidden"] // s["heads"]
    shapes = {
        "self_attention.linear_qkv.layer_norm_weight": (H,),
        "self_attention.linear_qkv.weight": ((s["heads"] + 2 * s["groups"]) * d, H),
        "self_attention.linear_proj.weight": (H, s["heads"] * d),
        "mlp.linear_fc1.layer_norm_weight": (H,),
        "mlp.linear_fc1.weight": (2 * F, H),
        "mlp.linear_fc2.weight": (H, F),
    }
    make = (
        (lambda sh: torch.empty(sh, dtype=dtype, device="meta"))
        if meta
        else (lambda sh: (torch.randn(sh, generator=gen) * 0.02).to(dtype))
    )
    return {n: make(sh) for n, sh in shapes.items()}


def write_dense(root: Path, s, dtype):
    import argparse as ap

    L = s["layers"]
    gen = torch.Generator().manual_seed(0)

    def pieces(group, meta):
        if group == "global":
            mk = (
                (lambda sh: torch.empty(sh, dtype=dtype, device="meta"))
                if meta
                else (lambda sh: (torch.randn(sh, generator=gen) * 0.02).to(dtype))
            )
            return [
                Piece("embedding.word_embeddings.weight", mk((s["vocab"], s["hidden"]))),
                Piece("decoder.final_layernorm.weight", mk((s["hidden"],))),
                Piece("output_layer.weight", mk((s["vocab"], s["hidden"]))),
            ]
        ps = [
            Piece(f"decoder.layers.{n}", t, ((group, L),))
            for n, t in dense_layer(s, dtype, meta, gen).items()
        ]
        for n in (
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        ):
            ps.append(
                Piece(f"decoder.layers.{n}._extra_state", None, ((group, L),), is_object=True)
            )
        return ps

    args = ap.Namespace(
        num_layers=L,
        hidden_size=s["hidden"],
        ffn_hidden_size=s["ffn"],
        num_attention_heads=s["heads"],
        group_query_attention=True,
        num_query_groups=s["groups"],
        swiglu=True,
        normalization="RMSNorm",
        padded_vocab_size=s["vocab"],
        untie_embeddings_and_output_weights=True,
        add_bias_linear=False,
        num_experts=None,
    )
    planned = [(g, pieces(g, True)) for g in ["global", *range(L)]]
    write_torch_dist(
        root / "iter_0000001",
        planned,
        lambda g: pieces(g, False),
        {"args": args, "iteration": 1, "checkpoint_version": 3.0},
    )
    (root / "latest_checkpointed_iteration.txt").write_text("1")
    n = sum(p.numel for _, ps in planned for p in ps)
    layer_bytes = sum(p.nbytes for p in planned[1][1])
    global_bytes = sum(p.nbytes for p in planned[0][1])
    return n, layer_bytes, global_bytes


# Runs a module as __main__ and reports the process's own peak RSS. VmHWM (/proc/self/status)
# belongs to the address space created by exec, unlike ru_maxrss, which Linux carries over from the
# forking parent (this script, which has just written the dense checkpoint).
_PEAK = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    if sys.argv[0] != '-':
        runpy.run_module(sys.argv[0], run_name='__main__')
finally:
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
    print('PEAK_RSS_KB', hwm, file=sys.stderr)
"""


def run_measured(module_argv, env) -> tuple[int, str, str, int]:
    """Run ``python -m module_argv``; return (rc, stdout, stderr, that process's peak RSS in
    bytes)."""
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, *module_argv], env=env, capture_output=True, text=True
    )
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    return (
        proc.returncode,
        proc.stdout,
        proc.stderr,
        int(peak[-1].split()[1]) * 1024 if peak else -1,
    )


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--granularity", type=int, default=1)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument(
        "--workdir", default=None, help="where to write (default: a temp dir next to /tmp)"
    )
    a = p.parse_args()
    s = SHAPES["quick" if a.quick else "full"]
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    work = Path(tempfile.mkdtemp(prefix="upcycle-bench-", dir=a.workdir))
    try:
        esz = torch.tensor([], dtype=dtype).element_size()
        dense_est = (
            2 * s["vocab"] * s["hidden"]
            + s["layers"] * (3 * s["hidden"] * s["ffn"] + 4 * s["hidden"] ** 2)
        ) * esz
        need = dense_est * (2 + a.num_experts // a.granularity)
        free = shutil.disk_usage(work).free
        if free < need:
            sys.exit(
                f"needs ~{need / 2**30:.1f} GiB free in {work.parent}, has {free / 2**30:.1f} GiB"
            )
        t0 = time.perf_counter()
        n, layer_bytes, global_bytes = write_dense(work / "dense", s, dtype)
        t_write = time.perf_counter() - t0
        cmd = [
            "megatron_dpsl.upcycle",
            "--source",
            str(work / "dense"),
            "--output",
            str(work / "moe"),
            "--num-experts",
            str(a.num_experts),
            "--granularity",
            str(a.granularity),
            "--moe-router-topk",
            str(a.topk),
            "--no-progress",
        ]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        )
        t0 = time.perf_counter()
        rc, out, err, peak = run_measured(cmd, env)
        t_conv = time.perf_counter() - t0
        if rc:
            sys.exit(f"conversion failed:\n{err[-3000:]}")
        # baseline: the same interpreter importing the converter (torch, safetensors, tqdm),
        # converting nothing
        t0 = time.perf_counter()
        _, _, _, base_rss = run_measured(["megatron_dpsl.upcycle.convert"], env)  # imports only
        t_import = time.perf_counter() - t0
        dense_size, moe_size = du(work / "dense"), du(work / "moe")
        out_layer = (
            layer_bytes
            - s["hidden"] * 2 * esz
            + (a.num_experts // a.granularity - 1) * 3 * s["hidden"] * s["ffn"] * esz
        )
        print(out)
        rows = [
            ("dense params", f"{n / 1e9:.3f} B ({a.dtype})"),
            ("dense on disk", f"{dense_size / 2**30:.2f} GiB (written in {t_write:.1f} s)"),
            ("MoE on disk", f"{moe_size / 2**30:.2f} GiB"),
            (
                "conversion wall time",
                f"{t_conv:.1f} s  ({dense_size / 2**20 / t_conv:.0f} MiB/s read, "
                f"{moe_size / 2**20 / t_conv:.0f} MiB/s written)",
            ),
            ("interpreter + imports alone", f"{base_rss / 2**30:.2f} GiB RSS, {t_import:.1f} s"),
            ("peak RSS (conversion)", f"{peak / 2**30:.2f} GiB"),
            ("peak RSS - imports", f"{(peak - base_rss) / 2**30:.2f} GiB"),
            ("one dense layer + its MoE layer", f"{(layer_bytes + out_layer) / 2**30:.2f} GiB"),
            ("embedding + output layer", f"{global_bytes / 2**30:.2f} GiB"),
            ("(peak RSS - imports) / dense size", f"{(peak - base_rss) / dense_size:.2f}"),
            ("(peak RSS - imports) / MoE size", f"{(peak - base_rss) / moe_size:.2f}"),
        ]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k.ljust(width)} | {v}" for k, v in rows))
        print("command: python -m", " ".join(cmd))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
