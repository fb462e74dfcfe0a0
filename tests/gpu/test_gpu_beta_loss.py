"""Device Beta CDF and ``dpsl_loss`` on CUDA: accuracy against SciPy, agreement with the CPU result,
and CUDA-graph capture of the loss's forward+backward (replays must equal eager).

Accuracy targets are the CPU ones (issue 3): max abs error <= 1e-9 in float64, <= 2e-6 for float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def _grid(device):
    """a in [0.05, 50], b in [0.05, 2000] (b = A - α_k reaches ~2000 at N=64, α=30), x incl.
    endpoints."""
    a = torch.tensor(np.geomspace(0.05, 50.0, 13), dtype=torch.float64)
    b = torch.tensor(np.geomspace(0.05, 2000.0, 15), dtype=torch.float64)
    x = torch.cat(
        [
            torch.tensor(
                [0.0, 1e-12, 1e-6, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-6, 1 - 1e-12, 1.0],
                dtype=torch.float64,
            ),
            torch.linspace(0.0, 1.0, 41, dtype=torch.float64),
            torch.tensor(np.geomspace(1e-10, 0.2, 20), dtype=torch.float64),
        ]
    )
    A, B, X = torch.meshgrid(a, b, x, indexing="ij")
    return X.reshape(-1).to(device), A.reshape(-1).to(device), B.reshape(-1).to(device)


def _scipy_betainc(x, a, b):
    from scipy.special import betainc

    return torch.from_numpy(betainc(a.cpu().numpy(), b.cpu().numpy(), x.cpu().numpy()))


def test_beta_cdf_cuda_vs_scipy_and_cpu():
    from megatron_dpsl import beta_cdf

    x, a, b = _grid("cuda")
    ref = _scipy_betainc(x, a, b)
    out64 = beta_cdf(x, a, b)
    assert out64.is_cuda and out64.dtype == torch.float64
    err64 = (out64.cpu() - ref).abs().max().item()
    assert err64 <= 1e-9, f"float64 max abs error vs SciPy {err64:.3g}"
    # float32 x: the input itself is rounded to float32, so compare with SciPy at the rounded x
    x32 = x.float()
    out32 = beta_cdf(x32, a, b)
    assert out32.dtype == torch.float32
    err32 = (out32.double().cpu() - _scipy_betainc(x32.double(), a, b)).abs().max().item()
    assert err32 <= 2e-6, f"float32 max abs error vs SciPy {err32:.3g}"
    # bfloat16 x: computed in float64 (<= 1e-9), rounded once to bf16: half a bf16 spacing on
    # [0.5, 1] is 2^-9 (the CPU reaches 0.0019516 of the 0.0019531 bound on this grid)
    x16 = x.bfloat16()
    out16 = beta_cdf(x16, a, b)
    assert out16.dtype == torch.bfloat16
    err16 = (out16.double().cpu() - _scipy_betainc(x16.double(), a, b)).abs().max().item()
    assert err16 <= 2.0**-9 + 1e-9, f"bfloat16 max abs error vs SciPy {err16:.3g}"
    # same algorithm on both devices; CUDA's lgamma/exp/log differ from glibc's by a few ulp, and
    # the continued fraction and exp(a*log x + ...) amplify that: 3.3e-12 seen on an H200, 3x
    # headroom
    torch.testing.assert_close(
        out64.cpu(), beta_cdf(x.cpu(), a.cpu(), b.cpu()), rtol=0.0, atol=1e-11
    )


def test_beta_cdf_cuda_gradient_is_beta_pdf():
    from scipy.stats import beta as beta_dist

    from megatron_dpsl import beta_cdf

    x, a, b = _grid("cuda")
    inside = (x > 1e-6) & (x < 1 - 1e-6)
    x, a, b = x[inside].clone().requires_grad_(), a[inside], b[inside]
    beta_cdf(x, a, b).sum().backward()
    pdf = torch.from_numpy(
        beta_dist.pdf(x.detach().cpu().numpy(), a.cpu().numpy(), b.cpu().numpy())
    )
    # log-space pdf in float64 on both sides: relative agreement to ~1e-12 except where the pdf
    # underflows; rtol 1e-9 leaves room for lgamma's ulp differences at large a, b
    torch.testing.assert_close(x.grad.cpu(), pdf, rtol=1e-9, atol=1e-300)


def _scipy_dpsl(probs: np.ndarray, alpha: np.ndarray):
    """Eq. 4 without λ and its gradient, the paper's way: sort, SciPy betainc, pdf for backward."""
    from scipy.special import betainc
    from scipy.stats import beta as beta_dist

    num_tokens, num_experts = probs.shape
    a_sum = alpha.sum()
    loss, grad = 0.0, np.zeros_like(probs)
    j = np.arange(1, num_tokens + 1) / num_tokens
    for k in range(num_experts):
        order = np.argsort(probs[:, k], kind="stable")
        p = probs[order, k]
        diff = j - betainc(alpha[k], a_sum - alpha[k], p)
        loss += (diff**2).sum() / num_tokens
        grad[order, k] = -2.0 * diff * beta_dist.pdf(p, alpha[k], a_sum - alpha[k]) / num_tokens
    return loss, grad


