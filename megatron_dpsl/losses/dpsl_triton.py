"""The DPSL loss on accelerators at the cost of one sort: the work after the sort fused into Triton
kernels. Shape legend: B tokens, E experts, G token groups (the kernels call B ``T``).

Same math and the same exact gradient as ``dpsl.py``'s torch path (tested equal under Triton's
interpreter, ``tests/unit/losses/test_dpsl_triton.py``); float32 compute, for
float32/bfloat16/float16 ``probs``.

Per call (``probs`` ``[B, E]``, G groups; no host sync, fixed shapes, CUDA-graph capturable):
  1. ``probs.t().contiguous()`` ``[E, B]`` and ONE ``torch.sort(dim=-1, stable=True)`` in the input
     dtype (bf16 sorts 16-bit keys: fewer radix passes than the fp32 sort floor). Groups cost no
     extra sort: each (group, expert) row is a subsequence of the expert's value-sorted row, so a
     token's rank in its group is the number of same-group tokens before it there (ties keep token
     order, as the torch path).
  2. groups/padding only: ``_count_kernel`` gathers each sorted token's group (padding = group G)
     into ``[E, B]`` int32 and counts groups per span of every expert row ``[E, S, G1]``.
  3. ``_eval_kernel``, one program per span of an expert row: the rank j (position + 1, or the
     span's prefix count + an in-block cumsum per group), the Beta CDF by the table's cubic Hermite
     in logit space with the analytic tails (the formulas of ``BetaCDFTable.evaluate``, constants
     and coefficients packed ``[R, 16]`` / ``[M, 4]``), the residual j/n - F, the loss partial per
     program, and dL/dp = -(2/n)(j/n - F) F' scattered straight to the token layout ``[B, E]``
     through the sort index.
  4. ``partials.sum()`` (deterministic: no atomics). Backward: one multiply by the incoming
     gradient.
  Out-of-range group ids: the group counts miss tokens, the loss is NaN and ``torch._assert_async``
  raises (a device-side assert, like the torch path).

Why Triton kernels and not ``torch.compile`` of the chain (no GPU was available when this was
written: the reasoning and the CPU-side measurements are in docs/performance.md): the post-sort work
is one pass over ``[E, B]`` that gathers 4 Hermite coefficients, evaluates two tails, reduces per
expert and scatters through the permutation: by hand, 1 kernel (2 with groups, whose ranks need no
second sort), no intermediate tensors, registers checked offline for sm_90 (76, no spills).
``torch.compile`` of the same chain (inductor, CPU) also fused it, but compiled for 22 s at the
first call and 8 s again for every new B (or pays for dynamic shapes), and still needs the torch
path's extra sort for groups. The kernel source runs on CPU tensors under Triton's interpreter, so
CI checks the GPU code's math without a GPU.

Accuracy: the interpolant (all points between the table's junctions) uses only * + floor and a log:
the torch path's figures hold. ``tl.exp`` on NVIDIA is ``ex2.approx`` of z log2(e), used only in the
tails: ~2^-22 + |z| 2^-24 relative on the tail's x^a (1-x)^b / B, i.e. <= ~3e-7 abs on F for alpha
>= 0.05, <= ~7e-7 for alpha = 0.001 (tests/gpu/test_gpu_fused_loss.py bounds the fused loss against
SciPy).

Selection (``loss.dpsl_loss(..., impl=...)`` or the ``MEGATRON_DPSL_LOSS_IMPL`` environment
variable): ``auto`` (default) = this path for CUDA tensors of float32/bf16/fp16 when Triton imports,
else torch; ``triton`` forces it (CPU tensors run under Triton's interpreter: tests); ``torch`` the
torch path.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from megatron_dpsl.losses.beta import BetaCDFTable

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs no Triton
    triton = None

_NUM_CONSTS = 16  # per-row constants, padded from 14 to 16 floats
_CONST_NAMES = (  # BetaCDFTable.rows, in the order the kernel reads them
    "a",
    "b",
    "log_beta",
    "inv_a",
    "inv_b",
    "q1",
    "q12",
    "r1",
    "r12",
    "k_c",
    "inv_h",
    "s_lo",
    "s_hi",
    "offset",
)
_BLOCK = 1024  # elements per loop step of a program without groups (8 warps: 4 per thread)
_PROGRAMS_PER_SM = 4
_TINY = torch.finfo(torch.float32).tiny  # the pdf's denominator floor


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: CUDA (compiled), or the CPU under Triton's
    interpreter (TRITON_INTERPRET=1 set before Triton is imported, as tests/conftest.py does on
    CPU-only machines)."""
    if triton is None:
        return False
    if device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(_eval_kernel, InterpretedFunction)
    return device.type == "cuda"


