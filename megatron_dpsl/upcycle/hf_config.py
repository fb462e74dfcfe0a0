"""A Hugging Face decoder's ``config.json`` (Llama, Qwen2, Phi-3 families) read into the shape of
a Megatron-Core ``GPTModel``, with every value Megatron cannot express refused by name.

Pure: a dict in, :class:`HFTextConfig` out; no files, no tensors (``hf_tensors.py`` checks the
tensors against it). A vision-language checkpoint passes its ``text_config`` here.

RoPE (Megatron ``RotaryEmbedding``): ``default`` maps to ``rotary_base = rope_theta``; Llama 3.x's
``llama3`` maps to ``--use-rope-scaling --rope-scaling-factor F``, because Megatron's
``_apply_scaling`` hard-codes the other three numbers of that rule (low_freq_factor 1,
high_freq_factor 4, original_max_position_embeddings 8192: Llama 3.1/3.2/3.3's values), so any
other value is refused; ``longrope`` (Phi-3 128k, Phi-3.5) switches per-dimension factor sets at
``original_max_position_embeddings``, which Megatron has no equivalent of.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from megatron_dpsl.upcycle.errors import UpcycleError

FAMILIES = ("llama", "qwen2", "phi3")
ROPE_TYPES = ("default", "llama3")
# Megatron-Core's RotaryEmbedding._apply_scaling defaults, the only llama3 values it can express
MEGATRON_LLAMA3 = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFTextConfig:
    """The dense decoder a ``config.json`` declares (legend: H hidden, F ffn, d head_dim).

    ``fused_qkv``/``fused_gate_up``: Phi-3 stores ``qkv_proj [(nh+2ng)*d, H]`` and
    ``gate_up_proj [2F, H]`` instead of q/k/v and gate/up. ``rope_scaling_factor`` is None for
    unscaled RoPE. ``sliding_window`` is the HF attention window (keys closer than it are seen),
    None when the model attends to the whole causal context.
    """

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    qkv_bias: bool
    tied: bool
    fused_qkv: bool
    fused_gate_up: bool
    rotary_base: float
    rope_scaling_factor: float | None
    norm_epsilon: float
    max_position_embeddings: int
    sliding_window: int | None
    attention_dropout: float
    hidden_dropout: float
    init_method_std: float


def _field(cfg: Mapping, name: str, where: str, default: Any = None, *, kind=int, low=None):
    """``cfg[name]`` as ``kind``, finite and >= ``low``; the error names the field and the file."""
    value = cfg.get(name, default)
    if value is None:
        raise UpcycleError(f"{where}: {name} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UpcycleError(f"{where}: {name}={value!r} is not a number")
    if not math.isfinite(value) or (low is not None and value < low):
        raise UpcycleError(f"{where}: {name}={value!r} must be finite and >= {low}")
    if kind is int and float(value) != int(value):
        raise UpcycleError(f"{where}: {name}={value!r} is not an integer")
    return kind(value)


def _family(cfg: Mapping, where: str) -> str:
    family = cfg.get("model_type")
    if family not in FAMILIES:
        already = " (already an MoE)" if family and "moe" in str(family) else ""
        raise UpcycleError(
            f"{where}: model_type {family!r}{already} is not supported; supported: {FAMILIES}"
        )
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        raise UpcycleError(f"{where} describes an MoE model already; upcycle a dense model")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UpcycleError(
            f"{where}: unknown activation hidden_act={act!r}; supported: 'silu' (SwiGLU)"
        )
    if family == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise UpcycleError(
            f"{where}: attention_bias/mlp_bias=True cannot be expressed with Megatron's "
            "add_bias_linear/add_qkv_bias flags; supported: both False"
        )
    return family


def rope_of(cfg: Mapping, where: str) -> tuple[float, float | None]:
    """(rotary_base, llama3 factor or None) from ``rope_parameters`` (transformers >= 5) or
    ``rope_scaling`` + ``rope_theta`` (older files)."""
    rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    theta = _field({**cfg, **rope}, "rope_theta", where, 10000.0, kind=float, low=1e-12)
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UpcycleError(
            f"{where}: partial_rotary_factor={partial!r} is not supported; supported: 1.0"
        )
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        why = (
            " (longrope switches per-dimension factor sets at original_max_position_embeddings; "
            "Megatron-Core's rotary embedding has no such rule: use a 4k-context variant)"
            if rope_type in ("longrope", "su", "yarn")
            else ""
        )
        raise UpcycleError(
            f"{where}: rope_type {rope_type!r} is not supported{why}; supported: {ROPE_TYPES}"
        )
    factor = _field(rope, "factor", where, kind=float, low=1.0)
    for name, fixed in MEGATRON_LLAMA3.items():
        if name not in rope or float(rope[name]) != fixed:
            raise UpcycleError(
                f"{where}: llama3 RoPE with {name}={rope.get(name)!r}: Megatron-Core's rotary "
                f"embedding fixes it at {fixed:g} (only the factor is a flag); supported: "
                f"{MEGATRON_LLAMA3}"
            )
    return theta, factor


def _sliding_window(cfg: Mapping, family: str, where: str) -> int | None:
    if family == "qwen2":  # Qwen2 applies its window only with use_sliding_window
        if cfg.get("use_sliding_window"):
            raise UpcycleError(
                f"{where}: use_sliding_window=True is not supported; supported: False"
            )
        return None
    window = cfg.get("sliding_window")
    return None if window is None else _field(cfg, "sliding_window", where, low=1)


def parse_text_config(cfg: Mapping, where: str = "config.json") -> HFTextConfig:
    """The decoder ``cfg`` declares; :class:`UpcycleError` names the field and the allowed
    values."""
    if not isinstance(cfg, Mapping):
        raise UpcycleError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    family = _family(cfg, where)
    hidden = _field(cfg, "hidden_size", where, low=1)
    heads = _field(cfg, "num_attention_heads", where, low=1)
    groups = _field(cfg, "num_key_value_heads", where, heads, low=1)
    if heads % groups:
        raise UpcycleError(
            f"{where}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={groups}"
        )
    theta, factor = rope_of(cfg, where)
    max_pos = _field(cfg, "max_position_embeddings", where, 4096, low=1)
    return HFTextConfig(
        family=family,
        num_layers=_field(cfg, "num_hidden_layers", where, low=1),
        hidden_size=hidden,
        ffn_hidden_size=_field(cfg, "intermediate_size", where, low=1),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=_field(cfg, "head_dim", where, hidden // heads, low=1),
        vocab_size=_field(cfg, "vocab_size", where, low=1),
        qkv_bias=family == "qwen2",
        tied=bool(cfg.get("tie_word_embeddings", False)),
        fused_qkv=family == "phi3",
        fused_gate_up=family == "phi3",
        rotary_base=theta,
        rope_scaling_factor=factor,
        norm_epsilon=_field(cfg, "rms_norm_eps", where, 1e-6, kind=float, low=0.0),
        max_position_embeddings=max_pos,
        sliding_window=_sliding_window(cfg, family, where),
        attention_dropout=_field(cfg, "attention_dropout", where, 0.0, kind=float, low=0.0),
        hidden_dropout=_field(cfg, "resid_pdrop", where, 0.0, kind=float, low=0.0),
        init_method_std=_field(cfg, "initializer_range", where, 0.02, kind=float, low=0.0),
    )