@pytest.mark.parametrize("num_experts,alpha_value", [(4, 1.0), (16, 0.75), (64, 30.0)])
def test_dpsl_loss_cuda_vs_scipy_and_cpu(num_experts, alpha_value):
    from megatron_dpsl import dpsl_loss

    g = torch.Generator().manual_seed(num_experts)
    probs = torch.softmax(torch.randn(2048, num_experts, generator=g, dtype=torch.float64) * 2, -1)
    alpha = torch.full((num_experts,), alpha_value, dtype=torch.float64)
    ref_loss, ref_grad = _scipy_dpsl(probs.numpy(), alpha.numpy())

    p_cuda = probs.cuda().requires_grad_()
    loss = dpsl_loss(p_cuda, alpha.cuda())
    loss.backward()
    assert loss.dtype == torch.float64
    # float64 end to end: the CDF target (1e-9 abs per term) bounds the loss error by ~2e-9 * N
    assert abs(loss.item() - ref_loss) <= 1e-9 * num_experts
    # the gradient is the derivative of the tabulated CDF (<= 1e-10 abs), not SciPy's pdf: they
    # agree norm-wise (measured on CPU: <= 3e-8) while single far-tail entries near 0 differ
    # relatively
    ref_grad = torch.from_numpy(ref_grad)
    _assert_rel_l2(p_cuda.grad.cpu(), ref_grad, 1e-6)
    assert (p_cuda.grad.cpu() - ref_grad).abs().max() <= 1e-6 * ref_grad.abs().max()

    p_cpu = probs.clone().requires_grad_()
    loss_cpu = dpsl_loss(p_cpu, alpha)
    loss_cpu.backward()
    # same table on both devices, different evaluation order (CPU: chunked, tails split): float64
    # rounding differences only
    torch.testing.assert_close(loss.cpu(), loss_cpu, rtol=1e-10, atol=1e-14)
    _assert_rel_l2(p_cuda.grad.cpu(), p_cpu.grad, 1e-10)

    # float32 and bf16 inputs (the router's probs are fp32): float32 result within 2e-6 per CDF term
    for dtype in (torch.float32, torch.bfloat16):
        p_low = probs.to(dtype)
        ref_low, _ = _scipy_dpsl(p_low.double().numpy(), alpha.numpy())
        out = dpsl_loss(p_low.cuda(), alpha.cuda())
        assert out.dtype == torch.float32
        # each squared term moves by <= 2*|diff|*2e-6 <= 4e-6; averaged over tokens, summed over N
        assert abs(out.item() - ref_low) <= 4e-6 * num_experts, (dtype, out.item(), ref_low)


def test_dpsl_loss_cuda_groups_and_padding_match_cpu():
    from megatron_dpsl import dpsl_loss

    g = torch.Generator().manual_seed(7)
    num_tokens, num_experts = 4096, 16
    probs = torch.softmax(torch.randn(num_tokens, num_experts, generator=g), -1)
    alpha = torch.rand(3, num_experts, generator=g, dtype=torch.float64) + 0.5
    group_ids = torch.randint(0, 3, (num_tokens,), generator=g)
    padding = torch.rand(num_tokens, generator=g) < 0.1
    outs = []
    for device in ("cpu", "cuda"):
        # a fresh leaf per device: probs.to("cpu") is probs itself, so requires_grad_() on it would
        # make the CUDA copy a non-leaf without .grad
        p = probs.detach().clone().to(device).requires_grad_()
        loss = dpsl_loss(
            p, alpha.to(device), group_ids=group_ids.to(device), padding_mask=padding.to(device)
        )
        loss.backward()
        outs.append((loss.detach().cpu(), p.grad.cpu()))
    # float32 sums over 4096 tokens in different orders on the two devices: ~1e-6 relative
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-7)
    _assert_rel_l2(outs[1][1], outs[0][1], 1e-5)
    assert (outs[1][1][padding] == 0).all(), "padding tokens must get no gradient"


