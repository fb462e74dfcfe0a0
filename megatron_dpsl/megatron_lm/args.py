"""Megatron-LM command-line flags for DPSL and their mapping onto ``DPSLTransformerConfig``.

``add_dpsl_args(parser)`` is a Megatron-LM ``extra_args_provider``: it adds the ``--moe-dpsl-*``
flags and lets ``--moe-router-load-balancing-type`` take ``dpsl`` (alone or in Megatron's list
form, e.g. ``aux_loss dpsl`` with one ``--moe-aux-loss-coeff`` per type), and likewise ``variance``
and ``orthogonality`` (Guo et al.; coefficients in their ``--moe-aux-loss-coeff`` slots) with their
``--moe-variance-loss-form`` / ``--moe-orthogonality-loss-form`` flags.

``dpsl_config_from_args(args)`` copies the parsed namespace onto ``DPSLTransformerConfig`` by
dataclass field name, as Megatron-LM's ``core_transformer_config_from_args`` does. The config
decides what is valid; this module only checks what the config cannot see (which flags were typed,
``check_given_flags``) and rewrites the config's field names as flags in its errors
(``translate_config_error``), so every error names the flag.

This module imports nothing from Megatron at import time, so the flag reference
(``python -m megatron_dpsl.megatron_lm.docs``) builds without megatron-core.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from megatron_dpsl.config.layer_freq import LayerFreqError, parse_layer_freq
from megatron_dpsl.config.load_balancing import (
    DPSL_TYPE,
    GATHER_CHOICES,
    LOSS_FORMS,
    MEGATRON_LOAD_BALANCING_TYPES,
    ORTHOGONALITY_TYPE,
    PLUGIN_LOAD_BALANCING_TYPES,
    VARIANCE_TYPE,
    plugin_types_in,
)

LOAD_BALANCING_FLAG = "--moe-router-load-balancing-type"
AUX_LOSS_COEFF_FLAG = "--moe-aux-loss-coeff"

DPSL_FIELDS = (
    "moe_dpsl_coeff",
    "moe_dpsl_alpha",
    "moe_dpsl_group_alphas",
    "moe_dpsl_alpha_base",
    "moe_dpsl_alpha_shift",
    "moe_dpsl_num_groups",
    "moe_dpsl_gather",
    "moe_dpsl_log_interval",
)

TOKEN_GROUP_SOURCES = ("dataset", "modality")
"""Values of ``--moe-dpsl-token-groups``: where a token's prior group comes from."""

LAUNCHER_FIELDS = ("moe_dpsl_token_groups", "moe_dpsl_vision_group")
"""``--moe-dpsl-*`` flags that are no config field: the entry point reads them (where each token's
group comes from), the router only sees the ids."""

AC_FIELDS = ("moe_ac_layers", "moe_ac_eps", "moe_ac_clip", "moe_ac_weight_norm")
"""The Adaptive-Clustering router's fields (``--moe-ac-*``, docs/ac_router.md)."""

# The variance/orthogonality loss flags: (flag, config field, the load-balancing type they belong
# to).
REGULARIZER_FLAGS = (
    ("--moe-variance-loss-form", "moe_variance_loss_form", VARIANCE_TYPE),
    ("--moe-orthogonality-loss-form", "moe_orthogonality_loss_form", ORTHOGONALITY_TYPE),
)
REGULARIZER_FIELDS = tuple(field for _, field, _ in REGULARIZER_FLAGS)

# Config field -> flag, for fields whose flag is not simply "--" + name.replace("_", "-").
_FIELD_FLAGS = {"num_moe_experts": "--num-experts"}


def flag_for_field(name: str) -> str:
    """The Megatron-LM flag that fills config field ``name`` (``moe_dpsl_alpha`` ->
    ``--moe-dpsl-alpha``)."""
    return _FIELD_FLAGS.get(name, "--" + name.replace("_", "-"))


def _group_alphas(value: str) -> list[list[float]]:
    """argparse type of ``--moe-dpsl-group-alphas``: inline JSON, or a path to a JSON file."""
    text = value.strip()
    if not text.startswith("["):
        if not os.path.isfile(text):
            raise argparse.ArgumentTypeError(
                "expected a JSON list of lists (e.g. '[[2,2,1,1],[1,1,2,2]]') or the path of "
                "a JSON file "
                f"holding one; {value!r} is neither"
            )
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({e.msg} at char {e.pos}): {value!r}"
        ) from None
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, list) and r for r in rows)
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for r in rows for x in r)
    ):
        raise argparse.ArgumentTypeError(
            "expected a non-empty list of non-empty lists of numbers "
            f"([num_groups][num_experts]), got {rows!r}"
        )
    return [[float(x) for x in r] for r in rows]


