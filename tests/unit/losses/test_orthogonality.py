"""The orthogonality loss math (megatron_dpsl.losses.orthogonality) against independent NumPy
float64 transcriptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_dpsl.losses.orthogonality import (
    EPS,
    gram,
    orthogonality_loss,
    orthogonality_sum,
    span_projection_sum,
)


def outputs(num_tokens, k, hidden, seed=0, dtype=torch.float64):
    return torch.randn(
        num_tokens, k, hidden, generator=torch.Generator().manual_seed(seed), dtype=dtype
    )


def eq6_numpy(x: np.ndarray, valid: np.ndarray, eps: float = EPS) -> float:
    """Eq. 6 as printed: Σ_i Σ_j Σ_{k≠j} ‖(⟨x_ij, x_ik⟩ / (⟨x_ik, x_ik⟩ + ε)) x_ik‖², over valid
    tokens, / (k·N)."""
    x = x[valid]
    n_tokens, k, _ = x.shape
    total = 0.0
    for i in range(n_tokens):
        for j in range(k):
            for m in range(k):
                if m != j:
                    proj = (x[i, j] @ x[i, m]) / (x[i, m] @ x[i, m] + eps) * x[i, m]
                    total += proj @ proj
    return total / (k * n_tokens)


def reference_code_numpy(x: np.ndarray, valid: np.ndarray) -> float:
    """modeling_deepseek.py's compute_ortho_loss, transcribed to NumPy (token-major groups [N, k,
    h])."""
    x = x[valid]
    n_tokens, k, _ = x.shape
    total = 0.0
    for i in range(k):
        others = np.concatenate([x[:, :i], x[:, i + 1 :]], axis=1)
        basis = []
        for j in range(others.shape[1]):
            v = others[:, j]
            for u in basis:
                v = v - (u * v).sum(-1, keepdims=True) * u
            v = v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)
            basis.append(v)
        for u in basis:
            proj = (u * x[:, i]).sum(-1, keepdims=True) * u
            total += (proj**2).sum()
    return total / (k * n_tokens)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("padding", [False, True])
def test_paper_form_is_eq6(k, padding):
    x = outputs(11, k, 6, seed=k)
    pad = torch.arange(11) % 4 == 1 if padding else None
    valid = np.ones(11, bool) if pad is None else ~pad.numpy()
    # float64 throughout: the Gram-matrix route and the literal loops differ by rounding only
    assert orthogonality_loss(x, pad).item() == pytest.approx(eq6_numpy(x.numpy(), valid), rel=1e-6)
    assert orthogonality_sum(x, pad).item() == pytest.approx(
        eq6_numpy(x.numpy(), valid) * k * valid.sum(), rel=1e-12
    )


@pytest.mark.parametrize("k", [2, 3, 5])
def test_reference_code_form_is_the_official_gram_schmidt(k):
    x = outputs(9, k, 7, seed=10 + k)
    pad = torch.tensor([False] * 7 + [True] * 2)
    expected = reference_code_numpy(x.numpy(), ~pad.numpy())
    assert orthogonality_loss(x, pad, form="reference_code").item() == pytest.approx(
        expected, rel=1e-6
    )
    # the span projection is at least the largest single projection and at most the output itself
    assert span_projection_sum(x).item() <= (x**2).sum().item()


def test_forms_agree_for_two_experts_and_differ_for_more():
    x2 = outputs(20, 2, 8, seed=3)
    # k = 2: one projection per output in both; they differ only in where ε enters (1e-6 of |x|² ~
    # 8)
    torch.testing.assert_close(
        orthogonality_loss(x2), orthogonality_loss(x2, form="reference_code"), rtol=1e-5, atol=0
    )
    x3 = outputs(20, 3, 8, seed=3)
    # k = 3: Σ of pairwise projections ≠ projection onto the span of the other two
    assert (
        abs(orthogonality_loss(x3).item() - orthogonality_loss(x3, form="reference_code").item())
        > 1e-3
    )


def test_orthogonal_outputs_cost_nothing_and_parallel_ones_cost_their_norm():
    eye = torch.eye(4, dtype=torch.float64)
    ortho = torch.stack([eye[:3], 2 * eye[1:4]])  # [2 tokens, 3 experts, 4]
    assert orthogonality_loss(ortho).item() == 0.0
    a = outputs(5, 1, 6, seed=4)
    parallel = torch.cat([a, -3 * a], dim=1)  # each projects fully onto the other
    expected = ((a**2).sum() + (9 * a**2).sum()).item()
    assert orthogonality_sum(parallel, eps=0.0).item() == pytest.approx(expected, rel=1e-12)


def test_zero_slot_contributes_nothing_and_has_finite_gradients():
    # a dropped expert leaves a zero slot: it must neither count nor produce inf/nan gradients
    x = outputs(6, 3, 5, seed=5)
    x[2, 1] = 0.0
    x.requires_grad_(True)
    for form in ("paper", "reference_code"):
        x.grad = None
        orthogonality_loss(x, form=form).backward()
        assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad) > 0, form
    x = x.detach()
    # token 2's terms are those of its two remaining experts; the other tokens keep all three
    expected = orthogonality_sum(torch.cat([x[:2], x[3:]])) + orthogonality_sum(x[2:3, [0, 2]])
    assert orthogonality_sum(x).item() == pytest.approx(expected.item(), rel=1e-12)


def test_gradcheck_both_forms():
    x = outputs(4, 3, 5, seed=6).requires_grad_(True)
    pad = torch.tensor([False, True, False, False])
    assert torch.autograd.gradcheck(lambda t: orthogonality_sum(t, pad), (x,))
    assert torch.autograd.gradcheck(lambda t: span_projection_sum(t, pad), (x,))


def test_half_precision_gram_accumulates_in_fp32():
    x = outputs(8, 2, 64, seed=7, dtype=torch.float32).to(torch.bfloat16)
    expected = torch.bmm(x.float(), x.float().transpose(1, 2)).double()
    assert torch.equal(gram(x), expected)
    assert orthogonality_loss(x).dtype == torch.float32


def test_bad_shape_and_form_are_errors():
    with pytest.raises(ValueError, match=r"\[num_tokens, k, hidden\]"):
        orthogonality_loss(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="form must be one of"):
        orthogonality_loss(torch.zeros(3, 2, 4), form="code")
