"""Beta CDF: exact continued fraction (``beta_cdf``) and the tabulated fast path
(``BetaCDFTable``)."""

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from megatron_dpsl.losses.beta import BetaCDFTable, beta_cdf, beta_cdf_table, betainc_f64

A_GRID = [0.05, 0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 50.0]
B_GRID = [0.05, 0.1, 0.5, 1.0, 3.0, 15.0, 100.0, 500.0, 2000.0]
EDGES = [0.0, 1e-300, 1e-12, 1e-6, 0.5, 1 - 1e-6, 1 - 1e-12, 1.0]


def _ab():
    a, b = np.meshgrid(A_GRID, B_GRID, indexing="ij")
    return torch.tensor(a.reshape(-1, 1)), torch.tensor(b.reshape(-1, 1))  # [R, 1] each


def _points(num_rows, seed=0):
    """[R, 607] float64: uniform in x, uniform in logit(x) over [-40, 40], and the edge values."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(num_rows, 300, generator=g, dtype=torch.float64) * 80 - 40
    x = torch.rand(num_rows, 299, generator=g, dtype=torch.float64)
    edges = torch.tensor(EDGES, dtype=torch.float64).expand(num_rows, -1)
    return torch.cat([torch.sigmoid(u), x, edges], 1)


def _scipy(x, a, b):
    return torch.from_numpy(scipy.special.betainc(a.numpy(), b.numpy(), x.double().numpy()))


def test_cf_float64_accuracy_vs_scipy():
    a, b = _ab()
    x = _points(a.shape[0])
    err = (beta_cdf(x, a, b) - _scipy(x, a, b)).abs().max().item()
    assert err <= 1e-9, err  # the float64 bound (measured ~3.5e-11)


def test_cf_float32_accuracy_vs_scipy():
    a, b = _ab()
    x = _points(a.shape[0], seed=1).float()
    out = beta_cdf(x, a, b)
    assert out.dtype == torch.float32
    err = (out.double() - _scipy(x, a, b)).abs().max().item()
    assert err <= 2e-6, err  # the float32 bound (float32 output rounding ~6e-8)


def test_cf_bfloat16_input():
    a, b = _ab()
    x = _points(a.shape[0], seed=2).bfloat16()
    out = beta_cdf(x, a, b)
    assert out.dtype == torch.bfloat16
    ref = _scipy(x, a, b)
    assert (
        out.double() - ref
    ).abs().max().item() <= 4e-3  # bf16 output rounding: 2^-8 relative, |F| <= 1


def test_cf_gradient_is_pdf_and_gradcheck():
    a = torch.tensor([[0.3], [1.0], [7.0]], dtype=torch.float64)
    b = torch.tensor([[0.5, 2.0, 300.0]], dtype=torch.float64)
    x = (torch.rand(3, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: beta_cdf(t, a, b), (x,), fast_mode=True)
    (g,) = torch.autograd.grad(beta_cdf(x, a, b).sum(), x)
    pdf = scipy.stats.beta.pdf(x.detach().numpy(), a.numpy(), b.numpy())
    np.testing.assert_allclose(
        g.numpy(), pdf, rtol=1e-10, atol=0
    )  # same formula, float64 rounding only
    # broadcasting: gradient of a [3] x against [3, 3] parameters is summed back to [3]
    x1 = x.detach()[0].clone().requires_grad_()
    beta_cdf(x1, a, b).sum().backward()
    assert x1.grad.shape == (3,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cf_gradient_finite_at_endpoints(dtype):
    a = torch.tensor([0.05, 0.05, 1.0, 3.0, 50.0], dtype=torch.float64)[:, None]
    b = torch.tensor([0.05, 2000.0, 1.0, 0.5, 0.05], dtype=torch.float64)[:, None]
    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([0.0, 1.0, tiny, 0.5], dtype=dtype).expand(5, 4).clone().requires_grad_()
    beta_cdf(x, a, b).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, :2] == 0).all()  # documented: 0 at exactly x = 0 and x = 1


def test_cf_domain_and_nan():
    x = torch.tensor([-0.5, 1.5, float("nan"), float("-inf"), float("inf")], dtype=torch.float64)
    out = beta_cdf(x, 2.0, 3.0)
    assert out[0] == 0 and out[1] == 1 and torch.isnan(out[2]) and out[3] == 0 and out[4] == 1


# ------------------------------------------------------------------------------ table (the loss
# path)
def _table_rows():
    a, b = _ab()
    return a[:, 0], b[:, 0]


@pytest.fixture(scope="module")
def tables():
    a, b = _table_rows()
    return BetaCDFTable(a, b, torch.float64, "cpu"), BetaCDFTable(a, b, torch.float32, "cpu")


def test_table_float64_accuracy(tables):
    t64, _ = tables
    a, b = _table_rows()
    x = _points(a.numel(), seed=3)
    f, d = t64.evaluate(x)
    err = (f - _scipy(x, a[:, None], b[:, None])).abs().max().item()
    assert err <= 2e-10, (
        err
    )  # measured 1.03e-10 (a=5, b=500): cubic Hermite with h = 0.015 min(1, sd)
    assert torch.isfinite(d).all()


def test_table_float32_accuracy(tables):
    _, t32 = tables
    a, b = _table_rows()
    x = _points(a.numel(), seed=4).float()
    f, d = t32.evaluate(x)
    err = (f.double() - _scipy(x, a[:, None], b[:, None])).abs().max().item()
    # measured 3.5e-7: float32 rounding of the grid coordinate times the steepest dF/du (~2 at a=30,
    # b=2000)
    assert err <= 5e-7, err
    assert torch.isfinite(d).all()


def test_table_derivative_close_to_pdf(tables):
    t64, _ = tables
    a, b = _table_rows()
    x = _points(a.numel(), seed=5)[:, :599]  # interior points
    _, d = t64.evaluate(x)
    pdf = torch.from_numpy(scipy.stats.beta.pdf(x.numpy(), a[:, None].numpy(), b[:, None].numpy()))
    big = (
        (pdf > 1e-3) & (x > 0) & (x < 1)
    )  # sigmoid(40) rounds to 1.0 (derivative 0 there by design)
    rel = ((d - pdf).abs() / pdf)[big].max().item()
    assert rel <= 5e-5, rel  # the interpolant's derivative: O(h^3) relative, measured 1.3e-5


def test_table_derivative_is_derivative_of_value():
    a = torch.tensor([0.05, 1.0, 30.0], dtype=torch.float64)
    b = torch.tensor([2000.0, 15.0, 2000.0], dtype=torch.float64)
    t64 = BetaCDFTable(a, b, torch.float64, "cpu")
    g = torch.Generator().manual_seed(6)
    # points in the bulk and in both tails of every row
    x = torch.sigmoid(torch.rand(3, 200, generator=g, dtype=torch.float64) * 60 - 40)
    f, d = t64.evaluate(x)
    h = 1e-6 * torch.minimum(x, 1 - x)  # stays inside (0, 1)
    fp, _ = t64.evaluate(x + h)
    fm, _ = t64.evaluate(x - h)
    fd = (fp - fm) / (2 * h)
    # central differences of the evaluated function: truncation O(h^2) plus rounding 1e-16 / h
    torch.testing.assert_close(d, fd, rtol=1e-5, atol=1e-6)


def test_table_endpoints_and_invalid(tables):
    t64, t32 = tables
    rows = t64.num_rows
    for t, dt in ((t64, torch.float64), (t32, torch.float32)):
        x = torch.tensor([0.0, 1.0], dtype=dt).expand(rows, 2)
        f, d = t.evaluate(x)
        assert (f[:, 0] == 0).all() and (f[:, 1] == 1).all() and torch.isfinite(d).all()
        bad = torch.tensor([float("nan"), -0.1, 1.1, float("inf"), float("-inf")], dtype=dt).expand(
            rows, 5
        )
        f, _ = t.evaluate(bad)
        assert torch.isnan(f).all()  # invalid probabilities surface as NaN in the loss


def test_table_bulk_evaluator_matches_general(tables):
    t64, _ = tables
    g = torch.Generator().manual_seed(7)
    for row in (0, 17, 44, 89):
        lo, hi = t64.x_lo[row].item(), t64.x_hi[row].item()
        x = lo + (hi - lo) * torch.rand(500, generator=g, dtype=torch.float64)
        f1, d1 = t64.evaluate(x, row)
        f2, d2 = t64.evaluate_bulk(x, row)
        torch.testing.assert_close(
            f1, f2, rtol=0, atol=1e-14
        )  # same interpolant, different op order
        torch.testing.assert_close(d1, d2, rtol=1e-12, atol=0)


def test_table_cache_rebuilds_only_when_alpha_changes():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t1 = beta_cdf_table(a, 3.0 - a, torch.float32, "cpu")
    assert beta_cdf_table(a.clone(), 3.0 - a, torch.float32, "cpu") is t1
    assert beta_cdf_table(a + 0.5, 3.0 - a, torch.float32, "cpu") is not t1
    assert beta_cdf_table(a, 3.0 - a, torch.float64, "cpu") is not t1


def test_betainc_f64_matches_cf_public():
    x = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(betainc_f64(x, 2.0, 5.0), beta_cdf(x, 2.0, 5.0), rtol=0, atol=0)
