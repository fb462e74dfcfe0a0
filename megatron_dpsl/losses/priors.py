"""Dirichlet priors α for DPSL, from what users write.

All functions return float64 CPU tensors (the router moves them; ``dpsl_loss`` reads α on the host
once per α to build its CDF table, so a CPU α costs no device sync). Errors are ``ValueError`` whose
message starts with the offending argument's name (``DPSLTransformerConfig`` maps it to its flag).

* symmetric: ``symmetric_alpha(E, 1.0)`` -> ``[E]`` (the paper's default α = 1; 0.75 for more
  specialisation on small backbones).
* per expert: ``per_expert_alpha([..E values..], E)`` -> ``[E]``.
* modality/task priors (paper Sec. 3.4), generalised: ``group_alpha(E, G, α_b, α_s)`` -> ``[G, E]``;
  the experts are split into G contiguous blocks of E/G and token group g gets α_b + α_s on block g
  and α_b elsewhere. G = 2, E = 4: vision (α_b+α_s, α_b+α_s, α_b, α_b), language (α_b, α_b, α_b+α_s,
  α_b+α_s); G = E gives the task-specific prior α_m^(m) = α_b + α_s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Union

import torch

AlphaLike = Union[float, Sequence[float], torch.Tensor]  # noqa: UP007 (a runtime alias)


def _named(names: Mapping[str, str] | None):
    """``n(arg)``: the caller's name for argument ``arg`` (the config passes its field names)."""
    names = names or {}
    return lambda arg: names.get(arg, arg)


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
        raise ValueError(f"{name}: every α must be > 0 (Dirichlet concentrations), got {value}")
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
        raise ValueError(
            f"{name}: every α must be > 0 (Dirichlet concentrations), got {values.tolist()}"
        )
    return values


def symmetric_alpha(
    num_experts: int, alpha: float, *, names: Mapping[str, str] | None = None
) -> torch.Tensor:
    """``[num_experts]`` filled with ``alpha`` (> 0), float64 on the CPU."""
    n = _named(names)
    num_experts = _check_int(n("num_experts"), num_experts)
    alpha = _check_num(n("alpha"), alpha)
    return torch.full((num_experts,), alpha, dtype=torch.float64)


def per_expert_alpha(
    values: AlphaLike, num_experts: int, *, names: Mapping[str, str] | None = None
) -> torch.Tensor:
    """One α per expert: ``values`` of length ``num_experts`` (each > 0) -> ``[num_experts]``
    float64 CPU."""
    n = _named(names)
    num_experts = _check_int(n("num_experts"), num_experts)
    try:
        t = torch.as_tensor(values, dtype=torch.float64).detach().cpu().clone()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{n('values')}: expected {num_experts} numbers, got {values!r}") from err
    if t.dim() != 1 or t.numel() != num_experts:
        got = t.numel() if t.dim() == 1 else f"shape {tuple(t.shape)}"
        raise ValueError(
            f"{n('values')}: expected 1 or {num_experts} values (num experts), got {got}"
        )
    return _check_tensor(n("values"), t)


def group_alpha(
    num_experts: int,
    num_groups: int,
    alpha_base: float,
    alpha_shift: float,
    *,
    names: Mapping[str, str] | None = None,
) -> torch.Tensor:
    """The paper's modality/task priors for ``num_groups`` token groups: ``[num_groups,
    num_experts]``.

    Experts form ``num_groups`` contiguous blocks of ``num_experts / num_groups``; row g is
    ``alpha_base + alpha_shift`` on block g and ``alpha_base`` elsewhere.

    Args:
        num_experts: E, divisible by ``num_groups``.
        num_groups: G >= 1.
        alpha_base: α_b > 0.
        alpha_shift: α_s >= 0, finite.
        names: the caller's names for these arguments in error messages (default: as above).
    """
    n = _named(names)
    num_experts = _check_int(n("num_experts"), num_experts)
    if (
        isinstance(num_groups, bool)
        or not isinstance(num_groups, int)
        or num_groups < 1
        or num_experts % num_groups
    ):
        raise ValueError(
            f"{n('num_groups')}: must be >= 1 and divide {n('num_experts')} {num_experts}, got "
            f"{num_groups!r} "
            "(each group gets a contiguous block of experts)"
        )
    alpha_base = _check_num(n("alpha_base"), alpha_base)
    alpha_shift = _check_num(n("alpha_shift"), alpha_shift, positive=False)
    if alpha_shift < 0:
        raise ValueError(f"{n('alpha_shift')}: must be >= 0, got {alpha_shift}")
    block = num_experts // num_groups
    alpha = torch.full((num_groups, num_experts), alpha_base, dtype=torch.float64)
    for g in range(num_groups):
        alpha[g, g * block : (g + 1) * block] += alpha_shift
    return alpha