if triton is not None:

    @triton.jit
    def _count_kernel(
        idx_ptr,
        gid_ptr,
        pad_ptr,
        group_ptr,
        counts_ptr,
        T,
        S,
        span,
        num_groups,
        HAS_GID: tl.constexpr,
        HAS_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
        G1P: tl.constexpr,
    ):
        """Program (k, s): group of every token of span s of expert row k (sorted order) and their
        counts."""
        k = tl.program_id(0)
        s = tl.program_id(1)
        start = s * span
        end = tl.minimum(start + span, T)
        goff = tl.arange(0, G1P)
        acc = tl.zeros([G1P], dtype=tl.int32)
        for off in range(start, end, BLOCK):
            pos = off + tl.arange(0, BLOCK)
            m = pos < end
            tok = tl.load(idx_ptr + k * T + pos, mask=m, other=0)
            g = tl.zeros([BLOCK], dtype=tl.int32)
            bad = g < 0
            if HAS_GID:
                graw = tl.load(gid_ptr + tok, mask=m, other=0)
                bad = (graw < 0) | (
                    graw >= num_groups
                )  # checked before padding, as the torch path does
                g = graw.to(tl.int32)
            if HAS_PAD:
                g = tl.where(tl.load(pad_ptr + tok, mask=m, other=0) != 0, num_groups, g)
            g = tl.where(
                bad, -1, g
            )  # counted nowhere: the totals then miss tokens (loss NaN + assert)
            tl.store(group_ptr + k * T + pos, g, mask=m)
            acc += tl.sum(((g[:, None] == goff[None, :]) & m[:, None]).to(tl.int32), axis=0)
        tl.store(counts_ptr + (k * S + s) * G1P + goff, acc)

    @triton.jit
    def _group_totals(counts_ptr, k, s, S, num_groups, G1P: tl.constexpr, SP: tl.constexpr):
        """From ``_count_kernel``'s per-span counts of expert row k: tokens of each group before
        span s (``run``), 1/n_g per group (0 for padding and empty groups) and whether every token
        was counted (False if a group id was out of range)."""
        goff = tl.arange(0, G1P)
        soff = tl.arange(0, SP)
        tile = tl.load(
            counts_ptr + (k * S + soff[:, None]) * G1P + goff[None, :],
            mask=soff[:, None] < S,
            other=0,
        )
        run = tl.sum(tl.where(soff[:, None] < s, tile, 0), axis=0)
        total = tl.sum(tile, axis=0)
        inv_n = tl.where(
            (goff < num_groups) & (total > 0), 1.0 / tl.maximum(total, 1).to(tl.float32), 0.0
        )
        return run, inv_n, total

    @triton.jit
    def _group_ranks(g, m, run, inv_n, G1P: tl.constexpr):
        """One block of sorted tokens with groups ``g``: each token's rank j within its group, its
        weight 1/n_g (0: padding, bad id, masked) and the running counts after the block."""
        goff = tl.arange(0, G1P)
        onehot = (g[:, None] == goff[None, :]) & m[:, None]
        cnt = onehot.to(tl.int32)
        j = tl.sum(tl.where(onehot, tl.cumsum(cnt, axis=0) + run[None, :], 0), axis=1)
        w = tl.sum(tl.where(onehot, inv_n[None, :], 0.0), axis=1)
        return j.to(tl.float32), w, run + tl.sum(cnt, axis=0)

    @triton.jit
    def _beta_cdf(x, consts_ptr, coefs_ptr, roff, tiny, NEED_GRAD: tl.constexpr):
        """I_x(a, b) of one block and, with NEED_GRAD, its derivative (else 0): the formulas of
        ``BetaCDFTable.evaluate`` (beta.py) in float32, row constants at ``consts_ptr + roff``."""
        c_a = tl.load(consts_ptr + roff + 0)
        c_b = tl.load(consts_ptr + roff + 1)
        y = 1.0 - x
        lx = tl.log(x)
        # log1p(-x), accurate for tiny x (Goldberg)
        l1x = tl.where(y == 1.0, -x, tl.log(y) * (-x / (y - 1.0)))
        s_lo = tl.load(consts_ptr + roff + 11)
        s_hi = tl.load(consts_ptr + roff + 12)
        inv_h = tl.load(consts_ptr + roff + 10)
        sg = tl.log(x / y * tl.load(consts_ptr + roff + 9)) * inv_h  # grid coordinate
        in_grid = sg >= s_lo  # False below the grid and for NaN (-> lower tail, NaN stays)
        in_hi = sg > s_hi
        sc = tl.minimum(tl.where(in_grid, sg, s_lo), s_hi)
        cell = tl.minimum(tl.floor(sc), s_hi - 1.0)
        t = sc - cell
        ci = (cell + tl.load(consts_ptr + roff + 13)).to(tl.int32) * 4
        c0 = tl.load(coefs_ptr + ci + 0)
        c1 = tl.load(coefs_ptr + ci + 1)
        c2 = tl.load(coefs_ptr + ci + 2)
        c3 = tl.load(coefs_ptr + ci + 3)
        e = tl.exp(c_a * lx + c_b * l1x - tl.load(consts_ptr + roff + 2))
        q1 = tl.load(consts_ptr + roff + 5)
        q12 = tl.load(consts_ptr + roff + 6)
        r1 = tl.load(consts_ptr + roff + 7)
        r12 = tl.load(consts_ptr + roff + 8)
        inv_a = tl.load(consts_ptr + roff + 3)
        inv_b = tl.load(consts_ptr + roff + 4)
        ser_lo = 1.0 + x * (q1 + q12 * x)
        ser_hi = 1.0 + y * (r1 + r12 * y)
        f_mid = c0 + t * (c1 + t * (c2 + t * c3))
        f = tl.where(in_grid, tl.where(in_hi, 1.0 - e * inv_b * ser_hi, f_mid), e * inv_a * ser_lo)
        d = f * 0.0
        if NEED_GRAD:
            xy = x * y
            d_mid = (c1 + 2.0 * t * (c2 + 1.5 * t * c3)) * inv_h / xy
            pdf = e / tl.maximum(xy, tiny)
            slope = c_a * y - c_b * x
            d_lo = ((q1 + 2.0 * q12 * x) * xy + slope * ser_lo) * pdf * inv_a
            d_hi = ((r1 + 2.0 * r12 * y) * xy - slope * ser_hi) * pdf * inv_b
            d = tl.where(in_grid, tl.where(in_hi, d_hi, d_mid), d_lo)
        return f, d

    @triton.jit
    def _eval_kernel(
        vals_ptr,
        idx_ptr,
        group_ptr,
        counts_ptr,
        consts_ptr,
        coefs_ptr,
        grad_ptr,
        partial_ptr,
        ok_ptr,
        T,
        E,
        S,
        span,
        num_groups,
        tiny,
        HAS_GROUPS: tl.constexpr,
        NEED_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
        G1P: tl.constexpr,
        SP: tl.constexpr,
        NC: tl.constexpr,
    ):
        """Program (k, s): Eq. 4 terms and dL/dp of span s of expert row k; one loss partial per
        program."""
        k = tl.program_id(0)
        s = tl.program_id(1)
        end = tl.minimum(s * span + span, T)
        run = tl.zeros([G1P], dtype=tl.int32)  # tokens of each group before the current block
        inv_n = tl.zeros([G1P], dtype=tl.float32)
        ok = True
        if HAS_GROUPS:
            run, inv_n, total = _group_totals(counts_ptr, k, s, S, num_groups, G1P, SP)
            ok = tl.sum(total, axis=0) == T  # False if any group id was out of range
            tl.store(ok_ptr, ok.to(tl.int32))  # every program stores the same value
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(s * span, end, BLOCK):
            pos = off + tl.arange(0, BLOCK)
            m = pos < end
            x = tl.load(vals_ptr + k * T + pos, mask=m, other=0.5).to(tl.float32)
            if HAS_GROUPS:
                g = tl.load(group_ptr + k * T + pos, mask=m, other=-1)
                j, w, run = _group_ranks(g, m, run, inv_n, G1P)
                roff = (tl.minimum(tl.maximum(g, 0), num_groups - 1) * E + k) * NC
                valid = w > 0.0
            else:
                j = (pos + 1).to(tl.float32)
                w = 1.0 / T
                roff = k * NC
                valid = m
            f, d = _beta_cdf(x, consts_ptr, coefs_ptr, roff, tiny, NEED_GRAD)
            diff = j * w - f
            acc += tl.where(valid, diff * diff * w, 0.0)  # padding never NaN
            if NEED_GRAD:
                tok = tl.load(idx_ptr + k * T + pos, mask=m, other=0)
                tl.store(grad_ptr + tok * E + k, tl.where(valid, -2.0 * diff * d * w, 0.0), mask=m)
        total_loss = tl.sum(acc, axis=0)
        if HAS_GROUPS:
            total_loss = tl.where(ok, total_loss, float("nan"))
        tl.store(partial_ptr + k * S + s, total_loss)


