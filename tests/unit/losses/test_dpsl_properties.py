"""Property-based tests (Hypothesis) of ``dpsl_loss`` and the priors with generated shapes, dtypes
and values: every case computes a finite result that matches an independent computation of Eq. 4
(SciPy's regularized incomplete beta), or raises a ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy.special import betainc
from support.properties import bounded

from megatron_dpsl.losses.dpsl import dpsl_loss
from megatron_dpsl.losses.priors import resolve_alpha

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Loss tolerance per probs dtype (the reference reads the same rounded probs in float64): float64
# evaluates F to <= 1e-10 abs, float32 to <= 5e-7 (beta.py); the loss sums E terms of (j/B - F)^2
# with |j/B - F| <= 1, so its error is at most 2 * E * (error of F).
ATOL = {torch.float64: 1e-8, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}

# A few prior values, so that the Beta CDF tables (~0.6 s to build, 16 cached) are mostly reused:
# the generated cases vary the shapes, dtypes, groups and probabilities instead.
POOL = (0.75, 1.0, 2.5)
alphas = st.sampled_from(POOL)


def pattern(num_experts: int, shift: int) -> list[float]:
    """A per-expert prior from POOL (shift picks one of three)."""
    return [POOL[(k + shift) % len(POOL)] for k in range(num_experts)]


def reference_loss(probs, alpha2d, group_ids, padding) -> float:
    """Eq. 4 summed over groups: per group g and expert k, the sorted valid probabilities p_(j) of
    the group's tokens, sum_j (j/B_g - I_{p_(j)}(a, A - a))^2 / B_g."""
    p = probs.double().numpy()
    a = alpha2d.double().numpy()
    ids = np.zeros(len(p), dtype=np.int64) if group_ids is None else group_ids.numpy()
    valid = np.ones(len(p), bool) if padding is None else ~padding.numpy()
    total = 0.0
    for g in range(a.shape[0]):
        rows = p[(ids == g) & valid]
        n = len(rows)
        for k in range(a.shape[1]):
            x = np.sort(rows[:, k])
            f = betainc(a[g, k], a[g].sum() - a[g, k], x)
            total += float(np.sum((np.arange(1, n + 1) / n - f) ** 2) / n) if n else 0.0
    return total


@st.composite
def routing_cases(draw):
    """probs [B, E] (softmax of random logits, any dtype, some ties), alpha in one of its forms,
    optionally groups and padding."""
    B, E = draw(st.integers(0, 48)), draw(st.sampled_from([2, 3, 4, 8]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.0, 0.5, 3.0, 30.0]))  # 0: all ties; 30: near one-hot
    probs = torch.softmax(torch.randn(B, E, generator=g, dtype=torch.float64) * scale, -1)
    probs = probs.to(dtype)
    form = draw(st.sampled_from(["scalar", "one", "per_expert", "groups"]))
    group_ids = padding = None
    if form == "scalar":
        a = draw(alphas)
        alpha, alpha2d = a, torch.full((1, E), a, dtype=torch.float64)
    elif form == "one":
        a = draw(alphas)
        alpha, alpha2d = [a], torch.full((1, E), a, dtype=torch.float64)
    elif form == "per_expert":
        alpha2d = torch.tensor([pattern(E, draw(st.integers(0, 2)))], dtype=torch.float64)
        alpha = alpha2d[0]
    else:
        G = draw(st.integers(1, 3))
        alpha2d = torch.tensor([pattern(E, shift) for shift in range(G)], dtype=torch.float64)
        alpha = alpha2d
        group_ids = torch.randint(0, G, (B,), generator=g)
        if draw(st.booleans()):
            padding = torch.rand(B, generator=g) < 0.3
    return probs, alpha, alpha2d, group_ids, padding


@bounded(80)
@given(routing_cases())
def test_dpsl_loss_is_finite_and_matches_eq4(case):
    probs, alpha, alpha2d, group_ids, padding = case
    probs = probs.clone().requires_grad_(True)
    loss = dpsl_loss(probs, alpha, group_ids, padding, impl="torch")
    assert loss.shape == () and torch.isfinite(loss) and float(loss.detach()) >= 0
    assert loss.dtype == (torch.float64 if probs.dtype == torch.float64 else torch.float32)
    expected = reference_loss(probs.detach(), alpha2d, group_ids, padding)
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-5, abs_tol=ATOL[probs.dtype])
    (grad,) = torch.autograd.grad(loss, probs)
    assert grad.dtype == probs.dtype and torch.isfinite(grad.float()).all()
    if padding is not None:
        assert (grad[padding] == 0).all()  # padding tokens are never read into the loss


