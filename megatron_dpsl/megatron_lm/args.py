"""Megatron-LM command-line flags for DPSL and their mapping onto ``DPSLTransformerConfig``.

``add_dpsl_args(parser)`` is a Megatron-LM ``extra_args_provider``: it adds the ``--moe-dpsl-*``
flags and lets ``--moe-router-load-balancing-type`` take ``dpsl`` (alone or in Megatron's list
form, e.g. ``aux_loss dpsl`` with one ``--moe-aux-loss-coeff`` per type).

``dpsl_config_from_args(args)`` copies the parsed namespace onto ``DPSLTransformerConfig`` by
dataclass field name, as Megatron-LM's ``core_transformer_config_from_args`` does, after checking
the DPSL flags against each other and against ``--num-experts``. Every error names the flag.

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
from typing import Any, Iterator, Optional

DPSL_TYPE = "dpsl"
# Every --moe-router-load-balancing-type this plugin adds to Megatron-LM's choices (one place: the
# parser hook, the standalone parser and the MoE metrics whitelist all read it).
PLUGIN_LOAD_BALANCING_TYPES = (DPSL_TYPE,)
LOAD_BALANCING_FLAG = "--moe-router-load-balancing-type"
AUX_LOSS_COEFF_FLAG = "--moe-aux-loss-coeff"
GATHER_CHOICES = ("micro_batch", "global_batch")
# Megatron-LM core_v0.16.1's choices; used only when the parser does not define the flag itself.
MEGATRON_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")

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

# Config field -> flag, for fields whose flag is not simply "--" + name.replace("_", "-").
_FIELD_FLAGS = {"num_moe_experts": "--num-experts"}


def flag_for_field(name: str) -> str:
    """The Megatron-LM flag that fills config field ``name`` (``moe_dpsl_alpha`` -> ``--moe-dpsl-alpha``)."""
    return _FIELD_FLAGS.get(name, "--" + name.replace("_", "-"))


def _group_alphas(value: str) -> list[list[float]]:
    """argparse type of ``--moe-dpsl-group-alphas``: inline JSON, or a path to a JSON file."""
    text = value.strip()
    if not text.startswith("["):
        if not os.path.isfile(text):
            raise argparse.ArgumentTypeError(
                f"expected a JSON list of lists (e.g. '[[2,2,1,1],[1,1,2,2]]') or the path of a JSON file "
                f"holding one; {value!r} is neither"
            )
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at char {e.pos}): {value!r}") from None
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, list) and r for r in rows)
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for r in rows for x in r)
    ):
        raise argparse.ArgumentTypeError(
            f"expected a non-empty list of non-empty lists of numbers ([num_groups][num_experts]), got {rows!r}"
        )
    return [[float(x) for x in r] for r in rows]


def _find_action(parser: argparse.ArgumentParser, dest: str) -> Optional[argparse.Action]:
    # argparse has no public lookup by dest; Megatron-LM's own scripts read parser._actions too.
    for action in parser._actions:
        if action.dest == dest:
            return action
    return None


def add_moe_load_balancing_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--moe-router-load-balancing-type`` and ``--moe-aux-loss-coeff`` as Megatron-LM defines them,
    with ``dpsl`` among the types, to a parser that lacks them (a standalone trainer's parser).

    Flags the parser already has are left alone (``add_dpsl_args`` widens their choices instead).
    """
    if _find_action(parser, "moe_router_load_balancing_type") is None:
        parser.add_argument(
            LOAD_BALANCING_FLAG,
            nargs="+",
            type=str,
            choices=[*MEGATRON_LOAD_BALANCING_TYPES, *PLUGIN_LOAD_BALANCING_TYPES],
            default="aux_loss",
            help="Router load-balancing strategy, one or several (each with its own --moe-aux-loss-coeff). "
            "'dpsl' adds the Dirichlet-Prior Shaping Loss; it combines with aux_loss, seq_aux_loss, "
            "global_aux_loss or none.",
        )
    if _find_action(parser, "moe_aux_loss_coeff") is None:
        parser.add_argument(
            AUX_LOSS_COEFF_FLAG,
            type=float,
            nargs="+",
            default=0.0,
            help="Coefficient of each load-balancing loss, one per --moe-router-load-balancing-type. "
            "The value in dpsl's slot, when non-zero, is the DPSL coefficient (same as --moe-dpsl-coeff).",
        )
    return parser


