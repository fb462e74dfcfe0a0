"""The Megatron-LM ``args`` an output checkpoint carries in ``common.pt``.

Megatron-LM reads them in two functions of ``megatron/training/checkpointing.py`` (the same fields
at core_v0.16.1 and core_v0.19.0):

* ``check_checkpoint_args`` runs on every ``--load`` without ``--finetune`` (release checkpoints
  included). It compares ``num_layers``, ``hidden_size``, ``num_attention_heads`` and
  ``add_position_embedding`` (absent counts as True) with the run's flags; with ``--vocab-file``
  also ``max_position_embeddings``, ``make_vocab_size_divisible_by`` and ``tokenizer_type``; with
  ``--data-parallel-random-init`` ``data_parallel_random_init``; with
  ``--phase-transition-iterations`` ``global_batch_size``. A missing field is an AttributeError,
  and a missing ``add_position_embedding`` stops every RoPE run that passes
  ``--no-position-embedding`` (Megatron-LM's Llama and Mixtral examples).
* ``load_args_from_checkpoint`` (``--use-checkpoint-args``) copies the architecture (shape,
  positions, norms, biases, MoE, tokenizer, parallel sizes), most of it forcibly: a value
  overrides the run's flag, ``None`` leaves the flag alone.

So the converter writes every one of these fields: the source's value where its args have one;
otherwise what the checkpoint's tensors show (:func:`complete_args`); otherwise Megatron-LM's
default. Run choices that do not shape the checkpoint are ``None``, so that
``--use-checkpoint-args`` keeps what the user passes.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping
from typing import Any

import torch

# Megatron-LM flag defaults for fields a source's args may lack (arguments.py, both tags).
MEGATRON_DEFAULTS: dict[str, Any] = {
    "use_rotary_position_embeddings": False,
    "rotary_percent": 1.0,
    "rotary_interleaved": False,
    "use_rope_scaling": False,
    "apply_layernorm_1p": False,  # the name load_args_from_checkpoint reads ...
    "layernorm_zero_centered_gamma": False,  # ... and --apply-layernorm-1p's dest at both tags
    "apply_query_key_layer_scaling": False,
    "data_parallel_random_init": False,
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None,
    "num_layers_per_virtual_pipeline_stage": None,
    "expert_model_parallel_size": 1,
    "tokenizer_type": None,
    "tokenizer_model": None,
    "tiktoken_pattern": None,
    "global_batch_size": None,
    "seq_length": None,
    # run choices: None keeps the run's flag
    "attention_dropout": None,
    "hidden_dropout": None,
    "moe_token_dispatcher_type": None,
    # other model families: never what a dense GPT checkpoint is
    "hybrid_override_pattern": None,
    "hybrid_layer_pattern": None,
    "hybrid_attention_ratio": None,
    "hybrid_mlp_ratio": None,
    "is_hybrid_model": False,
    "spec": None,
    "mamba_state_dim": None,
    "mamba_head_dim": None,
    "mamba_num_groups": None,
    "mamba_num_heads": None,
    "heterogeneous_layers_config_path": None,
    "heterogeneous_layers_config_encoded_json": None,
    "mtp_num_layers": None,
    "mtp_hybrid_override_pattern": None,
    "mtp_use_repeated_layer": False,
}

ATTN = "layer.self_attention."


def vocab_divisor(padded_vocab: int) -> int:
    """The largest power of two <= 128 (Megatron-LM's default ``--make-vocab-size-divisible-by``)
    dividing ``padded_vocab``: the value a run that padded to this size most likely used."""
    d = 128
    while padded_vocab % d:
        d //= 2
    return d


def complete_args(
    args: argparse.Namespace | None,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    num_layers: int,
    activation: str,
    dtype: torch.dtype,
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """``args`` (not modified) with every field Megatron-LM's loaders read; returns (args, what was
    filled).

    ``shapes``: global shapes of the dense model's entries, non-layer keys as they are
    (``embedding.word_embeddings.weight``, ``output_layer.weight``, ...) and layer 0's under
    ``layer.`` (``layer.self_attention.linear_qkv.weight``, ``layer.mlp.linear_fc1.weight``, ...).
    A field the source does not have comes from the shapes where they decide it, else from
    :data:`MEGATRON_DEFAULTS`. ``num_attention_heads`` cannot be read from shapes (the fused QKV
    is ``(heads + 2 groups) * head_dim`` rows): without it, it and the fields derived from it stay
    absent rather than guessed (loaders that skip absent fields, like the embedded trainer's, still
    load; Megatron-LM's check needs ``--finetune``).
    """
    out = copy.deepcopy(args) if args is not None else argparse.Namespace()
    filled: dict[str, Any] = {}

    def fill(name: str, value: Any) -> None:
        if not hasattr(out, name):
            setattr(out, name, value)
            filled[name] = value

    vocab, hidden = shapes["embedding.word_embeddings.weight"]
    fc1, fc2 = shapes["layer.mlp.linear_fc1.weight"], shapes["layer.mlp.linear_fc2.weight"]
    gated = fc1[0] == 2 * fc2[1]
    fill("num_layers", num_layers)
    fill("hidden_size", hidden)
    fill("ffn_hidden_size", fc2[1])
    _fill_attention(out, shapes, fill)
    _fill_positions(out, shapes, fill)
    fill("add_bias_linear", ATTN + "linear_proj.bias" in shapes)
    fill("add_qkv_bias", ATTN + "linear_qkv.bias" in shapes)
    fill("swiglu", gated and activation == "silu")
    fill("squared_relu", activation == "squared_relu")
    fill("quick_geglu", gated and activation == "quick_gelu")
    fill("untie_embeddings_and_output_weights", "output_layer.weight" in shapes)
    fill("normalization", "LayerNorm" if "decoder.final_layernorm.bias" in shapes else "RMSNorm")
    fill("padded_vocab_size", vocab)
    fill("make_vocab_size_divisible_by", vocab_divisor(vocab))
    fill("params_dtype", dtype)
    fill("bf16", dtype == torch.bfloat16)
    fill("fp16", dtype == torch.float16)
    fill("ckpt_format", "torch_dist")
    for name, value in MEGATRON_DEFAULTS.items():
        fill(name, value)
    return out, filled


def _fill_attention(out, shapes: Mapping[str, tuple[int, ...]], fill) -> None:
    """``kv_channels`` and the query groups from the attention shapes, once the head count is
    known (``linear_proj`` is ``[H, heads * d]``, ``linear_qkv`` has ``(heads + 2 groups) * d``
    rows)."""
    heads = getattr(out, "num_attention_heads", None)
    qkv, proj = shapes.get(ATTN + "linear_qkv.weight"), shapes.get(ATTN + "linear_proj.weight")
    if not heads or proj is None or proj[1] % heads:
        return
    head_dim = getattr(out, "kv_channels", None) or proj[1] // heads
    fill("kv_channels", head_dim)
    if qkv is not None and (qkv[0] // head_dim - heads) % 2 == 0:
        groups = (qkv[0] // head_dim - heads) // 2
        fill("num_query_groups", groups)
        fill("group_query_attention", groups != heads)


def _fill_positions(out, shapes: Mapping[str, tuple[int, ...]], fill) -> None:
    """Learned absolute positions when the checkpoint has their table, else RoPE."""
    learned = shapes.get("embedding.position_embeddings.weight")
    fill("position_embedding_type", "learned_absolute" if learned is not None else "rope")
    fill("add_position_embedding", out.position_embedding_type == "learned_absolute")
    fill(
        "max_position_embeddings",
        learned[0] if learned is not None else getattr(out, "seq_length", None),
    )
    if out.position_embedding_type == "rope":
        fill("rotary_base", 10000)


def moe_fields(
    *,
    num_experts: int,
    moe_ffn_hidden_size: int,
    moe_router_topk: int,
    moe_layer_freq: int | list[int],
    moe_shared_expert_intermediate_size: int | None,
    moe_router_pre_softmax: bool,
    moe_router_score_function: str,
    granularity: int,
) -> dict[str, Any]:
    """The MoE fields of the upcycled checkpoint, set over whatever the dense source's args had."""
    return dict(
        num_experts=num_experts,
        moe_ffn_hidden_size=moe_ffn_hidden_size,
        moe_router_topk=moe_router_topk,
        moe_layer_freq=moe_layer_freq,
        moe_shared_expert_intermediate_size=moe_shared_expert_intermediate_size,
        moe_router_pre_softmax=moe_router_pre_softmax,
        moe_router_score_function=moe_router_score_function,
        moe_upcycling_granularity=granularity,
        moe_use_upcycling=False,
        # no expert_bias buffer, no scaling and one entry per expert are written (layers.py)
        moe_router_enable_expert_bias=False,
        moe_router_topk_scaling_factor=None,
        moe_single_grouped_weight=False,
        moe_single_grouped_bias=False,
        moe_latent_size=None,
        # the expert keys serve SequentialMLP, GroupedMLP and TEGroupedMLP alike: the run chooses
        moe_grouped_gemm=None,
    )


# A fresh start: what Megatron-LM's --finetune would reset, and a checkpoint with neither
# optimizer nor RNG state (load_checkpoint skips both when these say so).
FRESH_START = dict(
    consumed_train_samples=0,
    skipped_train_samples=0,
    consumed_valid_samples=0,
    no_save_optim=True,
    no_save_rng=True,
)