@bounded(30)
@given(st.sampled_from([2, 3, 8]), alphas, st.sampled_from(DTYPES))
def test_alpha_forms_agree(num_experts, a, dtype):
    """A number, a one-element list, a 0-d tensor and [E] copies are the same symmetric prior."""
    probs = torch.softmax(torch.randn(16, num_experts, dtype=torch.float64), -1).to(dtype)
    f64 = torch.float64
    forms = (a, [a], torch.tensor(a, dtype=f64), [a] * num_experts, torch.full((1, num_experts), a))
    losses = [dpsl_loss(probs, form, impl="torch") for form in forms]
    assert all(torch.equal(loss, losses[0]) for loss in losses)


bad_numbers = st.sampled_from([0.0, -1.0, -1e-300, float("nan"), float("inf"), -float("inf")])


@st.composite
def bad_dpsl_args(draw):
    """(probs, alpha, group_ids, padding_mask, the argument the error must name)."""
    B, E = draw(st.integers(1, 16)), draw(st.integers(2, 6))
    probs = torch.softmax(torch.randn(B, E, dtype=torch.float64), -1)
    alpha, group_ids, padding, name = torch.ones(E), None, None, None
    what = draw(
        st.sampled_from(
            ["alpha_value", "alpha_shape", "alpha_type", "probs", "group_ids", "padding", "groups"]
        )
    )
    if what == "alpha_value":  # refused before any table is built
        alpha, name = [draw(st.floats(0.05, 8)) for _ in range(E)], "alpha"
        alpha[draw(st.integers(0, E - 1))] = draw(bad_numbers)
    elif what == "alpha_shape":
        shape = draw(st.sampled_from([(E + 1,), (2, E + 1), (1, 1, E), (0,)]))
        alpha, name = torch.ones(shape), "alpha"
    elif what == "alpha_type":
        alpha, name = draw(st.sampled_from([True, "1.0", [[1.0], [1.0, 2.0]], None])), "alpha"
    elif what == "probs":
        probs = draw(
            st.sampled_from([probs[:, 0], probs.long(), probs.tolist(), probs[None], probs[:, :1]])
        )
        name = "probs"
    elif what == "group_ids":
        alpha = torch.ones(2, E)
        group_ids = draw(st.sampled_from([torch.zeros(B + 1).long(), torch.zeros(B), [0] * B]))
        name = "group_ids"
    elif what == "padding":
        padding = draw(st.sampled_from([torch.zeros(B).long(), torch.zeros(B + 1, dtype=bool)]))
        name = "padding_mask"
    else:  # a two-row prior without group ids, or ids outside its rows
        alpha, name = torch.ones(2, E), "group_ids"
        group_ids = draw(st.sampled_from([None, torch.full((B,), 2), torch.full((B,), -1)]))
    return probs, alpha, group_ids, padding, name


@bounded(150)
@given(bad_dpsl_args())
def test_bad_dpsl_arguments_raise_naming_them(case):
    probs, alpha, group_ids, padding, name = case
    with pytest.raises(ValueError) as err:
        dpsl_loss(probs, alpha, group_ids, padding, impl="torch")
    message = str(err.value)
    assert message.startswith("dpsl_loss: ") and name in message.split(":")[1], message
    assert len(message.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# the priors

NAMES = {"alpha": "--a", "alpha_base": "--b", "alpha_shift": "--s", "num_groups": "--g"}
maybe_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 10),
    st.none(),
    st.booleans(),
    st.lists(st.floats(-2, 5), max_size=9),
)


@bounded(200)
@given(
    num_experts=st.integers(1, 8),
    alpha=maybe_numbers,
    alpha_base=maybe_numbers,
    alpha_shift=maybe_numbers,
    num_groups=st.one_of(st.none(), st.integers(-1, 9), st.floats(0, 3)),
)
def test_resolve_alpha_gives_a_valid_prior_or_names_the_argument(
    num_experts, alpha, alpha_base, alpha_shift, num_groups
):
    kwargs = dict(
        alpha=alpha, alpha_base=alpha_base, alpha_shift=alpha_shift, num_groups=num_groups
    )
    try:
        prior = resolve_alpha(num_experts, **kwargs, names=NAMES)
    except ValueError as err:
        given_names = [NAMES[k] for k, v in kwargs.items() if v is not None] + list(NAMES.values())
        assert str(err).split(":")[0] in given_names, err
        return
    assume(True)
    assert prior.dtype == torch.float64 and prior.shape[-1] == num_experts and prior.dim() in (1, 2)
    assert torch.isfinite(prior).all() and (prior > 0).all()
