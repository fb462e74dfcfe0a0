"""``DPSLTransformerConfig``: Megatron-Core's ``TransformerConfig`` plus the DPSL router fields.

DPSL is switched on by ``moe_router_load_balancing_type`` naming ``"dpsl"``, either alone
(``"dpsl"``) or in a list next to Megatron's own types (``["aux_loss", "dpsl"]``, with one entry per
type in ``moe_aux_loss_coeff`` as Megatron requires). λ is ``moe_dpsl_coeff``; the
``moe_aux_loss_coeff`` entry at the ``"dpsl"`` position (its *slot*) is either ``0.0`` or λ itself.
``moe_dpsl_coeff=None`` takes λ from the slot (0.01 when the slot is 0): that is how Megatron-LM's
``--moe-aux-loss-coeff 1e-3 0.02`` sets λ = 0.02 without ``--moe-dpsl-coeff``. Megatron's own
validation runs with the plugin's types hidden, so e.g. the capacity-factor check sees only the
stock types; the fields keep the values the user wrote.

The variance and orthogonality losses of Guo et al. ride the same list: ``"variance"`` and
``"orthogonality"``, each with its coefficient in its ``moe_aux_loss_coeff`` slot (Megatron's way;
no extra coefficient field) and a ``moe_*_loss_form`` field (docs/regularizers.md).

``__post_init__`` is the one place that decides what is valid (with ``priors`` for α); its errors
name the field, and ``megatron_dpsl.megatron_lm.args`` rewrites field names as flags. The field
names follow Megatron's ``moe_*`` naming so that Megatron-LM's argument→config copy by field name
fills them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dpsl.config.ac import WEIGHT_NORMS
from megatron_dpsl.config.load_balancing import (
    AUX_LOSS_COEFF_FIELD,
    DPSL_TYPE,
    GATHER_CHOICES,
    KNOWN_MEGATRON_TYPES,
    LOAD_BALANCING_FIELD,
    LOSS_FORMS,
    ORTHOGONALITY_TYPE,
    PLUGIN_LOAD_BALANCING_TYPES,
    VARIANCE_TYPE,
    as_list,
    plugin_types_in,
    split_load_balancing,
)
from megatron_dpsl.config.moe_layers import moe_layer_numbers
from megatron_dpsl.losses.priors import num_prior_groups, resolve_alpha

DEFAULT_DPSL_COEFF = 0.01

# cuda_graph_scope values whose graphs contain the MoE router (megatron-core's CudaGraphScope names)
_ROUTER_GRAPH_SCOPES = {"full", "full_iteration", "moe", "moe_router", "moe_preprocess"}

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
    build the model with ``megatron_dpsl.models.specs.get_dpsl_layer_spec`` (or put
    ``megatron_dpsl.routing.router.DPSLRouter`` into ``MoESubmodules(router=...)``).
    """

    moe_dpsl_coeff: float | None = DEFAULT_DPSL_COEFF
    """λ, the DPSL coefficient (paper Eq. 5). 0 disables the loss (no computation, no
    communication).
    ``None``: λ is the ``moe_aux_loss_coeff`` entry at the ``"dpsl"`` position (0.01 when that is
        0).
    Always a float after ``__post_init__``."""

    moe_dpsl_alpha: float | list[float] = 1.0
    """Dirichlet prior: one float (symmetric α for every expert, paper's α ∈ {0.75, 1.0, 1.25}) or
    a list with one α per expert. Ignored when group priors are configured."""

    moe_dpsl_group_alphas: list[list[float]] | None = None
    """Per-group priors, ``[num_groups][num_experts]``: token group g (see
    ``megatron_dpsl.parallel.token_groups``) is shaped towards row g. Needs per-token group ids at
    run time."""

    moe_dpsl_alpha_base: float | None = None
    """α_b of the paper's modality/task priors (Sec. 3.4): with ``moe_dpsl_alpha_shift`` and
    ``moe_dpsl_num_groups``, group g gets α_b + α_s on its contiguous block of experts, α_b
    elsewhere."""

    moe_dpsl_alpha_shift: float | None = None
    """α_s of the paper's modality/task priors (see ``moe_dpsl_alpha_base``)."""

    moe_dpsl_num_groups: int | None = None
    """Number of token groups for the α_b/α_s shortcut (must divide ``num_moe_experts``)."""

    moe_dpsl_gather: str = "micro_batch"
    """Which tokens one DPSL term covers. ``"micro_batch"``: every token of the micro-batch the
    layer sees, all-gathered over the TP (sequence-parallel), CP and EP ranks that hold different
    tokens (one loss per data-parallel replica; DDP averages them like the LM loss).
    ``"global_batch"``: additionally over the data-parallel ranks (one loss over the whole global
    micro-batch, closest to the paper's B). See docs/parallelism.md for B and the gradient under
    each option."""

    moe_dpsl_log_interval: int = 100
    """Log the DPSL diagnostics (expert-load CoV, routing entropy, distance to the prior) to
    Megatron's aux-loss tracker every this many router forward calls (per layer). 0 = never."""

    # ---- Adaptive Clustering (AC) router (megatron_dpsl.routing.ac.router, docs/ac_router.md) ----
    moe_ac_layers: list[int] | None = None
    """Layer numbers (1-based, over the whole model, Megatron's ``layer_number``) of the MoE layers
    whose router scores tokens with Adaptive Clustering (Nielsen et al., ICLR 2025): each token's
    features are reweighted by the tightness of the cluster the previous MoE layer put it in. Each
    must be an MoE layer
    (``moe_layer_freq``) with an earlier MoE layer; the paper keeps the first MoE layers standard.
    ``None``
    or empty: off. With it set, the specs put ``ACRouter`` into every MoE layer."""

    moe_ac_eps: float = 1e-4
    """Added to each cluster's per-feature mean absolute deviation before inverting it (official
    code: 1e-4)."""

    moe_ac_clip: float | None = 10.0
    """Cap on the AC feature weights, as a multiple of their mean before the cap (official
    language-model code: 10; Swin code: 1.5). ``None``: no cap."""

    moe_ac_weight_norm: str = "feature"
    """How the AC weights are normalised: ``"feature"`` (each feature has mean weight 1 over the
    clusters; official language-model code), ``"cluster"`` (each cluster's weights have mean 1 over
    the features) or ``"global"`` (all weights divided by their mean before the cap; with
    ``moe_ac_clip=1.5`` the official Swin code's ``compute_cosa``)."""

    moe_variance_loss_form: str = "paper"
    """What the ``"variance"`` load-balancing type adds (Guo et al. 2025; docs/regularizers.md).
    ``"paper"``:
    Eq. 7, minus each expert's variance of the post-top-k ``probs`` across the batch's tokens (the
    tokens ``moe_dpsl_gather`` names), averaged over experts. ``"reference_code"``: the official
    code, minus the per-token variance of the full softmax across experts. The coefficient is the
    ``moe_aux_loss_coeff`` entry at "variance"'s position."""

    moe_orthogonality_loss_form: str = "paper"
    """What the ``"orthogonality"`` load-balancing type adds (expert side; needs
    ``megatron_dpsl.DPSLMoELayer`` in the layer spec). ``"paper"``: Eq. 6 / (k·N), the squared
    projections of each of a token's k unweighted expert outputs onto each other one.
    ``"reference_code"``: onto the span of the other k-1 (the official code's Gram-Schmidt). The
    coefficient is the ``moe_aux_loss_coeff`` entry at "orthogonality"'s position."""

    def __post_init__(self):
        unknown = [
            t
            for t in as_list(self.moe_router_load_balancing_type)
            if t not in (*KNOWN_MEGATRON_TYPES, *PLUGIN_LOAD_BALANCING_TYPES)
        ]
        if (
            unknown
        ):  # Megatron itself would ignore an unknown name: a typo would silently disable a loss
            raise ValueError(
                f"{LOAD_BALANCING_FIELD}: unknown type {unknown[0]!r}; choose from "
                f"{list(KNOWN_MEGATRON_TYPES) + list(PLUGIN_LOAD_BALANCING_TYPES)}"
            )
        split = split_load_balancing(self.moe_router_load_balancing_type, self.moe_aux_loss_coeff)
        # before Megatron's checks: e.g. top-1 routing fails there with a message about pre-softmax
        _validate_topk(self)
        _validate_regularizers(self, split)
        user_type, user_coeff = self.moe_router_load_balancing_type, self.moe_aux_loss_coeff
        # Megatron's own validation (e.g. "capacity factor only works with aux_loss/...") must see
        # only the stock types; the user's value is restored afterwards so logs/args show "dpsl".
        self.moe_router_load_balancing_type, self.moe_aux_loss_coeff = (
            split.stock_type,
            split.stock_coeff,
        )
        try:
            super().__post_init__()
        finally:
            self.moe_router_load_balancing_type = user_type
            self.moe_aux_loss_coeff = user_coeff
        self.moe_dpsl_coeff = _resolve_dpsl_coeff(
            self.moe_dpsl_coeff, split.plugin_coeffs.get(DPSL_TYPE, 0.0)
        )
        self._validate_dpsl(split)
        self._validate_ac()

    @property
    def moe_dpsl_enabled(self) -> bool:
        """True when ``moe_router_load_balancing_type`` names ``"dpsl"``."""
        return DPSL_TYPE in plugin_types_in(self.moe_router_load_balancing_type)

    @property
    def moe_plugin_enabled(self) -> bool:
        """True when the model needs the plugin's spec (``DPSLRouter``/``ACRouter``,
        ``DPSLMoELayer``): a plugin
        load-balancing type (dpsl, variance, orthogonality) or the AC router (``moe_ac_layers``)."""
        return bool(plugin_types_in(self.moe_router_load_balancing_type)) or self.moe_ac_enabled

    @property
    def moe_variance_coeff(self) -> float:
        """γ, the variance loss coefficient: the ``moe_aux_loss_coeff`` slot of ``"variance"`` (0.0
        when off)."""
        return _plugin_coeff(self, VARIANCE_TYPE)

    @property
    def moe_orthogonality_coeff(self) -> float:
        """β, the orthogonality loss coefficient: the ``moe_aux_loss_coeff`` slot of
        ``"orthogonality"`` (0.0 when off)."""
        return _plugin_coeff(self, ORTHOGONALITY_TYPE)

    @property
    def moe_dpsl_num_token_groups(self) -> int | None:
        """Token groups the prior distinguishes (``None``: one prior for every token)."""
        return num_prior_groups(self.moe_dpsl_group_alphas, self.moe_dpsl_num_groups)

    @property
    def moe_dpsl_uses_groups(self) -> bool:
        """True when a per-group prior is configured (the router then needs per-token group ids)."""
        return self.moe_dpsl_num_token_groups is not None

    def _validate_dpsl(self, split) -> None:
        if self.moe_dpsl_gather not in GATHER_CHOICES:
            raise ValueError(
                f"moe_dpsl_gather must be one of {list(GATHER_CHOICES)}, got "
                f"{self.moe_dpsl_gather!r}"
            )
        interval = self.moe_dpsl_log_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(
                f"moe_dpsl_log_interval: must be >= 0 (an int; 0 disables), got {interval!r}"
            )
        if self.num_moe_experts:
            # the prior is checked even with DPSL off: a typo should not wait for it
            self.dpsl_alpha()
        elif split.plugin_coeffs:
            raise ValueError(
                f"{LOAD_BALANCING_FIELD} {next(iter(split.plugin_coeffs))!r} needs num_moe_experts"
            )
        if self.moe_dpsl_enabled and self.num_moe_experts == 1:
            # p = 1 for every token; the prior's Beta(α, A - α) marginal has A - α = 0
            raise ValueError("num_moe_experts: DPSL needs at least 2 experts, got 1")
        if split.plugin_coeffs and split.stock_type == "sinkhorn":
            # sinkhorn asserts moe_aux_loss_coeff == 0 and replaces top-k routing altogether
            raise ValueError(
                f"{LOAD_BALANCING_FIELD}: {next(iter(split.plugin_coeffs))!r} cannot be "
                "combined with 'sinkhorn'"
            )

    @property
    def moe_ac_enabled(self) -> bool:
        """True when ``moe_ac_layers`` names at least one layer (the specs then use
        ``ACRouter``)."""
        return bool(self.moe_ac_layers)

    def _validate_ac(self) -> None:
        eps, clip = self.moe_ac_eps, self.moe_ac_clip
        if not _positive_number(eps):
            raise ValueError(f"moe_ac_eps: must be > 0 and finite, got {eps!r}")
        if clip is not None and not _positive_number(clip):
            raise ValueError(f"moe_ac_clip: must be > 0 and finite (or None: no cap), got {clip!r}")
        if self.moe_ac_weight_norm not in WEIGHT_NORMS:
            raise ValueError(
                f"moe_ac_weight_norm must be one of {list(WEIGHT_NORMS)}, got "
                f"{self.moe_ac_weight_norm!r}"
            )
        layers = self.moe_ac_layers
        if not layers:
            return
        if not isinstance(layers, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in layers
        ):
            raise ValueError(
                f"moe_ac_layers: expected a list of layer numbers (ints), got {layers!r}"
            )
        if not self.num_moe_experts:
            raise ValueError("moe_ac_layers: the AC router needs MoE layers (num_moe_experts)")
        if len(set(layers)) != len(layers):
            raise ValueError(f"moe_ac_layers lists a layer more than once: {list(layers)}")
        self._check_ac_layer_numbers(layers)
        self._check_ac_determinism()

    def _check_ac_layer_numbers(self, layers) -> None:
        """Each AC layer is an MoE layer of the model with an earlier MoE layer."""
        moe_layers = moe_layer_numbers(self.num_layers, self.moe_layer_freq)
        for n in layers:
            if not 1 <= n <= self.num_layers:
                raise ValueError(
                    f"moe_ac_layers: layer {n} is outside 1..num_layers={self.num_layers}"
                )
            if n not in moe_layers:
                raise ValueError(
                    f"moe_ac_layers: layer {n} is not an MoE layer (MoE layers: {moe_layers})"
                )
        if moe_layers[0] in layers:
            raise ValueError(
                f"moe_ac_layers: layer {moe_layers[0]} is the first MoE layer; AC routes by "
                "the previous MoE layer's "
                f"assignment, so the first MoE layer must stay standard (MoE layers: {moe_layers})"
            )

    def _check_ac_determinism(self) -> None:
        """AC routing must repeat exactly: no input jitter, no CUDA graph capturing the router."""
        if self.moe_input_jitter_eps is not None:
            raise ValueError(
                f"moe_input_jitter_eps={self.moe_input_jitter_eps} cannot be combined with "
                "moe_ac_layers: the AC "
                "router must be deterministic (an activation-recompute pass must route like "
                "the original)"
            )
        # a CUDA graph that captures the router replays its kernels without the Python hand-over;
        # graphs of attention or dense MLPs only leave the router alone (cuda_graph_scope in 0.16,
        # renamed cuda_graph_modules in 0.19)
        listed = (
            getattr(self, "cuda_graph_modules", None)
            or getattr(self, "cuda_graph_scope", None)
            or []
        )
        scopes = {getattr(scope, "name", scope) for scope in listed}
        if getattr(self, "cuda_graph_impl", "none") != "none" and (
            not scopes or scopes & _ROUTER_GRAPH_SCOPES
        ):
            raise ValueError(
                "moe_ac_layers cannot be combined with "
                f"cuda_graph_impl={self.cuda_graph_impl!r} capturing the router "
                f"(cuda_graph_scope={sorted(scopes) or 'whole layer'}): the AC router hands "
                "assignments between layers "
                "in Python, which a replayed CUDA graph skips; capture only attn/mlp, or set "
                "cuda_graph_impl='none'"
            )

    def dpsl_alpha(self):
        """The prior as a float64 CPU tensor: ``[num_experts]`` or ``[num_groups, num_experts]``."""
        shortcut = dict(
            alpha_base=self.moe_dpsl_alpha_base,
            alpha_shift=self.moe_dpsl_alpha_shift,
            num_groups=self.moe_dpsl_num_groups,
        )
        # moe_dpsl_alpha always has a value (default 1.0): it counts only when no group prior is set
        grouped = self.moe_dpsl_group_alphas is not None or any(
            v is not None for v in shortcut.values()
        )
        kwargs = dict(
            num_experts=self.num_moe_experts,
            group_alphas=self.moe_dpsl_group_alphas,
            names=_PRIOR_FIELDS,
            alpha=None if grouped else self.moe_dpsl_alpha,
            **shortcut,
        )
        return resolve_alpha(**kwargs)


