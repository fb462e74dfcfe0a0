"""Priors: symmetric, per expert, the paper's modality/task priors, and the resolver's errors."""

import pytest
import torch

from megatron_dpsl.losses.priors import (
    group_alpha,
    per_expert_alpha,
    resolve_alpha,
    symmetric_alpha,
)


def test_symmetric_and_per_expert():
    a = symmetric_alpha(4, 0.75)
    assert a.dtype == torch.float64 and a.device.type == "cpu" and a.tolist() == [0.75] * 4
    b = per_expert_alpha([0.5, 1, 2, 3], 4)
    assert b.dtype == torch.float64 and b.tolist() == [0.5, 1.0, 2.0, 3.0]
    src = torch.tensor([1.0, 2.0], dtype=torch.float32)
    c = per_expert_alpha(src, 2)
    c[0] = 9.0
    assert src[0] == 1.0  # a copy: the caller's tensor is never aliased


def test_group_alpha_matches_paper_section_3_4():
    g = group_alpha(4, 2, alpha_base=0.5, alpha_shift=1.0)
    assert g.tolist() == [[1.5, 1.5, 0.5, 0.5], [0.5, 0.5, 1.5, 1.5]]  # vision, language
    task = group_alpha(
        3, 3, alpha_base=0.2, alpha_shift=2.0
    )  # task-specific: alpha_m^(m) = a_b + a_s
    assert torch.allclose(
        task, torch.full((3, 3), 0.2, dtype=torch.float64) + 2.0 * torch.eye(3, dtype=torch.float64)
    )
    big = group_alpha(8, 4, 1.0, 0.5)
    assert (
        big.shape == (4, 8)
        and big[2, 4:6].tolist() == [1.5, 1.5]
        and big[2, :4].tolist() == [1.0] * 4
    )


def test_resolve_alpha_forms():
    assert resolve_alpha(4).tolist() == [1.0] * 4  # the paper's default
    assert resolve_alpha(4, alpha=0.75).tolist() == [0.75] * 4
    assert resolve_alpha(4, alpha=[0.3]).tolist() == [0.3] * 4
    assert resolve_alpha(2, alpha=[0.3, 0.4]).tolist() == [0.3, 0.4]
    assert resolve_alpha(2, group_alphas=[[1, 2], [3, 4]]).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    shortcut = resolve_alpha(4, alpha_base=0.5, alpha_shift=1.0, num_groups=2)
    assert torch.equal(shortcut, group_alpha(4, 2, 0.5, 1.0))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: symmetric_alpha(4, 0.0), "alpha"),
        (lambda: symmetric_alpha(4, -1.0), "alpha"),
        (lambda: symmetric_alpha(4, float("nan")), "alpha"),
        (lambda: symmetric_alpha(0, 1.0), "num_experts"),
        (lambda: per_expert_alpha([1.0, 2.0], 3), "values"),
        (lambda: per_expert_alpha([1.0, float("nan"), 2.0], 3), "values"),
        (lambda: per_expert_alpha([1.0, 0.0, 2.0], 3), "values"),
        (lambda: group_alpha(4, 3, 0.5, 1.0), "num_groups"),
        (lambda: group_alpha(4, 2, 0.0, 1.0), "alpha_base"),
        (lambda: group_alpha(4, 2, 0.5, -1.0), "alpha_shift"),
        (lambda: group_alpha(4, 2, 0.5, float("inf")), "alpha_shift"),
        (lambda: resolve_alpha(4, alpha=[1.0, 1.0]), "alpha"),
        (lambda: resolve_alpha(4, alpha=-2.0), "alpha"),
        (lambda: resolve_alpha(4, alpha=[1.0, 1.0, float("nan"), 1.0]), "alpha"),
        (lambda: resolve_alpha(2, group_alphas=[[1.0, 1.0, 1.0]]), "group_alphas"),
        (lambda: resolve_alpha(2, group_alphas=[[1.0, 0.0]]), "group_alphas"),
        (lambda: resolve_alpha(2, group_alphas=[[1.0, 1.0]], num_groups=1), "group_alphas"),
        (lambda: resolve_alpha(4, alpha_base=0.5, num_groups=2), "alpha_shift"),
        (
            lambda: resolve_alpha(4, alpha=1.0, alpha_base=0.5, alpha_shift=1.0, num_groups=2),
            "alpha",
        ),
        (lambda: resolve_alpha(4, alpha=1.0, group_alphas=[[1.0] * 4]), "alpha"),
    ],
)
def test_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()
