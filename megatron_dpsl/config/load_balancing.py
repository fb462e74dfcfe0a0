"""The load-balancing types this plugin adds to Megatron's, and how their coefficients are read.

Megatron-Core takes ``moe_router_load_balancing_type`` as one name or a list of names, with
``moe_aux_loss_coeff`` one coefficient or one per name. The plugin's types ride in the same two
fields (``--moe-router-load-balancing-type aux_loss dpsl --moe-aux-loss-coeff 1e-3 0.01``), so
Megatron-LM's command line and saved ``args`` need nothing new. Megatron's own code must only ever
see its own types: :func:`split_load_balancing` separates the two.

Free of Megatron and torch: the flag layer (``megatron_lm/args.py``) and the config share these
names without either importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DPSL_TYPE = "dpsl"
"""The ``moe_router_load_balancing_type`` entry that enables DPSL."""

VARIANCE_TYPE = "variance"
"""The type that enables the variance loss of Guo et al. (router side; docs/regularizers.md)."""

ORTHOGONALITY_TYPE = "orthogonality"
"""The type that enables the orthogonality loss of Guo et al. (expert side;
docs/regularizers.md)."""

PLUGIN_LOAD_BALANCING_TYPES = (DPSL_TYPE, VARIANCE_TYPE, ORTHOGONALITY_TYPE)
"""Every load-balancing type this plugin adds (argparse choices, config split, log names)."""

LOSS_FORMS = ("paper", "reference_code")
"""Values of ``moe_variance_loss_form`` / ``moe_orthogonality_loss_form`` (docs/regularizers.md)."""

MEGATRON_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
"""Megatron-LM core_v0.16.1's choices; used only where a parser does not define the flag itself."""

KNOWN_MEGATRON_TYPES = (*MEGATRON_LOAD_BALANCING_TYPES, "quantile_balancing")
"""Megatron's types the config accepts: core_v0.16.1's plus those newer releases added (0.19:
quantile_balancing)."""

GATHER_CHOICES = ("micro_batch", "global_batch")
"""Values of ``moe_dpsl_gather`` (docs/parallelism.md)."""

LOAD_BALANCING_FIELD = "moe_router_load_balancing_type"
AUX_LOSS_COEFF_FIELD = "moe_aux_loss_coeff"


def as_list(value) -> list:
    """``None`` -> ``[]``, a list/tuple -> a list, anything else -> ``[value]``."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def plugin_types_in(load_balancing_type) -> list[str]:
    """The plugin's types named by ``load_balancing_type`` (a string or a list), in order."""
    return [t for t in as_list(load_balancing_type) if t in PLUGIN_LOAD_BALANCING_TYPES]


@dataclass(frozen=True)
class LoadBalancingSplit:
    """``moe_router_load_balancing_type`` / ``moe_aux_loss_coeff`` split into Megatron's part and
    ours.

    Attributes:
        stock_type: what Megatron's code should see: the user's value without the plugin's types (a
            list that shrinks to one entry becomes a string, an empty one ``"none"``).
        stock_coeff: the matching ``moe_aux_loss_coeff`` (a float for a string type, ``0.0`` for
            "none").
        plugin_coeffs: ``{type: coefficient slot}`` for each plugin type named; the slot is the
            ``moe_aux_loss_coeff`` entry at that type's position (``0.0`` when no coefficient was
            given).
    """

    stock_type: str | list[str]
    stock_coeff: float | list[float]
    plugin_coeffs: dict[str, float] = field(default_factory=dict)


def split_load_balancing(load_balancing_type, aux_loss_coeff) -> LoadBalancingSplit:
    """Split the two Megatron fields; ``ValueError`` (naming the field) when they do not fit
    together."""
    ours = plugin_types_in(load_balancing_type)
    if not ours:
        return LoadBalancingSplit(load_balancing_type, aux_loss_coeff)
    types = as_list(load_balancing_type)
    for name in ours:
        if types.count(name) > 1:
            raise ValueError(f"{LOAD_BALANCING_FIELD} lists {name!r} more than once: {types}")
    coeffs = as_list(aux_loss_coeff)
    if isinstance(load_balancing_type, str) and len(coeffs) <= 1:
        coeffs = coeffs or [0.0]
    elif len(coeffs) != len(types):
        raise ValueError(
            f"{AUX_LOSS_COEFF_FIELD}: expected {len(types)} values (one per {LOAD_BALANCING_FIELD} "
            f"{' '.join(types)}), got {len(coeffs)}"
        )
    plugin = {t: float(c) for t, c in zip(types, coeffs) if t in PLUGIN_LOAD_BALANCING_TYPES}
    rest = [(t, c) for t, c in zip(types, coeffs) if t not in PLUGIN_LOAD_BALANCING_TYPES]
    if not rest:
        return LoadBalancingSplit("none", 0.0, plugin)
    if len(rest) == 1:
        return LoadBalancingSplit(rest[0][0], rest[0][1], plugin)
    return LoadBalancingSplit([t for t, _ in rest], [c for _, c in rest], plugin)
