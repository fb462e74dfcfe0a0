"""Forward+backward time of ``dpsl_loss`` against the paper's approach, measured in the same run.

Baseline (the paper's PyTorch implementation, Appendix C.5): per expert ``torch.sort`` of the probability
column, the sorted values moved to the host, ``scipy.special.betainc`` for F, and a custom autograd
Function whose backward is ``scipy.stats.beta.pdf`` (also on the host), results moved back to the device.

    python benchmarks/loss.py                 # full grid: B in {8192, 73728, 589824} x N in {4, 16, 64}
    python benchmarks/loss.py --quick         # B = 73,728 (16 x 4,608), N = 16 only
    python benchmarks/loss.py --device cuda --dtype bfloat16

Prints one row per (B, N): ms per forward+backward (median of --repeats after a warm-up that also builds
the CDF table; CPU: process CPU time, robust to other jobs on a shared core), the baseline/ours ratio
(median of per-repeat ratios, ours and the baseline interleaved), and peak memory of ours (CUDA: max_memory_allocated; CPU: peak RSS
growth over the run's start, psutil, which includes the allocator's caching).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_dpsl.loss import dpsl_loss  # noqa: E402


class _ScipyBetaCDF(torch.autograd.Function):
    """The paper's CDF: host round trip to SciPy; backward = Beta pdf from SciPy."""

    @staticmethod
    def forward(ctx, x, a: float, b: float):
        import scipy.special

        x_host = x.detach().double().cpu().numpy()
        ctx.x_host, ctx.a, ctx.b = x_host, a, b
        return torch.from_numpy(scipy.special.betainc(a, b, x_host)).to(device=x.device, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        import scipy.stats

        pdf = torch.from_numpy(scipy.stats.beta.pdf(ctx.x_host, ctx.a, ctx.b)).to(device=grad.device, dtype=grad.dtype)
        return grad * pdf, None, None


def baseline_loss(probs: torch.Tensor, alpha: list) -> torch.Tensor:
    """Eq. 4 the paper's way: per expert sort + SciPy CDF. probs [B, N] float32, alpha list of N floats."""
    num_tokens, num_experts = probs.shape
    total_alpha = float(sum(alpha))
    ecdf = torch.arange(1, num_tokens + 1, device=probs.device, dtype=torch.float32) / num_tokens
    loss = probs.new_zeros((), dtype=torch.float32)
    for k in range(num_experts):
        p_sorted, _ = torch.sort(probs[:, k].float())
        cdf = _ScipyBetaCDF.apply(p_sorted, alpha[k], total_alpha - alpha[k])
        loss = loss + ((ecdf - cdf) ** 2).mean()
    return loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device) -> float:
    """ms for one call. On CPU the process's CPU time (time.process_time), which other processes sharing
    the core inflate far less than wall time; on CUDA wall time between synchronizations."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    _sync(device)
    t0 = clock()
    fn()
    _sync(device)
    return (clock() - t0) * 1e3


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def bench(num_tokens: int, num_experts: int, device, dtype, repeats: int, baseline: bool, alpha_value: float):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(num_tokens, num_experts, generator=gen) * 2.0
    probs = torch.softmax(logits, -1).to(device=device, dtype=dtype).requires_grad_()
    alpha = [alpha_value] * num_experts
    alpha_t = torch.tensor(alpha, dtype=torch.float64)  # CPU: no device-to-host copy per call

    def ours():
        probs.grad = None
        dpsl_loss(probs, alpha_t).backward()

    def theirs():
        probs.grad = None
        baseline_loss(probs, alpha).backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    rss0 = _rss()
    ours()  # warm-up: builds the CDF table once per alpha
    peak = (torch.cuda.max_memory_allocated() - base_mem) if device.type == "cuda" else (_rss() - rss0)
    # Interleave ours and the baseline so both see the same machine load; ratio = median of per-pair ratios.
    t_ours, t_base = [], []
    for _ in range(repeats):
        t_ours.append(_time(ours, device))
        if baseline:
            t_base.append(_time(theirs, device))
    med_ours = statistics.median(t_ours)
    if not baseline:
        return med_ours, float("nan"), float("nan"), peak
    ratio = statistics.median(b / o for b, o in zip(t_base, t_ours))
    return med_ours, statistics.median(t_base), ratio, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only B=73728, N=16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 73728, 589824])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--alpha", type=float, default=1.0, help="symmetric prior value")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the SciPy baseline")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    grid = [(73728, 16)] if args.quick else [(b, n) for b in args.tokens for n in args.experts]

    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} alpha={args.alpha}")
    print(f"{'B':>8} {'N':>4} {'ours ms':>10} {'baseline ms':>12} {'ratio':>7} {'peak MiB':>9}")
    for num_tokens, num_experts in grid:
        t_ours, t_base, ratio, peak = bench(
            num_tokens, num_experts, device, dtype, args.repeats, not args.no_baseline, args.alpha
        )
        print(f"{num_tokens:>8} {num_experts:>4} {t_ours:>10.2f} {t_base:>12.2f} {ratio:>7.2f} {peak / 2**20:>9.1f}")


if __name__ == "__main__":
    main()