def _find_action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action | None:
    # argparse has no public lookup by dest; Megatron-LM's own scripts read parser._actions too.
    for action in parser._actions:
        if action.dest == dest:
            return action
    return None


def add_moe_load_balancing_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--moe-router-load-balancing-type`` and ``--moe-aux-loss-coeff`` as Megatron-LM defines
    them, with ``dpsl`` among the types, to a parser that lacks them (a standalone trainer's
    parser).

    Flags the parser already has are left alone (``add_dpsl_args`` widens their choices instead).
    """
    if _find_action(parser, "moe_router_load_balancing_type") is None:
        parser.add_argument(
            LOAD_BALANCING_FLAG,
            nargs="+",
            type=str,
            choices=[*MEGATRON_LOAD_BALANCING_TYPES, *PLUGIN_LOAD_BALANCING_TYPES],
            default="aux_loss",
            help="Router load-balancing strategy, one or several (each with its own "
            "--moe-aux-loss-coeff). "
            "'dpsl' adds the Dirichlet-Prior Shaping Loss; it combines with aux_loss, "
            "seq_aux_loss, "
            "global_aux_loss or none. 'variance' and 'orthogonality' add the losses of Guo et "
            "al. (2025), "
            "see --moe-variance-loss-form / --moe-orthogonality-loss-form.",
        )
    if _find_action(parser, "moe_aux_loss_coeff") is None:
        parser.add_argument(
            AUX_LOSS_COEFF_FLAG,
            type=float,
            nargs="+",
            default=0.0,
            help="Coefficient of each load-balancing loss, one per "
            "--moe-router-load-balancing-type. "
            "The value in dpsl's slot, when non-zero, is the DPSL coefficient (same as "
            "--moe-dpsl-coeff); "
            "the values in the variance and orthogonality slots are those losses' coefficients "
            "(>= 0).",
        )
    return parser


def _layer_freq_type(value: str):
    """argparse type of Megatron-LM's ``--moe-layer-freq``: its syntax, without its ``eval``."""
    try:
        return parse_layer_freq(value)
    except LayerFreqError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parse_layer_freq_safely(parser: argparse.ArgumentParser) -> None:
    # Megatron-LM's moe_freq_type hands a pattern to eval ('[9**9**9]' never returns); every parse
    # that has this provider reads it with the bounded parser instead (same results)
    action = _find_action(parser, "moe_layer_freq")
    if action is not None:
        action.type = _layer_freq_type


