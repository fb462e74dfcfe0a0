"""Eq. 4 loss: values and gradients against SciPy references, groups, padding, ties, NaN, errors."""

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from megatron_dpsl import beta_cdf, dpsl_loss, dpsl_loss_per_expert
from megatron_dpsl.losses.dpsl import _CHUNK, _per_expert_loss_cpu, _per_expert_loss_device
from megatron_dpsl.losses.dpsl_inputs import prepare


def _probs(num_tokens, num_experts, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g, dtype=torch.float64) * scale
    return torch.softmax(logits, -1).to(dtype)


def _ref_per_expert(probs, alpha, with_grad=False):
    """Eq. 4 for one group with SciPy (float64): per-expert loss [E] and dL/dp [T, E] (stable
    ranks)."""
    p = probs.detach().double().numpy()
    alpha = np.asarray(alpha, dtype=np.float64)
    num_tokens, num_experts = p.shape
    total = alpha.sum()
    loss = np.zeros(num_experts)
    grad = np.zeros_like(p)
    for k in range(num_experts):
        order = np.argsort(p[:, k], kind="stable")
        x = p[order, k]
        j = np.arange(1, num_tokens + 1) / num_tokens
        f = scipy.special.betainc(alpha[k], total - alpha[k], x)
        loss[k] = ((j - f) ** 2).sum() / num_tokens
        pdf = scipy.stats.beta.pdf(x, alpha[k], total - alpha[k])
        with np.errstate(invalid="ignore"):  # 0 * inf at exact 0/1 (the loss defines 0 there)
            grad[order, k] = -2.0 / num_tokens * (j - f) * pdf
    return (loss, grad) if with_grad else loss


def test_matches_scipy_reference_float64_value_and_gradient():
    probs = _probs(300, 6).requires_grad_()
    alpha = [0.3, 0.75, 1.0, 1.0, 2.0, 5.0]
    loss = dpsl_loss(probs, torch.tensor(alpha, dtype=torch.float64))
    loss.backward()
    ref_loss, ref_grad = _ref_per_expert(probs, alpha, with_grad=True)
    assert loss.dtype == torch.float64 and loss.shape == ()
    # table error <= 2e-10 per CDF value -> <= 4e-10 per expert (|d loss| <= 2 max|dF|)
    assert abs(loss.item() - ref_loss.sum()) <= 6 * 4e-10
    # the gradient is the table's derivative, within 5e-5 relative of the pdf (test_beta) -> same
    # here
    np.testing.assert_allclose(probs.grad.numpy(), ref_grad, rtol=5e-5, atol=1e-12)


def test_matches_exact_continued_fraction():
    # the fast path against the same Eq. 4 evaluated with the exact continued fraction (beta_cdf)
    probs = _probs(200, 4, seed=1, scale=4.0)  # scale 4: many probabilities in the tails
    alpha = torch.tensor([0.05, 0.5, 3.0, 40.0], dtype=torch.float64)
    x, _ = torch.sort(probs.t(), dim=-1, stable=True)
    a, b = alpha[:, None], alpha.sum() - alpha[:, None]
    j = torch.arange(1, 201, dtype=torch.float64) / 200
    exact = ((j - beta_cdf(x, a, b)) ** 2).sum(-1) / 200
    torch.testing.assert_close(
        dpsl_loss_per_expert(probs, alpha), exact, rtol=0, atol=4e-10
    )  # 2 x 2e-10
    # float32 path: the same values rounded to float32 (per-CDF error <= 5e-7 -> <= 1e-6 per expert)
    p32 = probs.float()
    x32, _ = torch.sort(p32.double().t(), dim=-1, stable=True)
    exact32 = ((j - beta_cdf(x32, a, b)) ** 2).sum(-1) / 200
    out32 = dpsl_loss_per_expert(p32, alpha)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(
        out32.double(), exact32, rtol=0, atol=2e-6
    )  # + float32 summation rounding


def test_float32_and_bfloat16_inputs():
    probs = _probs(400, 8, seed=2)
    alpha = torch.full((8,), 0.75, dtype=torch.float64)
    ref = _ref_per_expert(probs.float(), alpha.numpy()).sum()
    p32 = probs.float().requires_grad_()
    l32 = dpsl_loss(p32, alpha)
    l32.backward()
    assert l32.dtype == torch.float32 and p32.grad.dtype == torch.float32
    assert abs(l32.item() - ref) <= 1e-5  # 8 experts x (2 x 5e-7 CDF error) + float32 sums
    pbf = probs.bfloat16().requires_grad_()
    lbf = dpsl_loss(pbf, alpha)
    lbf.backward()
    assert lbf.dtype == torch.float32 and pbf.grad.dtype == torch.bfloat16
    assert abs(lbf.item() - _ref_per_expert(probs.bfloat16().float(), alpha.numpy()).sum()) <= 1e-5