def _group_rows(group_alphas, num_experts: int, n) -> torch.Tensor:
    widths = None
    if isinstance(group_alphas, (list, tuple)) and all(
        isinstance(r, (list, tuple)) for r in group_alphas
    ):
        widths = sorted({len(r) for r in group_alphas})
    if widths is not None and widths != [num_experts]:
        raise ValueError(
            f"{n('group_alphas')}: every row needs {num_experts} values (num experts), got rows of "
            f"{', '.join(map(str, widths)) or 'none'}"
        )
    try:
        rows = torch.as_tensor(group_alphas, dtype=torch.float64).detach().cpu().clone()
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{n('group_alphas')}: expected [num_groups][{num_experts}] numbers, got "
            f"{group_alphas!r}"
        ) from err
    if rows.dim() != 2 or rows.shape[1] != num_experts or rows.shape[0] < 1:
        raise ValueError(
            f"{n('group_alphas')}: every row needs {num_experts} values (num experts), got "
            f"shape {tuple(rows.shape)}"
        )
    return _check_tensor(n("group_alphas"), rows)


def resolve_alpha(
    num_experts: int,
    alpha: AlphaLike | None = None,
    group_alphas: Sequence[Sequence[float]] | None = None,
    alpha_base: float | None = None,
    alpha_shift: float | None = None,
    num_groups: int | None = None,
    *,
    names: Mapping[str, str] | None = None,
) -> torch.Tensor:
    """The one entry point the config and the router use: ``[num_experts]`` or ``[num_groups,
    num_experts]``.

    Exactly one way of giving the prior:
      * ``alpha``: a number (symmetric), a length-1 list (symmetric) or ``num_experts`` values;
        default 1.0;
      * ``group_alphas``: ``[num_groups][num_experts]`` explicit per-group priors;
      * ``alpha_base`` + ``alpha_shift`` + ``num_groups``: ``group_alpha``.

    ``names`` maps these argument names to the caller's (``DPSLTransformerConfig`` passes its field
    names), so every error starts with the name the user wrote.
    """
    n = _named(names)
    num_experts = _check_int(n("num_experts"), num_experts)
    shortcut = {"alpha_base": alpha_base, "alpha_shift": alpha_shift, "num_groups": num_groups}
    given = [k for k, v in shortcut.items() if v is not None]
    if group_alphas is not None:
        if given:
            raise ValueError(
                f"{n('group_alphas')}: give either it or "
                f"{n('alpha_base')}/{n('alpha_shift')}/{n('num_groups')}, "
                f"not both (got {', '.join(map(n, given))})"
            )
        if alpha is not None:
            raise ValueError(f"{n('alpha')}: give either it or {n('group_alphas')}, not both")
        return _group_rows(group_alphas, num_experts, n)
    if given:
        missing = [k for k in shortcut if shortcut[k] is None]
        if missing:
            raise ValueError(
                f"{n(missing[0])}: the modality prior needs {n('alpha_base')}, "
                f"{n('alpha_shift')} and "
                f"{n('num_groups')} together; missing {', '.join(map(n, missing))}"
            )
        if alpha is not None:
            raise ValueError(
                f"{n('alpha')}: give either it or "
                f"{n('alpha_base')}/{n('alpha_shift')}/{n('num_groups')}, not both"
            )
        return group_alpha(num_experts, num_groups, alpha_base, alpha_shift, names=names)
    if alpha is None:
        return symmetric_alpha(num_experts, 1.0, names=names)
    if isinstance(alpha, (list, tuple)) or (isinstance(alpha, torch.Tensor) and alpha.dim() > 0):
        if len(alpha) == 1:
            return symmetric_alpha(num_experts, alpha[0], names=names)
        return per_expert_alpha(alpha, num_experts, names={**(names or {}), "values": n("alpha")})
    return symmetric_alpha(num_experts, alpha, names=names)


def num_prior_groups(group_alphas=None, num_groups: int | None = None) -> int | None:
    """Number of token groups a prior needs (``None``: one prior for every token).

    The one rule the config, the router, Megatron-LM's data hook and the trainer read: explicit
    per-group rows count themselves, the α_b/α_s shortcut names its count.
    """
    if group_alphas is not None:
        return len(group_alphas)
    return None if num_groups is None else int(num_groups)
