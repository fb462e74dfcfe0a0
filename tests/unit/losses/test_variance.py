"""The variance loss math (megatron_dpsl.losses.variance) against independent NumPy float64
transcriptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_dpsl.losses.variance import (
    sharpness_loss_from_sums,
    sharpness_sums,
    variance_loss,
    variance_loss_from_sums,
    variance_loss_reference_code,
    variance_sums,
)


def topk_probs(num_tokens, num_experts, k, seed=0, dtype=torch.float64):
    """Post-top-k scores as TopKRouter returns them: softmax over the k largest logits, zeros
    elsewhere."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g, dtype=dtype) * 2
    top, idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(1, idx, torch.softmax(top, dim=-1)), logits


def eq7_numpy(s: np.ndarray, valid: np.ndarray) -> float:
    """Eq. 7 as printed, L_v = -Σ_i Σ_j (1/n)(s_ij - s̄_j)², over the valid rows, then / N (our
    normalisation)."""
    s = s[valid]
    n_tokens, n_experts = s.shape
    total = 0.0
    for j in range(n_experts):
        mean_j = sum(s[i, j] for i in range(n_tokens)) / n_tokens
        total += sum((s[i, j] - mean_j) ** 2 for i in range(n_tokens)) / n_experts
    return -total / n_tokens


@pytest.mark.parametrize("padding", [False, True])
def test_paper_form_is_eq7_over_tokens(padding):
    probs, _ = topk_probs(37, 8, 2, seed=1)
    pad = torch.rand(37, generator=torch.Generator().manual_seed(2)) < 0.3 if padding else None
    valid = np.ones(37, bool) if pad is None else ~pad.numpy()
    expected = eq7_numpy(probs.numpy(), valid)
    got = variance_loss_from_sums(variance_sums(probs, pad)).item()
    # float64 one-pass moments vs a two-pass float64 sum: rounding only
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert expected < 0  # Eq. 7 rewards spread: the loss is minus a variance
    assert variance_loss(probs.float(), pad).dtype == torch.float32


def test_padding_rows_do_not_matter():
    probs, _ = topk_probs(20, 4, 2, seed=3)
    pad = torch.zeros(20, dtype=torch.bool)
    pad[::3] = True
    changed = probs.clone()
    changed[pad] = torch.rand(int(pad.sum()), 4, dtype=torch.float64)
    assert variance_loss(probs, pad).item() == variance_loss(changed, pad).item()
    assert variance_loss(probs, pad).item() != variance_loss(probs).item()


def test_sums_of_shards_equal_the_unsharded_loss():
    probs, _ = topk_probs(30, 6, 3, seed=4)
    pad = torch.arange(30) % 7 == 0
    whole = variance_loss_from_sums(variance_sums(probs, pad))
    parts = sum(
        variance_sums(p, m) for p, m in zip(probs.split([7, 13, 10]), pad.split([7, 13, 10]))
    )
    # the same float64 sums in another order
    assert variance_loss_from_sums(parts).item() == pytest.approx(whole.item(), rel=1e-13)


def test_gradient_is_the_centred_score():
    # dL/ds_ij = -2 (s_ij - s̄_j) / (n N): the s̄ terms cancel (Σ_i (s_ij - s̄_j) = 0)
    probs, _ = topk_probs(25, 5, 2, seed=5)
    probs.requires_grad_(True)
    variance_loss_from_sums(variance_sums(probs)).backward()
    p = probs.detach()
    expected = -2 * (p - p.mean(0)) / (5 * 25)
    torch.testing.assert_close(probs.grad, expected, rtol=1e-10, atol=1e-14)


def test_gradcheck_both_forms_with_padding():
    probs, logits = topk_probs(9, 4, 2, seed=6)
    pad = torch.tensor([0, 1, 0, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda s: variance_loss_from_sums(variance_sums(s, pad)), (probs.requires_grad_(),)
    )
    # float64 logits keep the softmax in float64 (router logits are fp32 and stay fp32)
    assert torch.autograd.gradcheck(
        lambda x: sharpness_loss_from_sums(sharpness_sums(x, pad)), (logits.requires_grad_(),)
    )


def test_reference_code_form_is_the_official_expression():
    _, logits = topk_probs(16, 8, 2, seed=7, dtype=torch.float32)
    # modeling_deepseek.py: variance_loss = torch.var(logits.softmax(dim=-1), dim=-1).mean(); total
    # -= it
    scores = np.exp(logits.numpy().astype(np.float64))
    scores /= scores.sum(-1, keepdims=True)
    expected = -np.var(scores, axis=-1, ddof=1).mean()
    assert variance_loss_reference_code(logits).item() == pytest.approx(expected, rel=1e-5)
    pad = torch.arange(16) >= 12
    expected_pad = -np.var(scores[:12], axis=-1, ddof=1).mean()
    assert variance_loss_reference_code(logits, pad).item() == pytest.approx(expected_pad, rel=1e-5)


def test_empty_batch_gives_zero_and_zero_gradient():
    probs, logits = topk_probs(5, 4, 2, seed=8)
    pad = torch.ones(5, dtype=torch.bool)
    probs.requires_grad_(True)
    loss = variance_loss_from_sums(variance_sums(probs, pad))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(probs.grad) == 0
    assert variance_loss_reference_code(logits, pad).item() == 0.0


def test_one_expert_reference_code_is_an_error():
    with pytest.raises(ValueError, match=">= 2 experts"):
        sharpness_sums(torch.zeros(3, 1))
