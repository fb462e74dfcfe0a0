"""Routing diagnostics against direct NumPy / SciPy computations."""

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from megatron_dpsl import metrics


def _probs(num_tokens, num_experts, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(
        torch.randn(num_tokens, num_experts, generator=g, dtype=torch.float64) * 2, -1
    ).to(dtype)


def test_expert_load_cov():
    counts = torch.tensor([1, 2, 3, 4])
    assert metrics.expert_load_cov(counts).item() == pytest.approx(
        np.std([1, 2, 3, 4]) / 2.5, rel=1e-6
    )
    routing_map = torch.zeros(6, 3, dtype=torch.bool)
    routing_map[:, 0] = True
    routing_map[:3, 1] = True
    expected = np.std([6, 3, 0]) / 3.0
    assert metrics.expert_load_cov(routing_map).item() == pytest.approx(expected, rel=1e-6)
    assert metrics.expert_load_cov(torch.full((4,), 7)).item() == 0  # balanced
    assert metrics.expert_load_cov(torch.zeros(4)).item() == 0  # no tokens: 0, not NaN
    with pytest.raises(ValueError, match="expert_load_cov"):
        metrics.expert_load_cov(torch.zeros(2, 2, 2))


def test_entropy_and_max_prob():
    p = _probs(100, 5)
    ent = -(p.numpy() * np.log(p.numpy())).sum(1).mean()
    assert metrics.routing_entropy(p).item() == pytest.approx(ent, rel=1e-12)
    assert metrics.mean_max_prob(p).item() == pytest.approx(p.numpy().max(1).mean(), rel=1e-12)
    uniform = torch.full((10, 4), 0.25)
    assert metrics.routing_entropy(uniform).item() == pytest.approx(np.log(4), rel=1e-6)
    one_hot = torch.eye(4)
    assert (
        metrics.routing_entropy(one_hot).item() == 0 and metrics.mean_max_prob(one_hot).item() == 1
    )
    assert metrics.routing_entropy(torch.zeros(0, 4)).item() == 0


def _prior_distance_scipy(probs, alpha2, gids, pad):
    """Eq. 4 per expert, float64 NumPy/SciPy: per group, drop padding, sort, compare j/n with
    betainc."""
    p, gids, pad = probs.detach().double().numpy(), gids.numpy(), pad.numpy()
    out = np.zeros(p.shape[1])
    for g, a in enumerate(np.asarray(alpha2, dtype=np.float64)):
        sel = (gids == g) & ~pad
        n = int(sel.sum())
        for k in range(p.shape[1]):
            f = scipy.special.betainc(a[k], a.sum() - a[k], np.sort(p[sel, k]))
            out[k] += ((np.arange(1, n + 1) / n - f) ** 2).sum() / n
    return out


def test_prior_distance_matches_independent_transcription():
    p = _probs(300, 4, seed=1).requires_grad_()
    alpha2 = torch.tensor([[1.5, 1.5, 0.5, 0.5], [0.5, 0.5, 1.5, 1.5]], dtype=torch.float64)
    gids = torch.arange(300) % 2
    pad = torch.arange(300) % 5 == 0
    d = metrics.prior_distance(p, alpha2, gids, pad)
    assert d.shape == (4,) and d.dtype == torch.float64 and not d.requires_grad
    # table CDF error <= 2e-10 -> each squared term within 2 x 2e-10 (|j/n - F| <= 1), 2 groups per
    # expert
    np.testing.assert_allclose(
        d.numpy(), _prior_distance_scipy(p, alpha2, gids, pad), rtol=0, atol=8e-10
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ks_distance_matches_scipy(dtype):
    p = _probs(400, 4, seed=2, dtype=dtype)
    alpha = [0.5, 1.0, 1.0, 2.0]
    ks = metrics.ks_distance(p, alpha)
    ref = [
        scipy.stats.kstest(
            p[:, k].double().numpy(), scipy.stats.beta(alpha[k], sum(alpha) - alpha[k]).cdf
        ).statistic
        for k in range(4)
    ]
    np.testing.assert_allclose(
        ks.double().numpy(), ref, atol=1e-6
    )  # table CDF error <= 5e-7 in float32


def test_ks_distance_groups_padding_nan():
    p = _probs(400, 3, seed=3)
    alpha2 = torch.tensor([[1.0, 1.0, 1.0], [0.3, 0.3, 2.0]], dtype=torch.float64)
    gids = torch.arange(400) % 2
    pad = torch.arange(400) % 7 == 0
    ks = metrics.ks_distance(p, alpha2, gids, pad)
    per_group = [metrics.ks_distance(p[(gids == g) & ~pad], alpha2[g]) for g in range(2)]
    torch.testing.assert_close(ks, torch.maximum(*per_group), rtol=0, atol=1e-12)  # worst group
    p[5, 1] = float("nan")
    out = metrics.ks_distance(p, alpha2, gids)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


def test_group_expert_usage_is_each_groups_share_of_assignments():
    # 5 tokens, top-1 over 3 experts; group 0: tokens 0-2, group 1: tokens 3-4, group 2: none
    routing_map = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 0]]).bool()
    group_ids = torch.tensor([0, 0, 0, 1, 1])
    usage = metrics.group_expert_usage(routing_map, group_ids, 3)
    want = torch.tensor([[2 / 3, 0, 1 / 3], [0, 1, 0], [0, 0, 0]])
    torch.testing.assert_close(usage, want, rtol=0, atol=1e-7)  # float32 divisions
