"""Forward+backward time of ``dpsl_loss``, against baselines measured in the same run.

CPU (default): against the paper's approach (Appendix C.5): per expert ``torch.sort`` of the
probability column, the sorted values moved to the host, ``scipy.special.betainc`` for F, and a
custom autograd Function whose backward is ``scipy.stats.beta.pdf`` (also on the host), results
moved back.

    # full grid: B in {8192, 73728, 589824} x N in {4, 16, 64}
    python benchmarks/loss.py
    # B = 73,728 (16 x 4,608), N = 16 only
    python benchmarks/loss.py --quick

Prints one row per (B, N): ms per forward+backward (median of --repeats after a warm-up that also
builds the CDF table; process CPU time, robust to other jobs on a shared core), the baseline/ours
ratio (median of per-repeat ratios, ours and the baseline interleaved), and peak RSS growth (psutil;
includes the allocator's caching).

GPU (issue 12's goals; one command, < 90 s on an H100, prints a markdown table):

    # bf16 probs: B=73,728 N=16; N=64; B=589,824 N=16; grouped+padded
    python benchmarks/loss.py --device cuda

Per shape and implementation (``torch``: the torch path; ``triton``:
megatron_dpsl/losses/dpsl_triton.py), all in one process: ms per call from CUDA events around
--calls back-to-back calls (eager, no graph), ms per call with a synchronisation around each call
(median), host time to enqueue one call (median, the GPU idle before it), CUDA kernels per call
(torch.profiler; memsets/memcpys not counted) and the fp32 ``torch.sort`` of the same [N, B] block
(the floor: any exact Eq. 4 sorts), timed the same way, with the ratio to it. The fused and torch
results are compared before timing (max relative difference printed). A second table splits the
fused path's host time at B=73,728 N=16 by cumulative stage (``host_breakdown``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_dpsl.losses.dpsl import dpsl_loss  # noqa: E402


class _ScipyBetaCDF(torch.autograd.Function):
    """The paper's CDF: host round trip to SciPy; backward = Beta pdf from SciPy."""

    @staticmethod
    def forward(ctx, x, a: float, b: float):
        import scipy.special

        x_host = x.detach().double().cpu().numpy()
        ctx.x_host, ctx.a, ctx.b = x_host, a, b
        return torch.from_numpy(scipy.special.betainc(a, b, x_host)).to(
            device=x.device, dtype=x.dtype
        )

    @staticmethod
    def backward(ctx, grad):
        import scipy.stats

        pdf = torch.from_numpy(scipy.stats.beta.pdf(ctx.x_host, ctx.a, ctx.b)).to(
            device=grad.device, dtype=grad.dtype
        )
        return grad * pdf, None, None


def baseline_loss(probs: torch.Tensor, alpha: list) -> torch.Tensor:
    """Eq. 4 the paper's way: per expert sort + SciPy CDF. probs [B, N] float32, alpha list of N
    floats."""
    num_tokens, num_experts = probs.shape
    total_alpha = float(sum(alpha))
    ecdf = torch.arange(1, num_tokens + 1, device=probs.device, dtype=torch.float32) / num_tokens
    loss = probs.new_zeros((), dtype=torch.float32)
    for k in range(num_experts):
        p_sorted, _ = torch.sort(probs[:, k].float())
        cdf = _ScipyBetaCDF.apply(p_sorted, alpha[k], total_alpha - alpha[k])
        loss = loss + ((ecdf - cdf) ** 2).mean()
    return loss