def _assert_rel_l2(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    rel = ((actual - expected).norm() / expected.norm()).item()
    assert rel <= tol, f"relative L2 difference {rel:.3g} > {tol:g}"


def _graph_capture(fn, static_inputs, warmup: int = 3):
    """Capture ``fn(*static_inputs)`` (which must return tensors) into a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):  # warm-up on a side stream, as torch.cuda.graphs requires
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_inputs)
    return graph, static_out


# alpha on the CPU: the documented sync-free way (dpsl_loss caches its CDF table by alpha's values,
# read on the host; a CUDA alpha costs a device-to-host copy, which capture refuses)
@pytest.mark.parametrize("variant", ["plain", "padding", "groups"])
def test_dpsl_loss_cuda_graph_replay_equals_eager(variant):
    from megatron_dpsl import dpsl_loss

    num_tokens, num_experts = 8192, 16
    g = torch.Generator(device="cuda").manual_seed(11)
    alpha = torch.full((num_experts,), 1.0)
    group_ids = padding = None
    if variant == "groups":
        alpha = torch.tensor([[2.0] * 8 + [1.0] * 8, [1.0] * 8 + [2.0] * 8])
        group_ids = torch.randint(0, 2, (num_tokens,), device="cuda", generator=g)
    if variant == "padding":
        padding = torch.rand(num_tokens, device="cuda", generator=g) < 0.2

    def fwd_bwd(probs, gids, pad):
        p = probs.detach().requires_grad_()
        loss = dpsl_loss(p, alpha, group_ids=gids, padding_mask=pad)
        (grad,) = torch.autograd.grad(loss, p)
        return loss, grad

    def sample():
        return torch.softmax(
            torch.randn(num_tokens, num_experts, device="cuda", generator=g) * 2, -1
        )

    static_probs = sample()
    static_gids = group_ids.clone() if group_ids is not None else None
    static_pad = padding.clone() if padding is not None else None
    graph, (static_loss, static_grad) = _graph_capture(
        fwd_bwd, (static_probs, static_gids, static_pad)
    )
    for _ in range(
        3
    ):  # fresh inputs each replay: the graph must compute the function, not a constant
        probs = sample()
        if static_gids is not None:
            static_gids.copy_(torch.randint(0, 2, (num_tokens,), device="cuda", generator=g))
        if static_pad is not None:
            static_pad.copy_(torch.rand(num_tokens, device="cuda", generator=g) < 0.2)
        static_probs.copy_(probs)
        static_loss.fill_(float("nan"))  # poison: replay must write every output
        static_grad.fill_(float("nan"))
        graph.replay()
        eager_loss, eager_grad = fwd_bwd(probs, static_gids, static_pad)
        # same kernels on the same data; the tolerance only absorbs reduction-order differences
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(static_grad, eager_grad, rtol=1e-6, atol=1e-9)


def test_dpsl_loss_make_graphed_callables_equals_eager():
    from megatron_dpsl import dpsl_loss

    num_tokens, num_experts = 8192, 16

    class DPSL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = torch.full(
                (num_experts,), 0.75
            )  # on the CPU: the documented sync-free way

        def forward(self, probs):
            return dpsl_loss(probs, self.alpha).reshape(1)

    g = torch.Generator(device="cuda").manual_seed(5)

    def sample():
        logits = torch.randn(num_tokens, num_experts, device="cuda", generator=g)
        return torch.softmax(logits * 2, -1).requires_grad_()

    module = DPSL()
    graphed = torch.cuda.make_graphed_callables(module, (sample(),))
    for _ in range(3):
        p = sample()
        loss = graphed(p)
        loss.sum().backward()
        p_eager = p.detach().clone().requires_grad_()
        loss_eager = module(p_eager)
        loss_eager.sum().backward()
        # same kernels on the same data; the tolerance only absorbs reduction-order differences
        torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(p.grad, p_eager.grad, rtol=1e-6, atol=1e-9)
