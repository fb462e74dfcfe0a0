"""``DPSLTransformerConfig``: Megatron-Core's ``TransformerConfig`` plus the DPSL router fields.

DPSL is switched on by ``moe_router_load_balancing_type`` naming ``"dpsl"``, either alone
(``"dpsl"``) or in a list next to Megatron's own types (``["aux_loss", "dpsl"]``, with one entry per
type in ``moe_aux_loss_coeff`` as Megatron requires). The coefficient λ is always
``moe_dpsl_coeff``; the ``moe_aux_loss_coeff`` entry at the ``"dpsl"`` position is only Megatron's
placeholder and must be ``0.0`` or equal to ``moe_dpsl_coeff`` (anything else is ambiguous and
raises). Megatron's own validation runs with ``"dpsl"`` hidden, so e.g. the capacity-factor check
sees only the stock types; the field keeps the value the user wrote.

The field names follow Megatron's ``moe_*`` naming so that Megatron-LM's argument→config copy by
field name fills them (``megatron_dpsl.megatron_lm.args`` adds the matching ``--moe-dpsl-*`` flags).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

from megatron.core.transformer.transformer_config import TransformerConfig

DPSL_TYPE = "dpsl"
"""The ``moe_router_load_balancing_type`` entry that enables DPSL."""

GATHER_CHOICES = ("micro_batch", "global_batch")


def split_dpsl_load_balancing(load_balancing_type, aux_loss_coeff):
    """Split ``moe_router_load_balancing_type`` / ``moe_aux_loss_coeff`` into DPSL and the stock rest.

    Returns:
        ``(dpsl_enabled, stock_type, stock_coeff, dpsl_placeholder)``: the type/coeff Megatron's own
        code should see (a list that shrinks to one entry becomes a plain string/float, an empty one
        becomes ``"none"``/``0.0``) and the ``moe_aux_loss_coeff`` entry that sat at the ``"dpsl"``
        position (``None`` when the type is a string).
    """
    if isinstance(load_balancing_type, str):
        if load_balancing_type == DPSL_TYPE:
            return True, "none", 0.0, None
        return False, load_balancing_type, aux_loss_coeff, None
    types = list(load_balancing_type)
    if DPSL_TYPE not in types:
        return False, load_balancing_type, aux_loss_coeff, None
    if types.count(DPSL_TYPE) > 1:
        raise ValueError(f"moe_router_load_balancing_type lists 'dpsl' more than once: {types}")
    if not isinstance(aux_loss_coeff, (list, tuple)) or len(aux_loss_coeff) != len(types):
        raise ValueError(
            "moe_aux_loss_coeff must be a list with one entry per moe_router_load_balancing_type "
            f"entry ({types}), got {aux_loss_coeff!r}; the entry for 'dpsl' is a placeholder "
            "(0.0 or moe_dpsl_coeff), λ is moe_dpsl_coeff"
        )
    idx = types.index(DPSL_TYPE)
    coeffs = list(aux_loss_coeff)
    placeholder = coeffs.pop(idx)
    types.pop(idx)
    if not types:
        return True, "none", 0.0, placeholder
    if len(types) == 1:
        return True, types[0], coeffs[0], placeholder
    return True, types, coeffs, placeholder


@dataclass(kw_only=True)
class DPSLTransformerConfig(TransformerConfig):
    """``TransformerConfig`` with the Dirichlet-Prior Shaping Loss (DPSL) router options.

    Enable DPSL with ``moe_router_load_balancing_type="dpsl"`` (or a list containing ``"dpsl"``) and
    build the model with ``megatron_dpsl.specs.get_dpsl_layer_spec`` (or put
    ``megatron_dpsl.router.DPSLRouter`` into ``MoESubmodules(router=...)``).
    """

    moe_dpsl_coeff: float = 0.01
    """λ, the DPSL coefficient (paper Eq. 5). 0 disables the loss (no computation, no communication)."""

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
        dpsl_enabled, stock_type, stock_coeff, placeholder = split_dpsl_load_balancing(
            self.moe_router_load_balancing_type, self.moe_aux_loss_coeff
        )
        user_type, user_coeff = self.moe_router_load_balancing_type, self.moe_aux_loss_coeff
        # Megatron's own validation (e.g. "capacity factor only works with aux_loss/...") must see
        # only the stock types; the user's value is restored afterwards so logs/args show "dpsl".
        self.moe_router_load_balancing_type, self.moe_aux_loss_coeff = stock_type, stock_coeff
        try:
            super().__post_init__()
        finally:
            self.moe_router_load_balancing_type = user_type
            self.moe_aux_loss_coeff = user_coeff
        self._validate_dpsl(dpsl_enabled, placeholder)

    @property
    def moe_dpsl_enabled(self) -> bool:
        """True when ``moe_router_load_balancing_type`` names ``"dpsl"``."""
        return split_dpsl_load_balancing(self.moe_router_load_balancing_type, self.moe_aux_loss_coeff)[0]

    @property
    def moe_dpsl_uses_groups(self) -> bool:
        """True when a per-group prior is configured (the router then needs per-token group ids)."""
        return self.moe_dpsl_group_alphas is not None or self.moe_dpsl_num_groups is not None

    def _validate_dpsl(self, dpsl_enabled: bool, placeholder) -> None:
        coeff = self.moe_dpsl_coeff
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff) or coeff < 0:
            raise ValueError(f"moe_dpsl_coeff must be a finite float >= 0, got {coeff!r}")
        if placeholder is not None and placeholder not in (0.0, coeff):
            raise ValueError(
                f"moe_aux_loss_coeff has {placeholder!r} at the 'dpsl' position of "
                f"moe_router_load_balancing_type, but λ is moe_dpsl_coeff={coeff!r}; "
                "put 0.0 or the same value there"
            )
        if self.moe_dpsl_gather not in GATHER_CHOICES:
            raise ValueError(
                f"moe_dpsl_gather must be one of {list(GATHER_CHOICES)}, got {self.moe_dpsl_gather!r}"
            )
        interval = self.moe_dpsl_log_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(f"moe_dpsl_log_interval must be an int >= 0, got {interval!r}")
        shortcut = (self.moe_dpsl_alpha_base, self.moe_dpsl_alpha_shift, self.moe_dpsl_num_groups)
        if any(v is not None for v in shortcut) and any(v is None for v in shortcut):
            raise ValueError(
                "moe_dpsl_alpha_base, moe_dpsl_alpha_shift and moe_dpsl_num_groups go together "
                f"(the paper's α_b/α_s group priors), got {shortcut}"
            )
        if self.moe_dpsl_group_alphas is not None and self.moe_dpsl_num_groups is not None:
            raise ValueError("set either moe_dpsl_group_alphas or moe_dpsl_alpha_base/_shift/_num_groups, not both")
        if dpsl_enabled:
            if not self.num_moe_experts:
                raise ValueError("moe_router_load_balancing_type 'dpsl' needs num_moe_experts")
            stock_type = split_dpsl_load_balancing(self.moe_router_load_balancing_type, self.moe_aux_loss_coeff)[1]
            if stock_type == "sinkhorn":
                # sinkhorn asserts moe_aux_loss_coeff == 0 and replaces top-k routing altogether
                raise ValueError("moe_router_load_balancing_type: 'dpsl' cannot be combined with 'sinkhorn'")
            self.dpsl_alpha()  # raises ValueError naming the flag

    def dpsl_alpha(self):
        """The prior as a float64 tensor: ``[num_experts]`` or ``[num_groups, num_experts]``."""
        from megatron_dpsl.priors import resolve_alpha

        flag_of = {
            "alpha": "moe_dpsl_alpha",
            "group_alphas": "moe_dpsl_group_alphas",
            "alpha_base": "moe_dpsl_alpha_base",
            "alpha_shift": "moe_dpsl_alpha_shift",
            "num_groups": "moe_dpsl_num_groups",
            "num_experts": "num_moe_experts",
        }
        kwargs = dict(num_experts=self.num_moe_experts)
        if self.moe_dpsl_group_alphas is not None:
            kwargs["group_alphas"] = self.moe_dpsl_group_alphas
        elif self.moe_dpsl_num_groups is not None:
            kwargs.update(
                alpha_base=self.moe_dpsl_alpha_base,
                alpha_shift=self.moe_dpsl_alpha_shift,
                num_groups=self.moe_dpsl_num_groups,
            )
        else:
            kwargs["alpha"] = self.moe_dpsl_alpha
        try:
            return resolve_alpha(**kwargs)
        except ValueError as err:
            msg = str(err)
            arg = msg.split(":", 1)[0].strip()  # priors' errors start with the argument's name
            if arg in flag_of:
                raise ValueError(f"{flag_of[arg]}: {msg.split(':', 1)[1].strip()}") from err
            raise ValueError(f"DPSL prior (moe_dpsl_alpha*/moe_dpsl_group_alphas): {msg}") from err