def test_gradcheck_dense_groups_padding():
    probs = _probs(24, 3, seed=3).requires_grad_()
    alpha = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    alpha2 = torch.tensor([[0.5, 1.0, 3.0], [2.0, 0.3, 0.3]], dtype=torch.float64)
    gids = torch.randint(0, 2, (24,), generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(24, dtype=torch.bool)
    pad[::7] = True
    assert torch.autograd.gradcheck(lambda p: dpsl_loss(p, alpha), (probs,))
    assert torch.autograd.gradcheck(lambda p: dpsl_loss(p, alpha2, gids, pad), (probs,))
    for fn in (
        lambda p: dpsl_loss(p, alpha2, gids),
        lambda p: dpsl_loss(p, alpha, padding_mask=pad),
    ):
        assert torch.autograd.gradcheck(fn, (probs,), fast_mode=True)


def test_groups_are_sum_of_separate_losses():
    probs = _probs(600, 4, seed=4).requires_grad_()
    alpha2 = torch.tensor(
        [[1.5, 1.5, 0.5, 0.5], [0.5, 0.5, 1.5, 1.5], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64
    )
    gids = torch.randint(0, 3, (600,), generator=torch.Generator().manual_seed(1))
    loss = dpsl_loss(probs, alpha2, gids)
    loss.backward()
    grad = probs.grad.clone()
    probs.grad = None
    total = sum(dpsl_loss(probs[gids == g], alpha2[g]) for g in range(3))
    total.backward()
    torch.testing.assert_close(
        loss, total, rtol=0, atol=1e-12
    )  # same arithmetic, summation order only
    torch.testing.assert_close(grad, probs.grad, rtol=0, atol=1e-12)


def test_padding_equals_dropping_rows():
    probs = _probs(500, 4, seed=5)
    pad = torch.rand(500, generator=torch.Generator().manual_seed(2)) < 0.3
    probs_nan = probs.clone()
    probs_nan[pad] = float("nan")  # padded rows never reach the loss, not even as NaN
    for p_in in (probs, probs_nan):
        p = p_in.clone().requires_grad_()
        loss = dpsl_loss(p, [1.0] * 4, padding_mask=pad)
        loss.backward()
        kept = probs[~pad].clone().requires_grad_()
        ref = dpsl_loss(kept, [1.0] * 4)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)  # same data, same ranks
        torch.testing.assert_close(p.grad[~pad], kept.grad, rtol=0, atol=1e-12)
        assert (p.grad[pad] == 0).all()


def test_empty_group_and_all_padding_give_zero():
    probs = _probs(50, 4, seed=6).requires_grad_()
    alpha2 = torch.ones(3, 4, dtype=torch.float64)
    gids = torch.zeros(50, dtype=torch.long)  # groups 1 and 2 empty
    loss = dpsl_loss(probs, alpha2, gids)
    torch.testing.assert_close(loss, dpsl_loss(probs, alpha2[0]), rtol=0, atol=1e-14)
    all_pad = torch.ones(50, dtype=torch.bool)
    for dtype in (torch.float64, torch.float32):
        p = probs.detach().to(dtype).requires_grad_()
        loss = dpsl_loss(p, alpha2, gids, all_pad)
        loss.backward()
        assert loss.item() == 0 and torch.isfinite(p.grad).all() and (p.grad == 0).all()
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = dpsl_loss(empty, [1.0] * 4)
    loss.backward()  # an empty batch has a (zero-sized) gradient, not a crash
    assert loss.item() == 0 and empty.grad.shape == (0, 4)


def test_ties_are_deterministic_and_follow_token_order():
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(
        torch.randint(0, 3, (200, 4), generator=g).double(), -1
    ).requires_grad_()  # many ties
    alpha = [1.0] * 4
    loss1 = dpsl_loss(probs, alpha)
    (g1,) = torch.autograd.grad(loss1, probs)
    loss2 = dpsl_loss(probs, alpha)
    (g2,) = torch.autograd.grad(loss2, probs)
    assert torch.equal(loss1, loss2) and torch.equal(g1, g2)
    ref_loss, ref_grad = _ref_per_expert(probs, alpha, with_grad=True)  # ties ranked in token order
    np.testing.assert_allclose(
        g1.numpy(), ref_grad, rtol=5e-5, atol=1e-12
    )  # table derivative vs pdf
    for dtype in (torch.float32, torch.bfloat16):
        p = probs.detach().to(dtype).requires_grad_()
        (gd,) = torch.autograd.grad(dpsl_loss(p, alpha), p)
        _, ref = _ref_per_expert(p.float(), alpha, with_grad=True)
        np.testing.assert_allclose(
            gd.float().numpy(), ref, rtol=2e-2, atol=1e-6
        )  # bf16 grad rounding


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.5, -0.25])
def test_invalid_probabilities_propagate(dtype, bad):
    probs = _probs(64, 4, seed=8).to(dtype)
    probs[10, 2] = bad
    assert torch.isnan(dpsl_loss(probs, [1.0] * 4))
    gids = torch.arange(64) % 2
    assert torch.isnan(dpsl_loss(probs, torch.ones(2, 4), gids))
    assert torch.isnan(dpsl_loss_per_expert(probs, [1.0] * 4)[2])