def _positive_number(value) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value > 0
    )


def _plugin_coeff(config, load_balancing_type: str) -> float:
    split = split_load_balancing(config.moe_router_load_balancing_type, config.moe_aux_loss_coeff)
    return float(split.plugin_coeffs.get(load_balancing_type, 0.0))


def _validate_topk(config) -> None:
    """k in 1..E: 0 routes every token nowhere, k > E fails deep inside Megatron's top-k."""
    k, num_experts = config.moe_router_topk, config.num_moe_experts
    if not num_experts:
        return
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(
            f"moe_router_topk: must be an int in [1, num_moe_experts={num_experts}] (experts per "
            f"token), got {k!r}"
        )


def _validate_regularizers(config, split) -> None:
    """The variance and orthogonality types (docs/regularizers.md): coefficients, forms, what L_o
    needs."""
    for name in (VARIANCE_TYPE, ORTHOGONALITY_TYPE):
        slot = split.plugin_coeffs.get(name, 0.0)
        if not math.isfinite(slot) or slot < 0:
            raise ValueError(
                f"{AUX_LOSS_COEFF_FIELD}: the value in {name}'s slot is its coefficient and "
                f"must be >= 0, got {slot}"
            )
    for field in ("moe_variance_loss_form", "moe_orthogonality_loss_form"):
        if getattr(config, field) not in LOSS_FORMS:
            raise ValueError(
                f"{field} must be one of {list(LOSS_FORMS)}, got {getattr(config, field)!r}"
            )
    if ORTHOGONALITY_TYPE not in split.plugin_coeffs:
        return
    what = f"{LOAD_BALANCING_FIELD} 'orthogonality'"
    # L_o needs each token's k outputs unweighted, then weighs them itself (DPSLMoELayer)
    if config.moe_apply_probs_on_input:
        raise ValueError(
            f"{what} needs the unweighted expert outputs: not compatible with "
            "moe_apply_probs_on_input"
        )
    if config.moe_router_topk < 2:
        raise ValueError(
            f"{what} compares the outputs of one token's k experts: it needs moe_router_topk >= 2, "
            f"got {config.moe_router_topk}"
        )
    if config.moe_token_dispatcher_type not in ("allgather", "alltoall"):
        raise ValueError(
            f"{what} supports moe_token_dispatcher_type 'allgather' and 'alltoall', got "
            f"{config.moe_token_dispatcher_type!r}"
        )
    # each of these changes which rows come back from the combine (padding rows, split schedules,
    # graphs)
    for field in (
        "moe_pad_expert_input_to_capacity",
        "moe_router_padding_for_quantization",
        "moe_router_padding_for_fp8",
        "overlap_moe_expert_parallel_comm",
    ):
        if getattr(config, field, False):
            raise ValueError(f"{what} is not supported with {field}")
    if getattr(config, "cuda_graph_impl", "none") not in (None, "none"):
        raise ValueError(
            f"{what} is not supported with cuda_graph_impl={config.cuda_graph_impl!r} (use 'none')"
        )


def _resolve_dpsl_coeff(coeff, slot: float) -> float:
    """λ from ``moe_dpsl_coeff`` and dpsl's slot of ``moe_aux_loss_coeff`` (the module docstring's
    rule)."""
    if not math.isfinite(slot) or slot < 0:
        raise ValueError(
            f"{AUX_LOSS_COEFF_FIELD}: the value in dpsl's slot is λ and must be >= 0, got {slot}"
        )
    if coeff is None:
        return slot if slot != 0.0 else DEFAULT_DPSL_COEFF
    if (
        isinstance(coeff, bool)
        or not isinstance(coeff, (int, float))
        or not math.isfinite(coeff)
        or coeff < 0
    ):
        raise ValueError(f"moe_dpsl_coeff: must be >= 0 and finite, got {coeff!r}")
    if slot not in (0.0, coeff):
        raise ValueError(
            f"moe_dpsl_coeff: {coeff} disagrees with {slot} in dpsl's slot of "
            f"{AUX_LOSS_COEFF_FIELD}; give one "
            "of them (or the same value)"
        )
    return float(coeff)
