"""Dirichlet priors α for DPSL, from what users write.

All functions return float64 CPU tensors (the router moves them; ``dpsl_loss`` reads α on the host once
per α to build its CDF table, so a CPU α costs no device sync). Errors are ``ValueError`` whose message
starts with the offending argument's name (``DPSLTransformerConfig`` maps it to its flag).

* symmetric: ``symmetric_alpha(E, 1.0)`` -> ``[E]`` (the paper's default α = 1; 0.75 for more
  specialisation on small backbones).
* per expert: ``per_expert_alpha([..E values..], E)`` -> ``[E]``.
* modality/task priors (paper Sec. 3.4), generalised: ``group_alpha(E, G, α_b, α_s)`` -> ``[G, E]``; the
  experts are split into G contiguous blocks of E/G and token group g gets α_b + α_s on block g and α_b
  elsewhere. G = 2, E = 4: vision (α_b+α_s, α_b+α_s, α_b, α_b), language (α_b, α_b, α_b+α_s, α_b+α_s);
  G = E gives the task-specific prior α_m^(m) = α_b + α_s.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence, Union

import torch

AlphaLike = Union[float, Sequence[float], torch.Tensor]


def _check_num(name: str, value, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        else:
            raise ValueError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: Dirichlet concentrations must be > 0, got {value}")
    return value


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _check_tensor(name: str, values: torch.Tensor) -> torch.Tensor:
    if torch.isnan(values).any():
        raise ValueError(f"{name}: NaN in {values.tolist()}")
    if not torch.isfinite(values).all():
        raise ValueError(f"{name}: must be finite, got {values.tolist()}")
    if (values <= 0).any():
        raise ValueError(f"{name}: Dirichlet concentrations must be > 0, got {values.tolist()}")
    return values


def symmetric_alpha(num_experts: int, alpha: float) -> torch.Tensor:
    """``[num_experts]`` filled with ``alpha`` (> 0), float64 on the CPU."""
    num_experts = _check_int("num_experts", num_experts)
    alpha = _check_num("alpha", alpha)
    return torch.full((num_experts,), alpha, dtype=torch.float64)


def per_expert_alpha(values: AlphaLike, num_experts: int) -> torch.Tensor:
    """One α per expert: ``values`` of length ``num_experts`` (each > 0) -> ``[num_experts]`` float64 CPU."""
    num_experts = _check_int("num_experts", num_experts)
    try:
        t = torch.as_tensor(values, dtype=torch.float64).detach().cpu().clone()
    except (TypeError, ValueError) as err:
        raise ValueError(f"values: expected {num_experts} numbers, got {values!r}") from err
    if t.dim() != 1 or t.numel() != num_experts:
        raise ValueError(f"values: expected {num_experts} values (one per expert), got shape {tuple(t.shape)}")
    return _check_tensor("values", t)


def group_alpha(num_experts: int, num_groups: int, alpha_base: float, alpha_shift: float) -> torch.Tensor:
    """The paper's modality/task priors for ``num_groups`` token groups: ``[num_groups, num_experts]``.

    Experts form ``num_groups`` contiguous blocks of ``num_experts / num_groups``; row g is
    ``alpha_base + alpha_shift`` on block g and ``alpha_base`` elsewhere.

    Args:
        num_experts: E, divisible by ``num_groups``.
        num_groups: G >= 1.
        alpha_base: α_b > 0.
        alpha_shift: α_s >= 0, finite.
    """
    num_experts = _check_int("num_experts", num_experts)
    num_groups = _check_int("num_groups", num_groups)
    if num_experts % num_groups:
        raise ValueError(
            f"num_groups: must divide num_experts={num_experts} (contiguous expert blocks), got {num_groups}"
        )
    alpha_base = _check_num("alpha_base", alpha_base)
    alpha_shift = _check_num("alpha_shift", alpha_shift, positive=False)
    if alpha_shift < 0:
        raise ValueError(f"alpha_shift: must be >= 0, got {alpha_shift}")
    block = num_experts // num_groups
    alpha = torch.full((num_groups, num_experts), alpha_base, dtype=torch.float64)
    for g in range(num_groups):
        alpha[g, g * block : (g + 1) * block] += alpha_shift
    return alpha


def resolve_alpha(
    num_experts: int,
    alpha: Optional[AlphaLike] = None,
    group_alphas: Optional[Sequence[Sequence[float]]] = None,
    alpha_base: Optional[float] = None,
    alpha_shift: Optional[float] = None,
    num_groups: Optional[int] = None,
) -> torch.Tensor:
    """The one entry point the config and the router use: ``[num_experts]`` or ``[num_groups, num_experts]``.

    Exactly one way of giving the prior:
      * ``alpha``: a number (symmetric), a length-1 list (symmetric) or ``num_experts`` values; default 1.0;
      * ``group_alphas``: ``[num_groups][num_experts]`` explicit per-group priors;
      * ``alpha_base`` + ``alpha_shift`` + ``num_groups``: ``group_alpha``.
    """
    num_experts = _check_int("num_experts", num_experts)
    shortcut = {"alpha_base": alpha_base, "alpha_shift": alpha_shift, "num_groups": num_groups}
    given = [k for k, v in shortcut.items() if v is not None]
    if group_alphas is not None:
        if given:
            raise ValueError(f"group_alphas: give either group_alphas or alpha_base/alpha_shift/num_groups, not {given}")
        if alpha is not None:
            raise ValueError("alpha: give either alpha or group_alphas, not both")
        try:
            rows = torch.as_tensor(group_alphas, dtype=torch.float64).detach().cpu().clone()
        except (TypeError, ValueError) as err:
            raise ValueError(f"group_alphas: expected [num_groups][{num_experts}] numbers, got {group_alphas!r}") from err
        if rows.dim() != 2 or rows.shape[1] != num_experts or rows.shape[0] < 1:
            raise ValueError(
                f"group_alphas: expected [num_groups][num_experts={num_experts}] values, got shape {tuple(rows.shape)}"
            )
        return _check_tensor("group_alphas", rows)
    if given:
        missing = [k for k in shortcut if shortcut[k] is None]
        if missing:
            raise ValueError(f"{missing[0]}: alpha_base, alpha_shift and num_groups go together, got only {given}")
        if alpha is not None:
            raise ValueError("alpha: give either alpha or alpha_base/alpha_shift/num_groups, not both")
        return group_alpha(num_experts, num_groups, alpha_base, alpha_shift)
    if alpha is None:
        return symmetric_alpha(num_experts, 1.0)
    if isinstance(alpha, (list, tuple)) or (isinstance(alpha, torch.Tensor) and alpha.dim() > 0):
        n = len(alpha)
        if n == 1:
            return symmetric_alpha(num_experts, alpha[0])
        if n != num_experts:
            raise ValueError(f"alpha: expected one value or num_experts={num_experts} values, got {n}")
        try:
            return per_expert_alpha(alpha, num_experts)
        except ValueError as err:
            raise ValueError(f"alpha: {str(err).split(': ', 1)[-1]}") from err
    return symmetric_alpha(num_experts, alpha)
