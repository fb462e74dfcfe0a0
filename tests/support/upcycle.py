"""Helpers shared by the upcycler tests (no tests here): build real Megatron GPTModels from the
Megatron-LM ``args`` a checkpoint carries, save one in the Megatron-LM layout, compute logits."""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def dense_args(
    *,
    glu=True,
    activation="silu",
    bias=False,
    layers=2,
    hidden=32,
    ffn=64,
    heads=4,
    groups=2,
    vocab=96,
    tied=False,
    normalization="RMSNorm",
) -> argparse.Namespace:
    """A Megatron-LM-style args namespace for a tiny dense GPT."""
    return argparse.Namespace(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        group_query_attention=groups != heads,
        num_query_groups=groups,
        kv_channels=hidden // heads,
        max_position_embeddings=64,
        seq_length=64,
        position_embedding_type="rope",
        rotary_base=10000.0,
        normalization=normalization,
        norm_epsilon=1e-5,
        swiglu=glu and activation == "silu",
        squared_relu=False,
        quick_geglu=False,
        untie_embeddings_and_output_weights=not tied,
        add_bias_linear=bias,
        add_qkv_bias=bias,
        padded_vocab_size=vocab,
        init_method_std=0.02,
        num_experts=None,
        params_dtype=torch.float32,
    )


def transformer_config(args, *, router_dtype=None, **overrides):
    """TransformerConfig (DPSL config if available) from the args a checkpoint carries."""
    from megatron.core.transformer import TransformerConfig

    act = "silu" if args.swiglu else ("gelu" if not getattr(args, "squared_relu", False) else None)
    kw = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups
        if getattr(args, "group_query_attention", False)
        else None,
        kv_channels=getattr(args, "kv_channels", None),
        gated_linear_unit=bool(args.swiglu),
        activation_func=ACTIVATIONS[act],
        normalization=args.normalization,
        # --norm-epsilon's dest is layernorm_epsilon in Megatron-LM >= 0.14 (norm_epsilon before)
        layernorm_epsilon=getattr(args, "layernorm_epsilon", getattr(args, "norm_epsilon", 1e-5)),
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=getattr(args, "add_qkv_bias", False),
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=args.init_method_std,
        params_dtype=torch.float32,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
    )
    if getattr(args, "num_experts", None):
        kw.update(
            num_moe_experts=args.num_experts,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_router_topk=args.moe_router_topk,
            moe_layer_freq=args.moe_layer_freq,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_router_pre_softmax=args.moe_router_pre_softmax,
            moe_router_score_function=args.moe_router_score_function,
            moe_token_dispatcher_type="allgather",
            moe_aux_loss_coeff=0.0,
        )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt(args, config=None, layer_spec=None, **kwargs):
    """A GPTModel (local spec) for ``args``; model-parallel state must be initialised."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
    )

    config = config or transformer_config(args)
    if layer_spec is None:
        if config.num_moe_experts:
            layer_spec = get_gpt_decoder_block_spec(
                config, use_transformer_engine=False, normalization=args.normalization
            )
        else:
            layer_spec = get_gpt_layer_local_spec(normalization=args.normalization)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=args.rotary_base,
        rope_scaling=getattr(args, "use_rope_scaling", False),
        rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        **kwargs,
    )


def save_megatron_lm(model, save_dir, args, iteration=7):
    """Save like Megatron-LM: tracker file + iter_XXXXXXX/ with 'model' and 'args' (+ an
    optimizer-like extra)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    step = os.path.join(save_dir, f"iter_{iteration:07d}")
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(step)
    dist.barrier()
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    model_sd = model.sharded_state_dict()
    # the word embeddings: "embedding.word_embeddings.weight", "language_model.embedding..." in a
    # LLaVA
    emb = model_sd[min((k for k in model_sd if k.endswith("word_embeddings.weight")), key=len)]
    # training state a Megatron-LM checkpoint also holds (the converter must skip it)
    optimizer = {
        "exp_avg": make_sharded_optimizer_tensor(
            emb, torch.zeros_like(emb.data), "optimizer.state.exp_avg"
        )
    }
    rng = ShardedObject(
        "rng_state", {"seed": 1}, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0
    )
    state = {
        "model": model_sd,
        "optimizer": optimizer,
        "rng_state": rng,
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": iteration,
    }
    dist_checkpointing.save(
        state, step, sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    )
    if rank0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    dist.barrier()
    return step