# A bounded memo keyed on immutable tables (cached per alpha themselves), not state.
@functools.lru_cache(maxsize=16)
def _packed(table: BetaCDFTable):
    """The table's per-row constants ``[R, 16]`` and Hermite coefficients ``[M, 4]``, float32, on
    its device."""
    consts = torch.zeros(table.num_rows, _NUM_CONSTS, dtype=torch.float32, device=table.device)
    consts[:, : len(_CONST_NAMES)] = torch.stack([table.rows[n].float() for n in _CONST_NAMES], 1)
    coefs = torch.stack([table.c0, table.c1, table.c2, table.c3], 1).float().contiguous()
    return consts, coefs


@functools.cache
def _launch_shape(device: torch.device, num_experts: int, g1p: int):
    """(block, spans per expert row, warps). CUDA: ~4 programs per SM; 4 elements per thread without
    groups, 2 x G1P one-hot entries with them (sm_90 builds: 76 / ~120 registers, no spills). CPU
    (the interpreter, i.e. tests): small blocks and 3 spans, so test-sized batches run the loops,
    prefixes and partial
        blocks."""
    if device.type != "cuda":
        return 32, 3, 4
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    block = _BLOCK if g1p == 1 else max(16, 2 * _BLOCK // g1p)
    return block, max(1, _PROGRAMS_PER_SM * num_sms // num_experts), 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` on the host: 0.15 µs per call here vs 2 µs for Triton 3.9's
    constexpr function."""
    return 1 << max(n - 1, 0).bit_length()


def loss_and_grad(
    probs,
    table: BetaCDFTable,
    num_groups: int,
    group_ids,
    padding_mask,
    need_grad: bool,
    reduce: bool,
):
    """The DPSL loss and dL/dp with the kernels. ``probs`` ``[B, E]`` float32/bf16/fp16 (B >= 1) on
    a CUDA device, or on the CPU (interpreter). Returns (loss: scalar if ``reduce`` else ``[E]``,
    float32; dL/dp ``[B, E]`` float32 or None)."""
    num_tokens, num_experts = probs.shape
    dev = probs.device
    has_groups = padding_mask is not None or (group_ids is not None and num_groups > 1)
    g1p = _next_pow2(num_groups + 1) if has_groups else 1
    block, spans, num_warps = _launch_shape(dev, num_experts, g1p)
    span = _cdiv(_cdiv(num_tokens, min(spans, _cdiv(num_tokens, block))), block) * block
    num_spans = _cdiv(num_tokens, span)
    consts, coefs = _packed(table)

    vals, idx = torch.sort(probs.detach().t().contiguous(), dim=-1, stable=True)  # [E, B] each
    grad = (
        torch.empty(num_tokens, num_experts, dtype=torch.float32, device=dev) if need_grad else None
    )
    partials = torch.empty(num_experts, num_spans, dtype=torch.float32, device=dev)
    grid = (num_experts, num_spans)
    group = counts = ok = None
    if has_groups:
        group, counts, ok = _count_groups(
            idx, group_ids, padding_mask, num_groups, span, num_spans, (block, g1p, num_warps)
        )
    _eval_kernel[grid](
        vals,
        idx,
        group if has_groups else idx,
        counts if has_groups else idx,
        consts,
        coefs,
        grad if need_grad else partials,
        partials,
        ok if has_groups else partials,
        num_tokens,
        num_experts,
        num_spans,
        span,
        num_groups,
        _TINY,
        HAS_GROUPS=has_groups,
        NEED_GRAD=need_grad,
        BLOCK=block,
        G1P=g1p,
        SP=_next_pow2(num_spans),
        NC=_NUM_CONSTS,
        num_warps=num_warps,
    )
    if has_groups:
        torch._assert_async(ok, "dpsl_loss: group_ids out of range [0, num_groups)")
    return (partials.sum() if reduce else partials.sum(1)), grad


def _count_groups(idx, group_ids, padding_mask, num_groups: int, span: int, num_spans: int, shape):
    """``_count_kernel``: each sorted point's group ``[E, B]`` int32 (padding = ``num_groups``),
    group counts per span ``[E, S, G1]`` and the range flag ``ok`` (0-dim int32)."""
    block, g1p, num_warps = shape
    num_experts, num_tokens = idx.shape
    dev = idx.device
    group = torch.empty(num_experts, num_tokens, dtype=torch.int32, device=dev)
    counts = torch.empty(num_experts, num_spans, g1p, dtype=torch.int32, device=dev)
    ok = torch.empty((), dtype=torch.int32, device=dev)
    gid = group_ids.to(dev) if group_ids is not None else None
    pad = padding_mask.to(dev) if padding_mask is not None else None
    _count_kernel[(num_experts, num_spans)](
        idx,
        gid if gid is not None else idx,
        pad if pad is not None else idx,
        group,
        counts,
        num_tokens,
        num_spans,
        span,
        num_groups,
        HAS_GID=gid is not None,
        HAS_PAD=pad is not None,
        BLOCK=block,
        G1P=g1p,
        num_warps=num_warps,
    )
    return group, counts, ok


class FusedDPSL(torch.autograd.Function):
    """probs ``[B, E]`` -> the DPSL loss (scalar, or ``[E]`` per expert); the forward forms dL/dp,
    the backward scales it."""

    @staticmethod
    def forward(
        ctx, probs, table, num_groups, group_ids, padding_mask, reduce: bool, need_grad: bool
    ):
        need_grad = need_grad and probs.requires_grad
        out, grad = loss_and_grad(
            probs, table, num_groups, group_ids, padding_mask, need_grad, reduce
        )
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.in_dtype, ctx.reduce = probs.dtype, reduce
        return out

    @staticmethod
    @once_differentiable  # the saved dL/dp is a constant: no double backward
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        scale = grad_out.to(grad.dtype) if ctx.reduce else grad_out.to(grad.dtype)[None, :]
        out = torch.empty(grad.shape, dtype=ctx.in_dtype, device=grad.device)
        return torch.mul(grad, scale, out=out), None, None, None, None, None, None