def add_dpsl_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: add the DPSL flags (and the ``--moe-ac-*`` flags of the
    Adaptive Clustering router) and accept ``dpsl`` as a load-balancing type.

    If ``parser`` defines ``--moe-router-load-balancing-type`` (Megatron-LM's parser does), ``dpsl``
    is appended to its choices; if it does not, nothing is added for it (call
    ``add_moe_load_balancing_args`` for a standalone parser). Calling it twice is harmless (the
    patched Megatron-LM adds the flags itself and a launcher may pass this provider too). A
    ``--moe-layer-freq`` the parser has is read by ``megatron_dpsl.config.layer_freq``
    (Megatron-LM's syntax without its ``eval``). Returns ``parser``.
    """
    _parse_layer_freq_safely(parser)
    if _find_action(parser, "moe_dpsl_coeff") is not None:
        _add_ac_args(parser)  # a parser that got the DPSL flags before the AC router existed
        return parser
    action = _find_action(parser, "moe_router_load_balancing_type")
    missing = [
        t
        for t in PLUGIN_LOAD_BALANCING_TYPES
        if action is not None and action.choices is not None and t not in action.choices
    ]
    if missing:
        action.choices = [*action.choices, *missing]
        if action.help:
            action.help += (
                " 'dpsl' (megatron-dpsl) adds the Dirichlet-Prior Shaping Loss, see --moe-dpsl-*; "
                "'variance' and 'orthogonality' the losses of Guo et al. (2025)."
            )

    group = parser.add_argument_group(
        title="dpsl",
        description="Dirichlet-Prior Shaping Loss (megatron-dpsl). On when "
        "--moe-router-load-balancing-type "
        "includes 'dpsl'.",
    )
    group.add_argument(
        "--moe-dpsl-coeff",
        type=float,
        default=None,
        help="DPSL coefficient λ (config default 0.01). In the list form of "
        "--moe-router-load-balancing-type "
        "a non-zero --moe-aux-loss-coeff value in dpsl's slot sets it too; the two must agree "
        "if both are given.",
    )
    group.add_argument(
        "--moe-dpsl-alpha",
        type=float,
        nargs="+",
        default=None,
        help="Dirichlet prior α: one value (symmetric prior, default 1.0) or one per expert "
        "(--num-experts "
        "values). α < 1 pushes routing towards confident, sparse distributions; α > 1 towards "
        "uniform.",
    )
    group.add_argument(
        "--moe-dpsl-group-alphas",
        type=_group_alphas,
        default=None,
        metavar="JSON_OR_PATH",
        help="Per-group priors [num_groups][num_experts], as inline JSON (e.g. "
        "'[[2,2,1,1],[1,1,2,2]]') or "
        "the path of a JSON file holding that list. Token g's prior is row group_id[g]; the "
        "data must "
        "supply per-token group ids. Excludes --moe-dpsl-alpha and the "
        "--moe-dpsl-alpha-base/shift shortcut.",
    )
    group.add_argument(
        "--moe-dpsl-alpha-base",
        type=float,
        default=None,
        help="Modality/task prior shortcut (paper Sec. 3.4): α_b, the prior on experts outside a "
        "group's "
        "block. Needs --moe-dpsl-alpha-shift and --moe-dpsl-num-groups.",
    )
    group.add_argument(
        "--moe-dpsl-alpha-shift",
        type=float,
        default=None,
        help="Modality/task prior shortcut: α_s, added to α_b on the group's own contiguous block "
        "of "
        "num_experts / num_groups experts.",
    )
    group.add_argument(
        "--moe-dpsl-num-groups",
        type=int,
        default=None,
        help="Number of token groups (modalities/tasks) for the α_b/α_s shortcut; must divide "
        "--num-experts.",
    )
    group.add_argument(
        "--moe-dpsl-token-groups",
        type=str,
        choices=list(TOKEN_GROUP_SOURCES),
        default=None,
        help="Where a token's prior group comes from (group priors only). dataset: the index of "
        "its sample's "
        "dataset in the --data-path blend (patched pretrain_gpt.py, where it is the default). "
        "modality: image "
        "rows vs text, computed from each batch by megatron_dpsl.megatron_lm.pretrain_vlm (which "
        "needs it; "
        "see --moe-dpsl-vision-group).",
    )
    group.add_argument(
        "--moe-dpsl-vision-group",
        type=int,
        default=None,
        help="With --moe-dpsl-token-groups modality: the prior group (row) vision tokens take, 0 "
        "or 1 (default "
        "0); text tokens take the other. With the α_b/α_s shortcut group g favours the g-th block "
        "of "
        "num_experts/num_groups experts: 0 gives vision the first half of the experts, 1 the "
        "second.",
    )
    group.add_argument(
        "--moe-dpsl-gather",
        type=str,
        choices=list(GATHER_CHOICES),
        default="micro_batch",
        help="Tokens one DPSL loss covers. micro_batch: every token of the micro-batch the layer "
        "sees, "
        "gathered over TP (sequence parallel), CP and EP ranks holding different tokens. "
        "global_batch: "
        "additionally over data-parallel ranks (closer to the paper's whole-batch loss, one "
        "more all-gather).",
    )
    group.add_argument(
        "--moe-dpsl-log-interval",
        type=int,
        default=100,
        help="Steps between routing diagnostics (expert-load CoV, entropy, distance to prior); 0 "
        "disables. "
        "Other steps add no communication.",
    )
    _add_ac_args(parser)
    _add_regularizer_args(parser)
    return parser


def _clip(value: str):
    """argparse type of ``--moe-ac-clip``: a number, or ``none`` for no cap."""
    if value.strip().lower() == "none":
        return "none"
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {value!r}") from None


def _add_ac_args(parser: argparse.ArgumentParser) -> None:
    """The Adaptive-Clustering router flags (idempotent); values are checked by the config."""
    if _find_action(parser, "moe_ac_layers") is not None:
        return
    from megatron_dpsl.config.ac import WEIGHT_NORMS

    group = parser.add_argument_group(
        title="adaptive clustering router",
        description="The Adaptive Clustering (AC) router of Nielsen et al., ICLR 2025 "
        "(megatron-dpsl, "
        "docs/ac_router.md). On when --moe-ac-layers names layers; combines with every "
        "load-balancing type.",
    )
    group.add_argument(
        "--moe-ac-layers",
        type=int,
        nargs="+",
        default=None,
        help="Layer numbers (1-based, whole model) of the MoE layers whose router uses AC: tokens "
        "are scored "
        "after reweighting their features by the tightness of the cluster (expert) the "
        "previous MoE layer "
        "put them in. Each must be an MoE layer with an earlier MoE layer (the paper keeps the "
        "first MoE "
        "layers standard). The first AC layer of a pipeline stage whose previous MoE layer is "
        "on another "
        "stage routes without AC.",
    )
    group.add_argument(
        "--moe-ac-eps",
        type=float,
        default=None,
        help="Added to each cluster's per-feature mean absolute deviation before inverting it "
        "(config default 1e-4).",
    )
    group.add_argument(
        "--moe-ac-clip",
        type=_clip,
        default=None,
        metavar="FLOAT_OR_NONE",
        help="Cap on the AC feature weights as a multiple of their mean before the cap (config "
        "default 10, the official language-model code; its Swin code uses 1.5); 'none' disables "
        "the cap.",
    )
    group.add_argument(
        "--moe-ac-weight-norm",
        type=str,
        choices=list(WEIGHT_NORMS),
        default=None,
        help="Normalisation of the AC weights (config default feature): feature = each feature's "
        "weights average 1 over the clusters (official language-model code); cluster = each "
        "cluster's weights average 1 over the features; global = all weights divided by their "
        "mean before the cap (official Swin code's compute_cosa; with --moe-ac-clip 1.5 it is "
        "that recipe).",
    )


def _add_regularizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        title="variance and orthogonality losses",
        description="Guo et al. (2025, arXiv 2505.22323), megatron-dpsl: on when "
        "--moe-router-load-balancing-type "
        "includes 'variance' / 'orthogonality'; each coefficient is that type's "
        "--moe-aux-loss-coeff value.",
    )
    group.add_argument(
        "--moe-variance-loss-form",
        type=str,
        choices=list(LOSS_FORMS),
        default=None,
        help="paper (default): Eq. 7, minus each expert's variance of the post-top-k routing "
        "probabilities "
        "across the batch's tokens (those --moe-dpsl-gather names). reference_code: the "
        "official code, minus "
        "the per-token variance of the full softmax across experts.",
    )
    group.add_argument(
        "--moe-orthogonality-loss-form",
        type=str,
        choices=list(LOSS_FORMS),
        default=None,
        help="paper (default): Eq. 6 / (k·N), squared projections of each of a token's k "
        "unweighted "
        "expert "
        "outputs onto each other one. reference_code: onto the span of the other k-1 (the "
        "official code).",
    )


# ---------------------------------------------------------------------------------------------
# Namespace -> config


def _scalar_if_single(value: Any) -> Any:
    # Megatron-LM's validate_args turns one-element lists into scalars; standalone parsers skip it.
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


def plugin_enabled(args: argparse.Namespace) -> bool:
    """Whether the run needs the plugin's config and spec: a plugin load-balancing type (``dpsl``,
    ``variance``, ``orthogonality``) or ``--moe-ac-layers``
    (``DPSLTransformerConfig.moe_plugin_enabled``)."""
    return bool(plugin_types_in(getattr(args, "moe_router_load_balancing_type", None))) or bool(
        getattr(args, "moe_ac_layers", None)
    )


def dpsl_enabled(args: argparse.Namespace) -> bool:
    """Whether ``--moe-router-load-balancing-type`` includes ``dpsl``."""
    return DPSL_TYPE in plugin_types_in(getattr(args, "moe_router_load_balancing_type", None))


# Flags whose presence (not value) matters: argparse default None means "not given".
_PRIOR_SOURCES = (
    ("--moe-dpsl-alpha", ("moe_dpsl_alpha",)),
    ("--moe-dpsl-group-alphas", ("moe_dpsl_group_alphas",)),
    (
        "--moe-dpsl-alpha-base/--moe-dpsl-alpha-shift/--moe-dpsl-num-groups",
        ("moe_dpsl_alpha_base", "moe_dpsl_alpha_shift", "moe_dpsl_num_groups"),
    ),
)


def check_given_flags(args: argparse.Namespace) -> None:
    """What only the command line can tell (the config sees values, not which flags were typed).

    A DPSL flag given without ``dpsl`` in the load-balancing types (or a ``--moe-*-loss-form`` flag
    without its type) would be ignored, and two ways of giving the prior would silently shadow one
    another: both raise ``ValueError`` naming the flag.
    Every rule about values lives in ``DPSLTransformerConfig``.
    """
    given = [
        flag
        for flag, names in _PRIOR_SOURCES
        if any(getattr(args, n, None) is not None for n in names)
    ]
    if getattr(args, "moe_dpsl_coeff", None) is not None:
        given.append("--moe-dpsl-coeff")
    if given and not dpsl_enabled(args):
        raise ValueError(
            f"{given[0].split('/')[0]}: DPSL flags need {LOAD_BALANCING_FLAG} to include "
            "'dpsl' (e.g. "
            f"'{LOAD_BALANCING_FLAG} dpsl' or 'aux_loss dpsl'), got "
            f"{getattr(args, 'moe_router_load_balancing_type', None)!r}"
        )
    priors = [flag for flag in given if flag != "--moe-dpsl-coeff"]
    if len(priors) > 1:
        raise ValueError(
            f"{priors[1].split('/')[0]}: give only one prior, got {' and '.join(priors)}"
        )
    _check_token_group_flags(args, bool(priors) and priors[0] != "--moe-dpsl-alpha")
    ac_given = [flag_for_field(n) for n in AC_FIELDS[1:] if getattr(args, n, None) is not None]
    if ac_given and not getattr(args, "moe_ac_layers", None):
        raise ValueError(
            f"{ac_given[0]}: the Adaptive Clustering flags need --moe-ac-layers (the layers "
            "that use AC)"
        )
    types = plugin_types_in(getattr(args, "moe_router_load_balancing_type", None))
    for flag, field, needed in REGULARIZER_FLAGS:
        if getattr(args, field, None) is not None and needed not in types:
            raise ValueError(
                f"{flag} needs {LOAD_BALANCING_FLAG} to include '{needed}', got "
                f"{getattr(args, 'moe_router_load_balancing_type', None)!r}"
            )


def _check_token_group_flags(args: argparse.Namespace, group_priors: bool) -> None:
    source = getattr(args, "moe_dpsl_token_groups", None)
    if source is not None and not group_priors:
        raise ValueError(
            f"--moe-dpsl-token-groups {source}: names where each token's prior group comes from; "
            "it needs "
            "group priors (--moe-dpsl-group-alphas, or "
            "--moe-dpsl-alpha-base/--moe-dpsl-alpha-shift/"
            "--moe-dpsl-num-groups)"
        )
    vision = getattr(args, "moe_dpsl_vision_group", None)
    if vision is not None and source != "modality":
        raise ValueError(
            "--moe-dpsl-vision-group: only used with --moe-dpsl-token-groups modality, got "
            f"{source or 'none'}"
        )


VLM_LAUNCHER_HINT = "modality priors need python -m megatron_dpsl.megatron_lm.pretrain_vlm"


def require_token_groups(
    args: argparse.Namespace, supported: tuple, entry: str, hint: str = VLM_LAUNCHER_HINT
) -> None:
    """``ValueError`` when ``--moe-dpsl-token-groups`` names a source ``entry`` cannot supply.

    ``entry``: what the run is (``"pretrain_gpt"``, ...), for the message; ``supported``: its
    sources; ``hint``: where modality priors are available instead.
    """
    source = getattr(args, "moe_dpsl_token_groups", None)
    if source is None or source in supported:
        return
    if source == "modality":
        raise ValueError(
            f"--moe-dpsl-token-groups modality: {entry} has no vision encoder, so no token is an "
            f"image; {hint} (here: {', '.join(supported)})"
        )
    raise ValueError(
        f"--moe-dpsl-token-groups {source}: {entry} cannot supply it; allowed here: "
        f"{', '.join(supported)}"
    )


def translate_config_error(message: str) -> str:
    """Rewrite config field names in ``message`` as their flags (``moe_dpsl_alpha`` ->
    ``--moe-dpsl-alpha``)."""
    return re.sub(
        r"(?<![\w-])(moe_[a-z0-9_]+|num_moe_experts|overlap_moe_expert_parallel_comm|cuda_graph_impl)\b",
        lambda m: flag_for_field(m.group(1)),
        message,
    )


@contextlib.contextmanager
def flag_errors() -> Iterator[None]:
    """Re-raise a config ``ValueError`` with field names rewritten as flags (wrap config
    construction)."""
    try:
        yield
    except ValueError as e:
        translated = translate_config_error(str(e))
        if translated == str(e):
            raise
        raise ValueError(translated) from e


def dpsl_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` ready for a copy by field name (``args`` itself is not changed).

    Checks the flags given (``check_given_flags``), normalises the list forms as Megatron-LM's
    ``validate_args`` does and drops DPSL flags that were not given, so their fields keep the config
    defaults instead of receiving ``None``. ``moe_dpsl_coeff`` stays ``None`` when not given: the
    config then takes λ from dpsl's slot of ``--moe-aux-loss-coeff``.
    """
    check_given_flags(args)
    ns = argparse.Namespace(**vars(args))
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_dpsl_alpha"):
        if getattr(ns, name, None) is not None:
            setattr(ns, name, _scalar_if_single(getattr(ns, name)))
    for name in (*DPSL_FIELDS, *REGULARIZER_FIELDS):
        if name != "moe_dpsl_coeff" and getattr(ns, name, None) is None and hasattr(ns, name):
            delattr(ns, name)
    for name in AC_FIELDS:
        if getattr(ns, name, None) is None and hasattr(ns, name):
            delattr(ns, name)
    if getattr(ns, "moe_ac_clip", None) == "none":
        ns.moe_ac_clip = None
    return ns


def _default_config_class():
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    return DPSLTransformerConfig


def dpsl_config_from_args(args: argparse.Namespace, config_class=None, **overrides):
    """Build the DPSL config from parsed flags, copying by dataclass field name.

    Mirrors Megatron-LM's ``core_transformer_config_from_args(args, config_class)``: every field of
    ``config_class`` (default ``DPSLTransformerConfig``) that the namespace has is copied, after the
    DPSL checks and normalisation of ``dpsl_namespace``; ``--num-experts`` fills
    ``num_moe_experts``.
    ``overrides`` (keyword arguments, applied last) carry what a standalone trainer derives itself,
    e.g. ``activation_func``. Errors are ``ValueError`` naming the flag.

    Inside Megatron-LM's own flow use ``megatron_lm_config_from_args``, which keeps Megatron-LM's
    translations (swiglu, GQA, pipeline dtype, ...).
    """
    config_class = config_class or _default_config_class()
    ns = dpsl_namespace(args)
    kw = {
        f.name: getattr(ns, f.name) for f in dataclasses.fields(config_class) if hasattr(ns, f.name)
    }
    if getattr(ns, "num_experts", None) is not None:
        kw["num_moe_experts"] = ns.num_experts
    kw.update(overrides)
    with flag_errors():
        return config_class(**kw)


def megatron_lm_config_from_args(args: argparse.Namespace, config_class=None):
    """Megatron-LM's ``core_transformer_config_from_args`` with the DPSL config class and flag
    checks.

    Needs Megatron-LM's ``megatron/training`` on ``sys.path``; ``args`` is not changed.
    """
    from megatron.training.arguments import core_transformer_config_from_args

    config_class = config_class or _default_config_class()
    with flag_errors():
        config = core_transformer_config_from_args(dpsl_namespace(args), config_class=config_class)
    ours = plugin_types_in(getattr(args, "moe_router_load_balancing_type", None))
    if ours and not isinstance(config, config_class):
        # Megatron-LM swaps in MLATransformerConfig / HeterogeneousTransformerConfig, dropping the
        # plugin's fields.
        flag = (
            "--multi-latent-attention"
            if getattr(args, "multi_latent_attention", False)
            else ("--heterogeneous-layers-config-path")
        )
        raise ValueError(
            f"{flag}: Megatron-LM builds a {type(config).__name__} for it, which has no DPSL "
            "fields; "
            f"not supported with {LOAD_BALANCING_FLAG} {ours[0]}"
        )
    return config