def add_dpsl_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: add the DPSL flags and accept ``dpsl`` as a load-balancing type.

    If ``parser`` defines ``--moe-router-load-balancing-type`` (Megatron-LM's parser does), ``dpsl`` is
    appended to its choices; if it does not, nothing is added for it (call
    ``add_moe_load_balancing_args`` for a standalone parser). Calling it twice is harmless (the patched
    Megatron-LM adds the flags itself and a launcher may pass this provider too). Returns ``parser``.
    """
    if _find_action(parser, "moe_dpsl_coeff") is not None:
        return parser
    action = _find_action(parser, "moe_router_load_balancing_type")
    missing = [t for t in PLUGIN_LOAD_BALANCING_TYPES if action is not None and action.choices is not None
               and t not in action.choices]
    if missing:
        action.choices = [*action.choices, *missing]
        if action.help and DPSL_TYPE in missing:
            action.help += " 'dpsl' (megatron-dpsl) adds the Dirichlet-Prior Shaping Loss, see --moe-dpsl-*."

    group = parser.add_argument_group(
        title="dpsl",
        description="Dirichlet-Prior Shaping Loss (megatron-dpsl). On when --moe-router-load-balancing-type "
        "includes 'dpsl'.",
    )
    group.add_argument(
        "--moe-dpsl-coeff",
        type=float,
        default=None,
        help="DPSL coefficient λ (config default 0.01). In the list form of --moe-router-load-balancing-type "
        "a non-zero --moe-aux-loss-coeff value in dpsl's slot sets it too; the two must agree if both are given.",
    )
    group.add_argument(
        "--moe-dpsl-alpha",
        type=float,
        nargs="+",
        default=None,
        help="Dirichlet prior α: one value (symmetric prior, default 1.0) or one per expert (--num-experts "
        "values). α < 1 pushes routing towards confident, sparse distributions; α > 1 towards uniform.",
    )
    group.add_argument(
        "--moe-dpsl-group-alphas",
        type=_group_alphas,
        default=None,
        metavar="JSON_OR_PATH",
        help="Per-group priors [num_groups][num_experts], as inline JSON (e.g. '[[2,2,1,1],[1,1,2,2]]') or "
        "the path of a JSON file holding that list. Token g's prior is row group_id[g]; the data must "
        "supply per-token group ids. Excludes --moe-dpsl-alpha and the --moe-dpsl-alpha-base/shift shortcut.",
    )
    group.add_argument(
        "--moe-dpsl-alpha-base",
        type=float,
        default=None,
        help="Modality/task prior shortcut (paper Sec. 3.4): α_b, the prior on experts outside a group's "
        "block. Needs --moe-dpsl-alpha-shift and --moe-dpsl-num-groups.",
    )
    group.add_argument(
        "--moe-dpsl-alpha-shift",
        type=float,
        default=None,
        help="Modality/task prior shortcut: α_s, added to α_b on the group's own contiguous block of "
        "num_experts / num_groups experts.",
    )
    group.add_argument(
        "--moe-dpsl-num-groups",
        type=int,
        default=None,
        help="Number of token groups (modalities/tasks) for the α_b/α_s shortcut; must divide --num-experts.",
    )
    group.add_argument(
        "--moe-dpsl-gather",
        type=str,
        choices=list(GATHER_CHOICES),
        default="micro_batch",
        help="Tokens one DPSL loss covers. micro_batch: every token of the micro-batch the layer sees, "
        "gathered over TP (sequence parallel), CP and EP ranks holding different tokens. global_batch: "
        "additionally over data-parallel ranks (closer to the paper's whole-batch loss, one more all-gather).",
    )
    group.add_argument(
        "--moe-dpsl-log-interval",
        type=int,
        default=100,
        help="Steps between routing diagnostics (expert-load CoV, entropy, distance to prior); 0 disables. "
        "Other steps add no communication.",
    )
    return parser


# ---------------------------------------------------------------------------------------------
# Namespace -> config


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _scalar_if_single(value: Any) -> Any:
    # Megatron-LM's validate_args turns one-element lists into scalars; standalone parsers skip it.
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


def dpsl_enabled(args: argparse.Namespace) -> bool:
    """Whether ``--moe-router-load-balancing-type`` includes ``dpsl``."""
    return DPSL_TYPE in _as_list(getattr(args, "moe_router_load_balancing_type", None))


def _num_experts(args: argparse.Namespace) -> Optional[int]:
    n = getattr(args, "num_experts", None)
    return n if n is not None else getattr(args, "num_moe_experts", None)


def _resolve_coeff(args: argparse.Namespace) -> Optional[float]:
    """λ from ``--moe-dpsl-coeff`` and dpsl's slot in ``--moe-aux-loss-coeff`` (None: config default)."""
    explicit = getattr(args, "moe_dpsl_coeff", None)
    types = _as_list(getattr(args, "moe_router_load_balancing_type", None))
    coeffs = _as_list(getattr(args, "moe_aux_loss_coeff", None))
    slot = None
    if DPSL_TYPE in types and len(types) > 1:
        if len(coeffs) != len(types):
            raise ValueError(
                f"{AUX_LOSS_COEFF_FLAG}: expected {len(types)} values (one per {LOAD_BALANCING_FLAG} "
                f"{' '.join(types)}), got {len(coeffs)}"
            )
        slot = float(coeffs[types.index(DPSL_TYPE)])
    elif types == [DPSL_TYPE] and len(coeffs) == 1:
        slot = float(coeffs[0])
    if slot is not None and slot < 0:
        raise ValueError(f"{AUX_LOSS_COEFF_FLAG}: the value in dpsl's slot is λ and must be >= 0, got {slot}")
    if slot is not None and slot != 0.0:
        if explicit is not None and float(explicit) != slot:
            raise ValueError(
                f"--moe-dpsl-coeff: {explicit} disagrees with {slot} in dpsl's slot of {AUX_LOSS_COEFF_FLAG}; "
                f"give one of them (or the same value)"
            )
        return slot
    if explicit is not None and float(explicit) < 0:
        raise ValueError(f"--moe-dpsl-coeff: must be >= 0, got {explicit}")
    return explicit


def validate_dpsl_args(args: argparse.Namespace) -> None:
    """Check the DPSL flags against each other and ``--num-experts``; ValueError naming the flag."""
    on = dpsl_enabled(args)
    prior_flags = {
        "--moe-dpsl-alpha": getattr(args, "moe_dpsl_alpha", None),
        "--moe-dpsl-group-alphas": getattr(args, "moe_dpsl_group_alphas", None),
        "--moe-dpsl-alpha-base": getattr(args, "moe_dpsl_alpha_base", None),
        "--moe-dpsl-alpha-shift": getattr(args, "moe_dpsl_alpha_shift", None),
        "--moe-dpsl-num-groups": getattr(args, "moe_dpsl_num_groups", None),
        "--moe-dpsl-coeff": getattr(args, "moe_dpsl_coeff", None),
    }
    given = [flag for flag, v in prior_flags.items() if v is not None]
    if given and not on:
        raise ValueError(
            f"{given[0]}: DPSL flags need {LOAD_BALANCING_FLAG} to include 'dpsl' (e.g. "
            f"'{LOAD_BALANCING_FLAG} dpsl' or 'aux_loss dpsl'), got "
            f"{getattr(args, 'moe_router_load_balancing_type', None)!r}"
        )
    if not on:
        return
    num_experts = _num_experts(args)
    if num_experts is None:
        raise ValueError(f"{LOAD_BALANCING_FLAG} dpsl: needs an MoE model; set --num-experts")
    gather = getattr(args, "moe_dpsl_gather", "micro_batch")
    if gather not in GATHER_CHOICES:
        raise ValueError(f"--moe-dpsl-gather: expected one of {', '.join(GATHER_CHOICES)}, got {gather!r}")
    interval = getattr(args, "moe_dpsl_log_interval", 100)
    if interval is not None and interval < 0:
        raise ValueError(f"--moe-dpsl-log-interval: must be >= 0 (0 disables), got {interval}")

    alpha = getattr(args, "moe_dpsl_alpha", None)
    rows = getattr(args, "moe_dpsl_group_alphas", None)
    base, shift, groups = (getattr(args, f"moe_dpsl_{n}", None) for n in ("alpha_base", "alpha_shift", "num_groups"))
    shortcut = {"--moe-dpsl-alpha-base": base, "--moe-dpsl-alpha-shift": shift, "--moe-dpsl-num-groups": groups}
    sources = [
        name
        for name, present in (
            ("--moe-dpsl-alpha", alpha is not None),
            ("--moe-dpsl-group-alphas", rows is not None),
            ("--moe-dpsl-alpha-base/--moe-dpsl-alpha-shift/--moe-dpsl-num-groups", any(v is not None for v in shortcut.values())),
        )
        if present
    ]
    if len(sources) > 1:
        raise ValueError(f"{sources[1]}: give only one prior, got {' and '.join(sources)}")
    if alpha is not None:
        values = _as_list(alpha)
        if len(values) not in (1, num_experts):
            raise ValueError(
                f"--moe-dpsl-alpha: expected 1 or {num_experts} values (num experts), got {len(values)}"
            )
        bad = [v for v in values if not v > 0]
        if bad:
            raise ValueError(f"--moe-dpsl-alpha: every α must be > 0, got {bad[0]}")
    if rows is not None:
        widths = sorted({len(r) for r in rows})
        if widths != [num_experts]:
            raise ValueError(
                f"--moe-dpsl-group-alphas: every row needs {num_experts} values (num experts), got rows of "
                f"{', '.join(map(str, widths))}"
            )
        if not all(v > 0 for r in rows for v in r):
            raise ValueError("--moe-dpsl-group-alphas: every α must be > 0")
    if any(v is not None for v in shortcut.values()):
        missing = [flag for flag, v in shortcut.items() if v is None]
        if missing:
            raise ValueError(
                f"{missing[0]}: the modality prior needs --moe-dpsl-alpha-base, --moe-dpsl-alpha-shift and "
                f"--moe-dpsl-num-groups together; missing {', '.join(missing)}"
            )
        if not base > 0:
            raise ValueError(f"--moe-dpsl-alpha-base: must be > 0, got {base}")
        if not shift >= 0:  # as priors.group_alpha: the shift raises a group's own block
            raise ValueError(f"--moe-dpsl-alpha-shift: must be >= 0, got {shift}")
        if groups < 1 or num_experts % groups:
            raise ValueError(
                f"--moe-dpsl-num-groups: must be >= 1 and divide --num-experts {num_experts}, got {groups}"
            )
    _resolve_coeff(args)


def translate_config_error(message: str) -> str:
    """Rewrite config field names in ``message`` as their flags (``moe_dpsl_alpha`` -> ``--moe-dpsl-alpha``)."""
    return re.sub(
        r"(?<![\w-])(moe_[a-z0-9_]+|num_moe_experts)\b",
        lambda m: flag_for_field(m.group(1)),
        message,
    )


@contextlib.contextmanager
def flag_errors() -> Iterator[None]:
    """Re-raise a config ``ValueError`` with field names rewritten as flags (wrap config construction)."""
    try:
        yield
    except ValueError as e:
        translated = translate_config_error(str(e))
        if translated == str(e):
            raise
        raise ValueError(translated) from e


def dpsl_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """A checked copy of ``args`` ready for a copy by field name (``args`` itself is not changed).

    Normalises the list forms as Megatron-LM's ``validate_args`` does, resolves λ (see
    ``--moe-dpsl-coeff``) and drops DPSL flags that were not given, so their fields keep the config
    defaults instead of receiving ``None``.
    """
    validate_dpsl_args(args)
    ns = argparse.Namespace(**vars(args))
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        if hasattr(ns, name):
            setattr(ns, name, _scalar_if_single(getattr(ns, name)))
    ns.moe_dpsl_coeff = _resolve_coeff(args) if dpsl_enabled(args) else getattr(args, "moe_dpsl_coeff", None)
    alpha = getattr(ns, "moe_dpsl_alpha", None)
    if alpha is not None:
        alpha = _scalar_if_single(alpha)
        ns.moe_dpsl_alpha = [float(a) for a in alpha] if isinstance(alpha, (list, tuple)) else float(alpha)
    for name in DPSL_FIELDS:
        if getattr(ns, name, None) is None and hasattr(ns, name):
            delattr(ns, name)
    return ns


def _default_config_class():
    from megatron_dpsl.config import DPSLTransformerConfig

    return DPSLTransformerConfig


def dpsl_config_from_args(args: argparse.Namespace, config_class=None, **overrides):
    """Build the DPSL config from parsed flags, copying by dataclass field name.

    Mirrors Megatron-LM's ``core_transformer_config_from_args(args, config_class)``: every field of
    ``config_class`` (default ``DPSLTransformerConfig``) that the namespace has is copied, after the
    DPSL checks and normalisation of ``dpsl_namespace``; ``--num-experts`` fills ``num_moe_experts``.
    ``overrides`` (keyword arguments, applied last) carry what a standalone trainer derives itself,
    e.g. ``activation_func``. Errors are ``ValueError`` naming the flag.

    Inside Megatron-LM's own flow use ``megatron_lm_config_from_args``, which keeps Megatron-LM's
    translations (swiglu, GQA, pipeline dtype, ...).
    """
    config_class = config_class or _default_config_class()
    ns = dpsl_namespace(args)
    kw = {f.name: getattr(ns, f.name) for f in dataclasses.fields(config_class) if hasattr(ns, f.name)}
    if getattr(ns, "num_experts", None) is not None:
        kw["num_moe_experts"] = ns.num_experts
    kw.update(overrides)
    with flag_errors():
        return config_class(**kw)


def megatron_lm_config_from_args(args: argparse.Namespace, config_class=None):
    """Megatron-LM's ``core_transformer_config_from_args`` with the DPSL config class and flag checks.

    Needs Megatron-LM's ``megatron/training`` on ``sys.path``; ``args`` is not changed.
    """
    from megatron.training.arguments import core_transformer_config_from_args

    config_class = config_class or _default_config_class()
    with flag_errors():
        config = core_transformer_config_from_args(dpsl_namespace(args), config_class=config_class)
    if dpsl_enabled(args) and not isinstance(config, config_class):
        # Megatron-LM swaps in MLATransformerConfig / HeterogeneousTransformerConfig, dropping the DPSL fields.
        flag = "--multi-latent-attention" if getattr(args, "multi_latent_attention", False) else (
            "--heterogeneous-layers-config-path")
        raise ValueError(
            f"{flag}: Megatron-LM builds a {type(config).__name__} for it, which has no DPSL fields; "
            f"not supported with {LOAD_BALANCING_FLAG} dpsl"
        )
    return config