def _probs(num_tokens: int, num_experts: int, device, dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(num_tokens, num_experts, generator=gen) * 2.0
    return torch.softmax(logits, -1).to(device=device, dtype=dtype).requires_grad_()


# --------------------------------------------------------------------------------------------------
# CPU: against the SciPy-on-host baseline
# --------------------------------------------------------------------------------------------------
def _cpu_time(fn) -> float:
    """ms of process CPU time for one call (other processes sharing the core inflate it far less
    than wall time)."""
    t0 = time.process_time()
    fn()
    return (time.process_time() - t0) * 1e3


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def bench_cpu(
    num_tokens: int, num_experts: int, dtype, repeats: int, baseline: bool, alpha_value: float
):
    probs = _probs(num_tokens, num_experts, "cpu", dtype)
    alpha = [alpha_value] * num_experts
    alpha_t = torch.tensor(alpha, dtype=torch.float64)

    def ours():
        probs.grad = None
        dpsl_loss(probs, alpha_t).backward()

    def theirs():
        probs.grad = None
        baseline_loss(probs, alpha).backward()

    rss0 = _rss()
    ours()  # warm-up: builds the CDF table once per alpha
    peak = _rss() - rss0
    # Interleave ours and the baseline so both see the same machine load; ratio = median of per-pair
    # ratios.
    t_ours, t_base = [], []
    for _ in range(repeats):
        t_ours.append(_cpu_time(ours))
        if baseline:
            t_base.append(_cpu_time(theirs))
    med_ours = statistics.median(t_ours)
    if not baseline:
        return med_ours, float("nan"), float("nan"), peak
    ratio = statistics.median(b / o for b, o in zip(t_base, t_ours))
    return med_ours, statistics.median(t_base), ratio, peak


def main_cpu(args):
    dtype = getattr(torch, args.dtype)
    grid = [(73728, 16)] if args.quick else [(b, n) for b in args.tokens for n in args.experts]
    print(f"device=cpu dtype={args.dtype} threads={torch.get_num_threads()} alpha={args.alpha}")
    print(f"{'B':>8} {'N':>4} {'ours ms':>10} {'baseline ms':>12} {'ratio':>7} {'peak MiB':>9}")
    for num_tokens, num_experts in grid:
        t_ours, t_base, ratio, peak = bench_cpu(
            num_tokens, num_experts, dtype, args.repeats, not args.no_baseline, args.alpha
        )
        print(
            f"{num_tokens:>8} {num_experts:>4} {t_ours:>10.2f} {t_base:>12.2f} {ratio:>7.2f} "
            f"{peak / 2**20:>9.1f}"
        )


# --------------------------------------------------------------------------------------------------
# GPU: torch path vs fused path vs the sort floor
# --------------------------------------------------------------------------------------------------
GPU_SHAPES = (  # (label, B, N, grouped): issue 12's shapes
    ("B=73,728 N=16", 73728, 16, False),
    ("B=73,728 N=64", 73728, 64, False),
    ("B=589,824 N=16", 589824, 16, False),
    ("B=73,728 N=16, 2 groups + 10 % padding", 73728, 16, True),
)


def _events_ms(fn, calls: int) -> float:
    """ms per call: CUDA events around ``calls`` back-to-back calls (the host enqueues ahead of the
    GPU)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def _synced_and_host_ms(fn, repeats: int):
    """(median ms per call with a sync before and after; median host ms to enqueue one call on an
    idle GPU)."""
    synced, host = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        synced.append((t2 - t0) * 1e3)
    return statistics.median(synced), statistics.median(host)


def _kernels_per_call(fn, calls: int = 5) -> float:
    """CUDA kernels per call, from torch.profiler (memset/memcpy activity is not a kernel
    launch)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = prof.events()
    names = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    if not names:  # profiler versions that attach device kernels to their CPU ops only
        names = [k.name for e in events for k in e.kernels]
    return sum(not n.lower().startswith(("memset", "memcpy")) for n in names) / calls


def _measure(fn, calls: int, repeats: int) -> dict:
    for _ in range(3):  # warm-up: CDF table, Triton compilation, allocator
        fn()
    events = _events_ms(fn, calls)
    synced, host = _synced_and_host_ms(fn, repeats)
    return dict(events=events, synced=synced, host=host, kernels=_kernels_per_call(fn))


def bench_gpu_shape(num_tokens, num_experts, grouped, dtype, calls, repeats, impls):
    probs = _probs(num_tokens, num_experts, "cuda", dtype)
    alpha = torch.ones(num_experts, dtype=torch.float64)  # CPU alpha: the documented sync-free way
    gids = pad = None
    if (
        grouped
    ):  # the paper's modality prior (Sec. 3.4): alpha_base 0.75, shift 0.5 on each group's half
        alpha = torch.full((2, num_experts), 0.75, dtype=torch.float64)
        alpha[0, : num_experts // 2] += 0.5
        alpha[1, num_experts // 2 :] += 0.5
        gen = torch.Generator(device="cuda").manual_seed(1)
        gids = torch.randint(0, 2, (num_tokens,), device="cuda", generator=gen)
        pad = torch.rand(num_tokens, device="cuda", generator=gen) < 0.1

    def call(impl):
        def fn():
            probs.grad = None
            dpsl_loss(probs, alpha, gids, pad, impl=impl).backward()

        return fn

    # the fused and torch results agree before anything is timed
    outs = {}
    for impl in impls:
        probs.grad = None
        loss = dpsl_loss(probs, alpha, gids, pad, impl=impl)
        loss.backward()
        outs[impl] = (loss.detach().float(), probs.grad.float().clone())
    diff = None
    if len(outs) == 2:
        (la, ga), (lb, gb) = outs.values()
        diff = max(((la - lb).abs() / lb.abs()).item(), ((ga - gb).norm() / gb.norm()).item())

    floor_in = probs.detach().float().t().contiguous()  # the [N, B] fp32 block
    res = {"floor": _measure(lambda: torch.sort(floor_in, dim=-1, stable=True), calls, repeats)}
    for impl in impls:
        res[impl] = _measure(call(impl), calls, repeats)
    return res, diff


def host_breakdown(num_tokens: int, num_experts: int, dtype, repeats: int, device="cuda") -> dict:
    """Median host ms to issue each cumulative stage of one fused call on an idle device (sync
    before, none after): where the host time of the 'host enqueue' column goes. The differences
    between rows are the kernels' launches and allocations (loss_and_grad - sort), the wrapper
    (validation, table lookup, autograd Function: forward - loss_and_grad) and the backward
    (autograd engine, ``ones_like`` seed, one multiply)."""
    from megatron_dpsl.losses import dpsl_triton
    from megatron_dpsl.losses.dpsl_inputs import table_for

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    probs = _probs(num_tokens, num_experts, device, dtype)
    alpha = torch.ones(num_experts, dtype=torch.float64)
    table, _ = table_for(probs, alpha)

    def fwd_bwd():
        probs.grad = None
        dpsl_loss(probs, alpha, impl="triton").backward()

    stages = {
        "transpose + torch.sort": lambda: torch.sort(
            probs.detach().t().contiguous(), dim=-1, stable=True
        ),
        "+ buffers, kernels, sum (dpsl_triton.loss_and_grad)": lambda: dpsl_triton.loss_and_grad(
            probs, table, 1, None, None, True, True
        ),
        "+ checks, table lookup, autograd Function (dpsl_loss forward)": lambda: dpsl_loss(
            probs, alpha, impl="triton"
        ),
        "+ backward (forward + backward)": fwd_bwd,
    }
    out = {}
    for name, fn in stages.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        sync()
        out[name] = statistics.median(times)
    return out


def main_gpu(args):
    from megatron_dpsl.losses import dpsl_triton

    t_start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    fused = (
        dpsl_triton.runs_on(torch.device("cuda")) and dtype != torch.float64
    )  # float64: torch path only
    impls = ["torch", "triton"] if fused else ["torch"]
    shapes = GPU_SHAPES[:1] if args.quick else GPU_SHAPES
    print(
        f"`dpsl_loss` forward+backward on {torch.cuda.get_device_name()}, torch "
        f"{torch.__version__}, "
        f"triton {dpsl_triton.triton.__version__ if dpsl_triton.triton else 'not installed'}; "
        f"{args.dtype} probs, "
        f"eager; events over {args.calls} back-to-back calls, sync/host medians of {args.repeats}."
    )
    print()
    print(
        "| shape | path | ms/call (events) | ms/call (sync each) | host enqueue ms | kernels/call "
        "| sort floor ms (kernels) | ratio to floor | fused vs torch |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, num_tokens, num_experts, grouped in shapes:
        res, diff = bench_gpu_shape(
            num_tokens, num_experts, grouped, dtype, args.calls, args.repeats, impls
        )
        floor = res["floor"]
        for impl in impls:
            r = res[impl]
            agree = f"{diff:.1e}" if diff is not None and impl == "triton" else ""
            print(
                f"| {label} | {impl} | {r['events']:.3f} | {r['synced']:.3f} | {r['host']:.3f} | "
                f"{r['kernels']:.0f} "
                f"| {floor['events']:.3f} ({floor['kernels']:.0f}) | "
                f"{r['events'] / floor['events']:.2f} | {agree} |"
            )
    if fused:
        label, num_tokens, num_experts, _ = GPU_SHAPES[0]
        print()
        print(
            f"Host time of the fused path, {label}, by cumulative stage (median of {args.repeats}, "
            "idle GPU):"
        )
        print()
        print("| stage | host ms |")
        print("|---|---:|")
        for name, ms in host_breakdown(num_tokens, num_experts, dtype, args.repeats).items():
            print(f"| {name} | {ms:.3f} |")
    print()
    print(
        "Goals (issue 12): B=73,728 N=16 bf16 eager <= 0.25 ms and <= 1.6x the floor; N=64 and "
        "B=589,824 "
        "within 2x of their floors. 'fused vs torch': max of |dL|/|L| and ||dgrad||/||grad||. "
        f"Benchmark wall time {time.perf_counter() - t_start:.0f} s."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="only B=73728, N=16")
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[8192, 73728, 589824], help="CPU grid"
    )
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64], help="CPU grid")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float64"],
        help="probs dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="symmetric prior value (CPU)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (default 7 CPU, 20 CUDA)"
    )
    parser.add_argument(
        "--calls", type=int, default=50, help="CUDA: back-to-back calls between the events"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the SciPy baseline (CPU)")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.repeats = args.repeats or (20 if gpu else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device visible")
        main_gpu(args)
    else:
        main_cpu(args)


if __name__ == "__main__":
    main()
