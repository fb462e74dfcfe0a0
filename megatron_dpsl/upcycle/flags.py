"""The Megatron-LM command-line flags that rebuild the model an output checkpoint's ``args``
describe, and the ones ``--use-checkpoint-args`` does not restore."""

from __future__ import annotations

import argparse

from megatron_dpsl.upcycle.megatron_args import vocab_divisor

# Model-shaping args that load_args_from_checkpoint (megatron/training/checkpointing.py) does not
# copy at core_v0.16.1 or core_v0.19.0: a --use-checkpoint-args run gets Megatron-LM's defaults
# (rope_scaling off, factor 8; norm epsilon 1e-5) unless these flags are passed too.
NOT_RESTORED = (
    "--use-rope-scaling",
    "--rope-scaling-factor",
    "--norm-epsilon",
    "--make-vocab-size-divisible-by",
    "--bf16",
    "--fp16",
    # a LLaVA's vision side: none of it is restored at either tag
    "--encoder-num-layers",
    "--img-h",
    "--img-w",
    "--patch-dim",
    "--disable-vision-class-token",
    "--vision-model-type",
)


# the ViT widths the plugin launcher's --vision-model-type clip builds (absent: pretrain_vlm's copy
# of the language model's config, whose widths the language flags already give)
CLIP_L = {"hidden_size": 1024, "ffn_hidden_size": 4096, "num_attention_heads": 16}


def _num(value) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _shape_flags(a: argparse.Namespace) -> list[str]:
    flags = [
        "--num-layers",
        str(a.num_layers),
        "--hidden-size",
        str(a.hidden_size),
        "--ffn-hidden-size",
        str(a.ffn_hidden_size),
    ]
    if getattr(a, "num_attention_heads", None):
        flags += ["--num-attention-heads", str(a.num_attention_heads)]
    if getattr(a, "kv_channels", None):
        flags += ["--kv-channels", str(a.kv_channels)]
    if getattr(a, "group_query_attention", False):
        flags += ["--group-query-attention", "--num-query-groups", str(a.num_query_groups)]
    if getattr(a, "seq_length", None):
        flags += ["--seq-length", str(a.seq_length)]
    if getattr(a, "max_position_embeddings", None):
        flags += ["--max-position-embeddings", str(a.max_position_embeddings)]
    return flags


def _position_flags(a: argparse.Namespace) -> list[str]:
    if a.position_embedding_type != "rope":
        return ["--position-embedding-type", a.position_embedding_type]
    flags = [
        "--position-embedding-type",
        "rope",
        "--no-position-embedding",
        "--rotary-base",
        _num(a.rotary_base),
    ]
    if a.rotary_percent != 1.0:
        flags += ["--rotary-percent", _num(a.rotary_percent)]
    if a.rotary_interleaved:
        flags.append("--rotary-interleaved")
    if a.use_rope_scaling:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", _num(a.rope_scaling_factor)]
    return flags


def _layer_flags(a: argparse.Namespace) -> list[str]:
    eps = getattr(a, "layernorm_epsilon", getattr(a, "norm_epsilon", None))
    flags = ["--normalization", a.normalization]
    if eps is not None:
        flags += ["--norm-epsilon", repr(float(eps))]
    for name, flag in (
        ("swiglu", "--swiglu"),
        ("squared_relu", "--squared-relu"),
        ("quick_geglu", "--quick-geglu"),
        ("untie_embeddings_and_output_weights", "--untie-embeddings-and-output-weights"),
        ("add_qkv_bias", "--add-qkv-bias"),
        ("bf16", "--bf16"),
        ("fp16", "--fp16"),
    ):
        if getattr(a, name, False):
            flags.append(flag)
    if not a.add_bias_linear:
        flags.append("--disable-bias-linear")
    return flags + ["--make-vocab-size-divisible-by", str(vocab_divisor(a.padded_vocab_size))]


def _moe_flags(a: argparse.Namespace) -> list[str]:
    if not getattr(a, "num_experts", None):
        return []
    flags = [
        "--num-experts",
        str(a.num_experts),
        "--moe-ffn-hidden-size",
        str(a.moe_ffn_hidden_size),
        "--moe-router-topk",
        str(a.moe_router_topk),
    ]
    if a.moe_layer_freq != 1:
        freq = a.moe_layer_freq
        flags += [
            "--moe-layer-freq",
            str(freq).replace(" ", "") if isinstance(freq, list) else str(freq),
        ]
    if a.moe_shared_expert_intermediate_size:
        flags += [
            "--moe-shared-expert-intermediate-size",
            str(a.moe_shared_expert_intermediate_size),
        ]
    if a.moe_router_pre_softmax:
        flags.append("--moe-router-pre-softmax")
    if a.moe_router_score_function != "softmax":
        flags += ["--moe-router-score-function", a.moe_router_score_function]
    return flags


def _vision_flags(a: argparse.Namespace) -> list[str]:
    """A LLaVA's ViT and image flags (pretrain_vlm's; ``--vision-model-type``: the plugin's
    launcher)."""
    # Megatron-LM's namespace has encoder_num_layers, img_h and patch_dim for every model;
    # --disable-vision-class-token is pretrain_vlm's own flag (and the HF LLaVA reader writes it)
    if getattr(a, "disable_vision_class_token", None) is None or a.encoder_num_layers is None:
        return []
    flags = ["--encoder-num-layers", str(a.encoder_num_layers)]
    for name in ("img_h", "img_w", "patch_dim"):
        if getattr(a, name, None) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(a, name))]
    if getattr(a, "disable_vision_class_token", False):
        flags.append("--disable-vision-class-token")
    widths = tuple(getattr(a, f"vision_{n}", d) for n, d in CLIP_L.items())
    if getattr(a, "vision_model_type", None) == "clip" and widths == tuple(CLIP_L.values()):
        flags += ["--vision-model-type", "clip"]  # the launcher's flag: CLIP ViT-L/14's widths
    return flags


def megatron_lm_flags(args: argparse.Namespace) -> list[str]:
    """Flags that build the model ``args`` describe (shape, positions, norms, activation, biases,
    MoE, a LLaVA's vision side); a run adds its data, batch, optimizer, parallel and tokenizer
    flags."""
    return (
        _shape_flags(args)
        + _position_flags(args)
        + _layer_flags(args)
        + _moe_flags(args)
        + _vision_flags(args)
    )


def not_restored(flags: list[str]) -> list[str]:
    """The part of ``flags`` a ``--use-checkpoint-args`` run must still pass
    (:data:`NOT_RESTORED`)."""
    out, i = [], 0
    while i < len(flags):
        takes_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        if flags[i] in NOT_RESTORED:
            out += flags[i : i + 1 + takes_value]
        i += 1 + takes_value
    return out
