"""The Megatron-LM ``args`` of a dense model read from a Hugging Face config (hf_config.py): the
namespace ``common.pt`` carries, field names as Megatron-LM's argparse ``dest``s."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megatron_dpsl.upcycle.hf_config import HFTextConfig


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value  # --rotary-base is an int flag


def default_seq_length(c: HFTextConfig) -> int:
    """The longest sequence on which Megatron computes what HF computes: HF masks keys
    ``sliding_window`` or more positions back, Megatron-LM (without ``--window-size``) attends to
    the whole causal context, so the two agree up to ``sliding_window`` tokens."""
    if c.sliding_window is None:
        return c.max_position_embeddings
    return min(c.max_position_embeddings, c.sliding_window)


def hf_megatron_args(
    c: HFTextConfig, *, dtype: torch.dtype, tokenizer_dir: Path | None = None
) -> argparse.Namespace:
    """Megatron-LM flags (as an args namespace) that rebuild the decoder ``c`` describes."""
    tokenizer = str(Path(tokenizer_dir).resolve()) if tokenizer_dir is not None else None
    return argparse.Namespace(
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.ffn_hidden_size,
        num_attention_heads=c.num_attention_heads,
        group_query_attention=c.num_query_groups != c.num_attention_heads,
        num_query_groups=c.num_query_groups,
        kv_channels=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        seq_length=default_seq_length(c),
        position_embedding_type="rope",
        add_position_embedding=False,  # Megatron-LM's --no-position-embedding: RoPE adds no table
        # the deprecated alias of --position-embedding-type rope
        use_rotary_position_embeddings=False,
        rotary_base=_number(c.rotary_base),
        rotary_interleaved=False,
        rotary_percent=1.0,
        use_rope_scaling=c.rope_scaling_factor is not None,
        # Megatron-LM's default when unused, so --use-checkpoint-args copies a consistent pair
        rope_scaling_factor=c.rope_scaling_factor if c.rope_scaling_factor is not None else 8.0,
        window_size=None,  # Megatron attends to the whole context: see default_seq_length
        hf_sliding_window=c.sliding_window,
        normalization="RMSNorm",
        # --norm-epsilon's dest: layernorm_epsilon at core_v0.16/0.19, norm_epsilon before
        layernorm_epsilon=c.norm_epsilon,
        norm_epsilon=c.norm_epsilon,
        swiglu=True,
        untie_embeddings_and_output_weights=not c.tied,
        add_bias_linear=False,
        add_qkv_bias=c.qkv_bias,
        padded_vocab_size=c.vocab_size,
        vocab_size=c.vocab_size,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_dropout=c.attention_dropout,
        hidden_dropout=c.hidden_dropout,
        init_method_std=c.init_method_std,
        # what Megatron-LM's own HF loader writes; --use-checkpoint-args then builds this tokenizer
        # (None without tokenizer files: the run's --tokenizer-* flags stand)
        tokenizer_type="HuggingFaceTokenizer" if tokenizer else None,
        tokenizer_model=tokenizer,
        hf_model_type=c.family,
    )
