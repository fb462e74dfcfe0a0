"""``DPSLTransformerConfig``: Megatron-Core's ``TransformerConfig`` plus the DPSL router fields.

DPSL is switched on by ``moe_router_load_balancing_type`` naming ``"dpsl"``, either alone
(``"dpsl"``) or in a list next to Megatron's own types (``["aux_loss", "dpsl"]``, with one entry per
type in ``moe_aux_loss_coeff`` as Megatron requires). λ is ``moe_dpsl_coeff``; the
``moe_aux_loss_coeff`` entry at the ``"dpsl"`` position (its *slot*) is either ``0.0`` or λ itself.
``moe_dpsl_coeff=None`` takes λ from the slot (0.01 when the slot is 0): that is how Megatron-LM's
``--moe-aux-loss-coeff 1e-3 0.02`` sets λ = 0.02 without ``--moe-dpsl-coeff``. Megatron's own
validation runs with the plugin's types hidden, so e.g. the capacity-factor check sees only the stock
types; the fields keep the values the user wrote.

``__post_init__`` is the one place that decides what is valid (with ``priors`` for α); its errors
name the field, and ``megatron_dpsl.megatron_lm.args`` rewrites field names as flags. The field names
follow Megatron's ``moe_*`` naming so that Megatron-LM's argument→config copy by field name fills them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dpsl.load_balancing import (
    AUX_LOSS_COEFF_FIELD,
    DPSL_TYPE,
    GATHER_CHOICES,
    LOAD_BALANCING_FIELD,
    plugin_types_in,
    split_load_balancing,
)
from megatron_dpsl.priors import num_prior_groups, resolve_alpha

DEFAULT_DPSL_COEFF = 0.01

# priors' argument names -> this config's fields, so the prior's errors name the field (and, through
# megatron_lm.args.translate_config_error, the flag)
_PRIOR_FIELDS = {
    "alpha": "moe_dpsl_alpha",
    "group_alphas": "moe_dpsl_group_alphas",
    "alpha_base": "moe_dpsl_alpha_base",
    "alpha_shift": "moe_dpsl_alpha_shift",
    "num_groups": "moe_dpsl_num_groups",
    "num_experts": "num_moe_experts",
}


@dataclass(kw_only=True)
class DPSLTransformerConfig(TransformerConfig):
    """``TransformerConfig`` with the Dirichlet-Prior Shaping Loss (DPSL) router options.

    Enable DPSL with ``moe_router_load_balancing_type="dpsl"`` (or a list containing ``"dpsl"``) and
    build the model with ``megatron_dpsl.specs.get_dpsl_layer_spec`` (or put
    ``megatron_dpsl.router.DPSLRouter`` into ``MoESubmodules(router=...)``).
    """

    moe_dpsl_coeff: Optional[float] = DEFAULT_DPSL_COEFF
    """λ, the DPSL coefficient (paper Eq. 5). 0 disables the loss (no computation, no communication).
    ``None``: λ is the ``moe_aux_loss_coeff`` entry at the ``"dpsl"`` position (0.01 when that is 0).
    Always a float after ``__post_init__``."""

    moe_dpsl_alpha: Union[float, List[float]] = 1.0
    """Dirichlet prior: one float (symmetric α for every expert, paper's α ∈ {0.75, 1.0, 1.25}) or
    a list with one α per expert. Ignored when group priors are configured."""

    moe_dpsl_group_alphas: Optional[List[List[float]]] = None
    """Per-group priors, ``[num_groups][num_experts]``: token group g (see
    ``megatron_dpsl.token_groups``) is shaped towards row g. Needs per-token group ids at run time."""

    moe_dpsl_alpha_base: Optional[float] = None
    """α_b of the paper's modality/task priors (Sec. 3.4): with ``moe_dpsl_alpha_shift`` and
    ``moe_dpsl_num_groups``, group g gets α_b + α_s on its contiguous block of experts, α_b elsewhere."""

    moe_dpsl_alpha_shift: Optional[float] = None
    """α_s of the paper's modality/task priors (see ``moe_dpsl_alpha_base``)."""

    moe_dpsl_num_groups: Optional[int] = None
    """Number of token groups for the α_b/α_s shortcut (must divide ``num_moe_experts``)."""

    moe_dpsl_gather: str = "micro_batch"
    """Which tokens one DPSL term covers. ``"micro_batch"``: every token of the micro-batch the layer
    sees, all-gathered over the TP (sequence-parallel), CP and EP ranks that hold different tokens
    (one loss per data-parallel replica; DDP averages them like the LM loss). ``"global_batch"``:
    additionally over the data-parallel ranks (one loss over the whole global micro-batch, closest
    to the paper's B). See docs/parallelism.md for B and the gradient under each option."""

    moe_dpsl_log_interval: int = 100
    """Log the DPSL diagnostics (expert-load CoV, routing entropy, distance to the prior) to
    Megatron's aux-loss tracker every this many router forward calls (per layer). 0 = never."""

    def __post_init__(self):
        split = split_load_balancing(self.moe_router_load_balancing_type, self.moe_aux_loss_coeff)
        user_type, user_coeff = self.moe_router_load_balancing_type, self.moe_aux_loss_coeff
        # Megatron's own validation (e.g. "capacity factor only works with aux_loss/...") must see
        # only the stock types; the user's value is restored afterwards so logs/args show "dpsl".
        self.moe_router_load_balancing_type, self.moe_aux_loss_coeff = split.stock_type, split.stock_coeff
        try:
            super().__post_init__()
        finally:
            self.moe_router_load_balancing_type = user_type
            self.moe_aux_loss_coeff = user_coeff
        self.moe_dpsl_coeff = _resolve_dpsl_coeff(self.moe_dpsl_coeff, split.plugin_coeffs.get(DPSL_TYPE, 0.0))
        self._validate_dpsl(split)

    @property
    def moe_dpsl_enabled(self) -> bool:
        """True when ``moe_router_load_balancing_type`` names ``"dpsl"``."""
        return DPSL_TYPE in plugin_types_in(self.moe_router_load_balancing_type)

    @property
    def moe_dpsl_num_token_groups(self) -> Optional[int]:
        """Token groups the prior distinguishes (``None``: one prior for every token)."""
        return num_prior_groups(self.moe_dpsl_group_alphas, self.moe_dpsl_num_groups)

    @property
    def moe_dpsl_uses_groups(self) -> bool:
        """True when a per-group prior is configured (the router then needs per-token group ids)."""
        return self.moe_dpsl_num_token_groups is not None

    def _validate_dpsl(self, split) -> None:
        if self.moe_dpsl_gather not in GATHER_CHOICES:
            raise ValueError(
                f"moe_dpsl_gather must be one of {list(GATHER_CHOICES)}, got {self.moe_dpsl_gather!r}"
            )
        interval = self.moe_dpsl_log_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(f"moe_dpsl_log_interval: must be >= 0 (an int; 0 disables), got {interval!r}")
        if self.num_moe_experts:
            self.dpsl_alpha()  # the prior is checked even with DPSL off: a typo should not wait for it
        elif DPSL_TYPE in split.plugin_coeffs:
            raise ValueError(f"{LOAD_BALANCING_FIELD} 'dpsl' needs num_moe_experts")
        if DPSL_TYPE in split.plugin_coeffs and split.stock_type == "sinkhorn":
            # sinkhorn asserts moe_aux_loss_coeff == 0 and replaces top-k routing altogether
            raise ValueError(f"{LOAD_BALANCING_FIELD}: 'dpsl' cannot be combined with 'sinkhorn'")

    def dpsl_alpha(self):
        """The prior as a float64 CPU tensor: ``[num_experts]`` or ``[num_groups, num_experts]``."""
        shortcut = dict(
            alpha_base=self.moe_dpsl_alpha_base, alpha_shift=self.moe_dpsl_alpha_shift, num_groups=self.moe_dpsl_num_groups
        )
        # moe_dpsl_alpha always has a value (default 1.0): it counts only when no group prior is set
        grouped = self.moe_dpsl_group_alphas is not None or any(v is not None for v in shortcut.values())
        kwargs = dict(num_experts=self.num_moe_experts, group_alphas=self.moe_dpsl_group_alphas, names=_PRIOR_FIELDS,
                      alpha=None if grouped else self.moe_dpsl_alpha, **shortcut)
        return resolve_alpha(**kwargs)


def _resolve_dpsl_coeff(coeff, slot: float) -> float:
    """λ from ``moe_dpsl_coeff`` and dpsl's slot of ``moe_aux_loss_coeff`` (the module docstring's rule)."""
    if not math.isfinite(slot) or slot < 0:
        raise ValueError(f"{AUX_LOSS_COEFF_FIELD}: the value in dpsl's slot is λ and must be >= 0, got {slot}")
    if coeff is None:
        return slot if slot != 0.0 else DEFAULT_DPSL_COEFF
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff) or coeff < 0:
        raise ValueError(f"moe_dpsl_coeff: must be >= 0 and finite, got {coeff!r}")
    if slot not in (0.0, coeff):
        raise ValueError(
            f"moe_dpsl_coeff: {coeff} disagrees with {slot} in dpsl's slot of {AUX_LOSS_COEFF_FIELD}; give one "
            "of them (or the same value)"
        )
    return float(coeff)