def load_megatron_lm(model, save_dir):
    """Load a Megatron-LM-layout checkpoint into ``model`` the way Megatron-LM does (its own sharded
    state dict)."""
    from megatron.core import dist_checkpointing

    tracker = open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")).read().strip()
    step = os.path.join(save_dir, "release" if tracker == "release" else f"iter_{int(tracker):07d}")
    content = dist_checkpointing.load_content_metadata(step)
    sd = {"model": model.sharded_state_dict(metadata=content)}
    loaded = dist_checkpointing.load(sd, step)
    model.load_state_dict(loaded["model"], strict=True)
    return loaded


def causal_mask(seq):
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), 1)


@torch.no_grad()
def gpt_logits(model, tokens):
    """[batch, seq] int tokens -> [batch, seq, vocab] float logits (explicit causal mask on CPU)."""
    model.eval()
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    return model(tokens, pos, causal_mask(s)).float()


def moe_training_model(args, dpsl_coeff=0.01, **kwargs):
    """An MoE GPTModel for training: DPSLRouter via megatron_dpsl.models.specs when available, else
    TopKRouter.

    Returns (model, router class name)."""
    import dataclasses

    try:
        from megatron_dpsl.config.transformer_config import DPSLTransformerConfig
        from megatron_dpsl.models.specs import get_dpsl_decoder_block_spec

        base = transformer_config(args)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
        fields.update(
            moe_router_load_balancing_type="dpsl", moe_dpsl_coeff=dpsl_coeff, moe_dpsl_alpha=1.0
        )
        config = DPSLTransformerConfig(**fields)
        spec = get_dpsl_decoder_block_spec(
            config, use_transformer_engine=False, normalization=args.normalization
        )
    except ImportError:  # the DPSL router package is not (fully) present: Megatron's TopKRouter
        return build_gpt(args, **kwargs), "TopKRouter"
    model = build_gpt(args, config=config, layer_spec=spec, **kwargs)
    return model, type(model.decoder.layers[0].mlp.router).__name__


def train_steps(model, tokens, steps=4, lr=3e-3, grad_hook=None, loss_hook=None):
    """Adam on next-token loss over ``tokens`` (same batch each step); returns the losses."""
    model.train()
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    labels = torch.roll(tokens, -1, dims=1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(tokens, pos, causal_mask(s), labels=labels).float().mean()
        loss.backward()
        if grad_hook is not None:
            grad_hook(model)
        opt.step()
        losses.append(loss_hook(loss.detach()) if loss_hook is not None else loss.item())
    return losses


def write_tiny_hf_llama(path, *, layers=2, hidden=32, ffn=64, heads=4, groups=2, vocab=96, seed=0):
    """A random Llama checkpoint in the HF layout (config.json + model.safetensors), written with
    safetensors alone: a source for tests that need a conversion but not the transformers
        package."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    d = hidden // heads
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * d, hidden),
                p + "self_attn.k_proj.weight": (groups * d, hidden),
                p + "self_attn.v_proj.weight": (groups * d, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * d),
                p + "mlp.gate_proj.weight": (ffn, hidden),
                p + "mlp.up_proj.weight": (ffn, hidden),
                p + "mlp.down_proj.weight": (hidden, ffn),
            }
        )
    os.makedirs(path, exist_ok=True)
    weights = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    save_file(weights, os.path.join(path, "model.safetensors"))
    config = dict(
        model_type="llama",
        hidden_act="silu",
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        vocab_size=vocab,
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def sharded_shapes(model) -> dict:
    """Sharded key (an object's unique key) -> global shape (None for objects) of every entry
    ``model.sharded_state_dict()`` asks a checkpoint for."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    out = {}
    for entry in model.sharded_state_dict(metadata={"singleton_local_shards": False}).values():
        for built in entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]:
            for sh in built if isinstance(built, (list, tuple)) else [built]:
                name = sh.unique_key if isinstance(sh, ShardedObject) else sh.key
                out[name] = None if isinstance(sh, ShardedObject) else tuple(sh.global_shape)
    return out
