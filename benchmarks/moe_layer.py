"""MoE layer step (forward + backward) with Megatron's TopKRouter + aux loss vs DPSLRouter.

Variants, all in one Megatron-Core ``MoELayer`` with the same experts, weights and input, timed in
the same run (interleaved rounds, median):

  topk_none        TopKRouter, no balancing loss (what routing alone costs)
  topk_aux         TopKRouter + Megatron's aux loss (moe_router_load_balancing_type="aux_loss"): the
  baseline dpsl             megatron_dpsl.DPSLRouter, DPSL only (device-native Beta CDF)
  dpsl_scipy_host  TopKRouter + DPSL computed the paper's way: probabilities copied to the host,
                   sorted, SciPy ``betainc`` for the loss and the Beta pdf for the backward, copied
                   back

Printed: ms/step for each, DPSL overhead vs topk_aux (goal on the GPU at paper scale: <= 1 %), the
host baseline's overhead and peak memory.

GPU, paper scale (Llama-3.2-1B upcycled 8-in-16: hidden 2048, 16 experts of ffn 2048, top-8, SwiGLU;
seq 4,608 x micro-batch 16 = 73,728 tokens; Transformer Engine grouped GEMM when TE imports):
    python benchmarks/moe_layer.py --device cuda
CPU smoke run (tiny shapes; megatron-core's CUDA-only calls need the test shims, imported from
tests/support/megatron_cpu.py by path because a CPU MoELayer needs them — the package itself needs
none):
    python benchmarks/moe_layer.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if (
    importlib.util.find_spec("megatron_dpsl") is None
):  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
VARIANTS = ("topk_none", "topk_aux", "dpsl", "dpsl_scipy_host")


# --------------------------------------------------------------------------------------------------
# The paper's approach (Appendix C.5): SciPy on the host. A baseline, not part of the package.
# --------------------------------------------------------------------------------------------------
class _HostScipyDPSL(torch.autograd.Function):
    """Eq. 4 (no λ) with a host round trip: sort + SciPy betainc forward, Beta pdf backward."""

    @staticmethod
    def forward(ctx, probs, alpha):
        from scipy.special import betainc
        from scipy.stats import beta as beta_dist

        p = probs.detach().float().cpu().numpy().astype(np.float64)  # [num_tokens, num_experts]
        a = alpha.detach().cpu().numpy().astype(np.float64)
        num_tokens, num_experts = p.shape
        j = np.arange(1, num_tokens + 1) / num_tokens
        loss, grad = 0.0, np.empty_like(p)
        for k in range(num_experts):
            order = np.argsort(p[:, k], kind="stable")
            ps = p[order, k]
            diff = j - betainc(a[k], a.sum() - a[k], ps)
            loss += float((diff * diff).sum()) / num_tokens
            grad[order, k] = -2.0 * diff * beta_dist.pdf(ps, a[k], a.sum() - a[k]) / num_tokens
        ctx.save_for_backward(torch.from_numpy(grad).to(probs.device, torch.float32))
        return torch.tensor(loss, dtype=torch.float32, device=probs.device)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None


def check_host_baseline(device: str) -> float:
    """The host baseline computes the same Eq. 4 as ``dpsl_loss``: returns the max relative
    difference
    (loss and gradient) on a random batch; the benchmark refuses to compare unequal functions."""
    from megatron_dpsl import dpsl_loss

    gen = torch.Generator(device=device).manual_seed(3)
    logits = torch.randn(1024, 16, device=device, generator=gen)
    alpha = torch.ones(16)
    p_dev = torch.softmax(logits, -1).requires_grad_()
    p_host = p_dev.detach().clone().requires_grad_()
    loss_dev = dpsl_loss(p_dev, alpha.to(device))
    loss_dev.backward()
    loss_host = _HostScipyDPSL.apply(p_host, alpha)
    loss_host.backward()
    rel_loss = ((loss_dev - loss_host).abs() / loss_host.abs()).item()
    rel_grad = ((p_dev.grad - p_host.grad).norm() / p_host.grad.norm()).item()
    worst = max(rel_loss, rel_grad)
    # both fp32 outputs of float64 math (SciPy) vs a ≤2e-6-accurate float32 CDF: agree to ~1e-5
    if not worst < 1e-4:
        raise RuntimeError(
            f"host SciPy baseline and dpsl_loss disagree: loss {rel_loss:.3g}, grad {rel_grad:.3g}"
        )
    return worst


def _host_router_class():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.moe.router import TopKRouter

    class HostScipyDPSLRouter(TopKRouter):
        """TopKRouter + the paper's host-side DPSL on the fp32 softmax of all experts."""

        def gating(self, input):
            logits = super().gating(input)
            if self.training and torch.is_grad_enabled():
                probs = torch.softmax(logits.float(), dim=-1).reshape(
                    -1, logits.shape[-1]
                )  # [num_tokens, num_experts]
                alpha = torch.full((probs.shape[-1],), 1.0)
                loss = _HostScipyDPSL.apply(probs, alpha)
                logits = MoEAuxLossAutoScaler.apply(logits, 0.01 * loss)
            return logits

    return HostScipyDPSLRouter


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------
def _load_cpu_shims():
    """tests/support/megatron_cpu.py (by path): makes megatron-core's CUDA-only calls work on a
    CPU."""
    spec = importlib.util.spec_from_file_location(
        "megatron_cpu", REPO / "tests" / "megatron_cpu.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def init_parallel(device: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if device == "cpu":
        _load_cpu_shims().init_single_process()
        return
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29800 + os.getpid() % 1000))
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def make_config(args, variant: str):
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    balancing = {
        "topk_none": dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0),
        "topk_aux": dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01),
        "dpsl": dict(
            moe_router_load_balancing_type="dpsl", moe_aux_loss_coeff=0.0, moe_dpsl_coeff=0.01
        ),
        "dpsl_scipy_host": dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0),
    }[variant]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    return DPSLTransformerConfig(
        num_layers=1,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        moe_ffn_hidden_size=args.ffn,
        num_attention_heads=max(1, args.hidden // 128),
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
        moe_token_dispatcher_type=args.dispatcher,
        moe_grouped_gemm=args.grouped_gemm,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_cpu_initialization=args.device == "cpu",
        moe_dpsl_alpha=1.0,
        moe_dpsl_log_interval=0,  # diagnostics off: time the loss itself (they run every N steps)
        hidden_dropout=0.0,
        **balancing,
    )


def build_layer(args, variant: str, state=None):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_dpsl.models.specs import moe_submodules

    config = make_config(args, variant)
    spec_fn = get_gpt_layer_with_transformer_engine_spec if args.te else get_gpt_layer_local_spec
    # the MoE layer's MoESubmodules: ModuleSpec.submodules (megatron-core 0.16) or partial.keywords
    # (0.19)
    (submodules,) = moe_submodules(
        spec_fn(num_experts=args.experts, moe_grouped_gemm=args.grouped_gemm)
    )
    if variant == "dpsl":
        from megatron_dpsl.routing.router import DPSLRouter as router
    elif variant == "dpsl_scipy_host":
        router = _host_router_class()
    else:
        router = TopKRouter
    # Megatron's own hook: the same experts, only the router class differs between variants
    submodules = dataclasses.replace(submodules, router=router)
    layer = MoELayer(config, submodules, layer_number=1).to(args.device)
    if state is not None:
        layer.load_state_dict(state)
    layer.train()
    return layer


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(layer, x, grad_out, steps: int, device: str) -> list[float]:
    """ms per forward+backward step (CUDA events on the GPU, perf_counter after a sync on the
    CPU)."""
    times = []
    for _ in range(steps):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out, _ = layer(x)
            out.backward(grad_out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out, _ = layer(x)
            out.backward(grad_out)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(args) -> dict:
    from megatron_dpsl.losses.dpsl import selected_impl

    torch.manual_seed(0)
    init_parallel(args.device)
    baseline_diff = check_host_baseline(args.device) if "dpsl_scipy_host" in args.variants else None
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    layers, state = {}, None
    for v in args.variants:
        layers[v] = build_layer(args, v, state)
        state = state or layers[v].state_dict()
    experts = {type(layer.experts).__name__ for layer in layers.values()}
    assert len(experts) == 1, f"variants differ in experts: {experts}"

    gen = torch.Generator(device=args.device).manual_seed(1)
    x = torch.randn(
        args.seq, args.micro_batch, args.hidden, device=args.device, dtype=dtype, generator=gen
    )
    x.requires_grad_()
    grad_out = torch.randn(x.shape, device=args.device, dtype=dtype, generator=gen)

    samples = {v: [] for v in args.variants}
    peak = {}
    for v in args.variants:  # warm-up: allocator, TE/cuBLAS handles, the DPSL table cache
        time_steps(layers[v], x, grad_out, args.warmup, args.device)
    for _ in range(args.rounds):  # interleaved rounds: drift hits every variant alike
        for v in args.variants:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            samples[v] += time_steps(layers[v], x, grad_out, args.steps, args.device)
            if args.device == "cuda":
                peak[v] = max(peak.get(v, 0), torch.cuda.max_memory_allocated())
    _sync(args.device)

    res = {
        "device": torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        "threads)",
        "torch": torch.__version__,
        "megatron_core": _version("megatron-core"),
        "transformer_engine": _version("transformer-engine") if args.te else None,
        "experts_module": experts.pop(),
        "shape": dict(
            hidden=args.hidden,
            ffn=args.ffn,
            experts=args.experts,
            topk=args.topk,
            seq=args.seq,
            micro_batch=args.micro_batch,
            tokens=args.seq * args.micro_batch,
            dtype=args.dtype,
            dispatcher=args.dispatcher,
        ),
        "ms": {v: statistics.median(s) for v, s in samples.items()},
        "ms_min": {v: min(s) for v, s in samples.items()},
        "ms_spread": {
            v: (float(np.percentile(s, 25)), float(np.percentile(s, 75)))
            for v, s in samples.items()
        },
        "peak_mib": {v: peak[v] / 2**20 for v in peak},
        "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": args.steps * args.rounds,
        "host_baseline_max_rel_diff": baseline_diff,
        # which dpsl_loss implementation DPSLRouter ran (fp32 probs; MEGATRON_DPSL_LOSS_IMPL
        # overrides)
        "dpsl_loss_impl": selected_impl(torch.empty(1, args.experts, device=args.device)),
    }
    for key, out in (("ms", "overhead_pct"), ("ms_min", "overhead_pct_min")):
        base = res[key].get("topk_aux")
        if base:
            res[out] = {
                v: 100.0 * (ms - base) / base for v, ms in res[key].items() if v != "topk_aux"
            }
    return res


def _version(dist: str):
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def markdown(res: dict, command: str) -> str:
    s = res["shape"]
    lines = [
        f"MoE layer step (forward+backward), {res['device']}; torch {res['torch']}, megatron-core "
        f"{res['megatron_core']}, TE {res['transformer_engine'] or 'not used'} "
        f"({res['experts_module']}); "
        f"hidden {s['hidden']}, ffn {s['ffn']}, {s['experts']} experts top-{s['topk']}, "
        f"{s['seq']} x {s['micro_batch']} = {s['tokens']:,} tokens, {s['dtype']}, "
        f"{s['dispatcher']} dispatcher; "
        f"median of {res['steps']} steps; dpsl_loss implementation: {res['dpsl_loss_impl']}.",
        "",
        f"Command: `{command}`",
        "",
        "| variant | ms/step median | IQR ms | min ms | vs topk_aux (median) | vs topk_aux "
        "(min) | peak memory MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def ovh(key, v):
        return "baseline" if v == "topk_aux" else f"{res.get(key, {}).get(v, float('nan')):+.2f} %"

    for v, ms in res["ms"].items():
        lo, hi = res["ms_spread"][v]
        mem = f"{res['peak_mib'][v]:.0f}" if v in res["peak_mib"] else "n/a (CPU)"
        lines.append(
            f"| {v} | {ms:.3f} | {lo:.3f}–{hi:.3f} | {res['ms_min'][v]:.3f} | "
            f"{ovh('overhead_pct', v)} "
            f"| {ovh('overhead_pct_min', v)} | {mem} |"
        )
    if "dpsl" in res["ms"] and "dpsl_scipy_host" in res["ms"] and "topk_aux" in res["ms"]:
        base = res["ms"]["topk_aux"]
        dev = res["ms"]["dpsl"] - base
        host = res["ms"]["dpsl_scipy_host"] - base
        ratio = (
            f"{host / dev:.1f}x" if dev > 0 and host > 0 else "n/a (an overhead is within noise)"
        )
        lines += [
            "",
            f"Medians: DPSL adds {dev:+.3f} ms/step ({100 * dev / base:+.2f} %); the paper's "
            "SciPy-on-host "
            f"DPSL adds {host:+.3f} ms/step ({100 * host / base:+.2f} %): host/device overhead "
            f"ratio {ratio}.",
        ]
    if res.get("host_baseline_max_rel_diff") is not None:
        lines += [
            "",
            f"Host baseline checked against `dpsl_loss` on 1,024 x 16 probabilities: max relative "
            f"difference {res['host_baseline_max_rel_diff']:.1e} (loss and gradient).",
        ]
    if res["device"].startswith("CPU"):
        lines += [
            "",
            f"Process peak RSS {res['process_max_rss_mib']:.0f} MiB (CPU: per-variant peak not "
            "tracked).",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps (smoke run)")
    p.add_argument("--hidden", type=int, help="default 2048 (GPU) / 128 (--quick)")
    p.add_argument("--ffn", type=int, help="expert FFN size; default 2048 (GPU) / 128 (--quick)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--seq", type=int, help="default 4608 (GPU) / 256 (--quick)")
    p.add_argument("--micro-batch", type=int, help="default 16 (GPU) / 2 (--quick)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 (GPU) / fp32 (CPU)")
    p.add_argument(
        "--dispatcher",
        choices=["alltoall", "allgather"],
        help="default alltoall (GPU) / allgather (CPU: alltoall makes a CUDA stream)",
    )
    p.add_argument(
        "--te",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Transformer Engine layer spec with grouped GEMM (default: on when TE imports, GPU "
        "only)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    p.add_argument("--warmup", type=int, help="warm-up steps per variant (default 3 / 2 quick)")
    p.add_argument(
        "--steps", type=int, help="timed steps per variant per round (default 5 / 3 quick)"
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 4 / 2 quick)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="write the markdown table here")
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    quick_cpu = a.quick or not gpu
    defaults = dict(
        hidden=128 if quick_cpu else 2048,
        ffn=128 if quick_cpu else 2048,
        seq=256 if quick_cpu else 4608,
        micro_batch=2 if quick_cpu else 16,
        dtype="bf16" if gpu else "fp32",
        dispatcher="alltoall" if gpu else "allgather",
        warmup=2 if a.quick else 3,
        steps=3 if a.quick else 5,
        rounds=2 if a.quick else 4,
    )
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.te is None:
        a.te = gpu and _te_available()
    if a.te and not gpu:
        p.error("--te needs --device cuda")
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible (use --device cpu --quick here)")
    a.grouped_gemm = (
        a.te
    )  # TE grouped GEMM; without TE the local spec's SequentialMLP (no grouped_gemm pkg)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    if a.topk > a.experts:
        p.error(f"--topk ({a.topk}) must be <= --experts ({a.experts})")
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    res = None
    while res is None:
        try:
            res = run(args)
        except torch.cuda.OutOfMemoryError:
            # "or the largest that fits": halve the micro-batch (the table prints the shape used)
            if args.device != "cuda" or args.micro_batch == 1:
                raise
            print(
                f"out of GPU memory at micro-batch {args.micro_batch}; retrying with "
                f"{args.micro_batch // 2}"
            )
            args.micro_batch //= 2
        if res is None:  # outside the except block: the failed run's frames are gone by now
            torch.cuda.empty_cache()
    command = "python benchmarks/moe_layer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(res, command.strip())
    print(md)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if args.markdown:
        args.markdown.write_text(md)
    return res


if __name__ == "__main__":
    main()