def test_extreme_probabilities_use_tails_accurately():
    # one-hot-like routing: probabilities down to 1e-30 and up to 1 - 1e-7 exercise both tail
    # formulas
    probs = _probs(3000, 4, seed=9, scale=12.0)
    alpha = [0.2, 0.2, 0.2, 0.2]
    assert probs.min() < 1e-20 and probs.max() > 1 - 1e-6
    ref = _ref_per_expert(probs, alpha)
    torch.testing.assert_close(
        dpsl_loss_per_expert(probs, alpha), torch.from_numpy(ref), rtol=0, atol=4e-10
    )  # 2 x table error


def test_long_rows_span_several_chunks():
    # the CPU path evaluates each row's bulk (points between the table's junctions) in chunks of
    # _CHUNK
    probs = _probs(_CHUNK + _CHUNK // 2, 2, seed=10).float()
    table = prepare(probs, [1.0, 1.0]).table
    bulk = ((probs >= table.x_lo) & (probs <= table.x_hi)).sum(0)
    assert (bulk > _CHUNK).all(), (
        bulk
    )  # the test's premise: every row's bulk crosses a chunk boundary
    ref = _ref_per_expert(probs, [1.0, 1.0]).sum()
    assert abs(dpsl_loss(probs, [1.0, 1.0]).item() - ref) <= 2e-6  # 2 experts x 2 x 5e-7


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_device_path_matches_cpu_path(dtype):
    # the branch-free accelerator implementation, run here on CPU tensors, against the CPU one
    probs = _probs(300, 4, seed=11, scale=5.0).to(dtype)
    alpha2 = torch.tensor([[1.5, 1.5, 0.5, 0.5], [0.5, 0.5, 1.5, 1.5]], dtype=torch.float64)
    gids = torch.randint(0, 2, (300,), generator=torch.Generator().manual_seed(3))
    pad = torch.rand(300, generator=torch.Generator().manual_seed(4)) < 0.2
    atol = (
        1e-12 if dtype == torch.float64 else 1e-6
    )  # same tables; float32 op order and tail split differ
    for args in (
        (alpha2[0], None, None),
        (alpha2, gids, None),
        (alpha2, gids, pad),
        (alpha2[1], None, pad),
    ):
        inputs = prepare(probs, *args)
        out_cpu, grad_cpu = _per_expert_loss_cpu(probs, inputs, True)
        out_dev, grad_dev = _per_expert_loss_device(probs, inputs, True)
        torch.testing.assert_close(out_dev, out_cpu, rtol=0, atol=atol)
        torch.testing.assert_close(grad_dev, grad_cpu, rtol=1e-5, atol=atol)


def test_bad_input_names_the_argument():
    probs = _probs(10, 4)
    cases = [
        (lambda: dpsl_loss(probs[:, 0], [1.0] * 4), "probs"),
        (lambda: dpsl_loss(probs.long(), [1.0] * 4), "probs"),
        (lambda: dpsl_loss(probs, [1.0] * 3), "alpha"),
        (lambda: dpsl_loss(probs, [1.0, 1.0, 0.0, 1.0]), "alpha"),
        (lambda: dpsl_loss(probs, [1.0, float("nan"), 1.0, 1.0]), "alpha"),
        (lambda: dpsl_loss(probs, torch.ones(2, 4)), "group_ids"),
        (lambda: dpsl_loss(probs, torch.ones(2, 4), torch.zeros(9, dtype=torch.long)), "group_ids"),
        (lambda: dpsl_loss(probs, torch.ones(2, 4), torch.zeros(10)), "group_ids"),
        (lambda: dpsl_loss(probs, torch.ones(2, 4), torch.full((10,), 2)), "group_ids"),
        (lambda: dpsl_loss(probs, [1.0] * 4, padding_mask=torch.zeros(10)), "padding_mask"),
        (
            lambda: dpsl_loss(probs, [1.0] * 4, padding_mask=torch.zeros(3, dtype=torch.bool)),
            "padding_mask",
        ),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()
