"""Load an upcycled checkpoint with megatron-core on a CPU, run it, and (for an exact upcycle of a
Hugging Face model) compare its logits with the original's. docs/upcycling.md, "Loading the output".

    megatron-dpsl-upcycle --source hf/Llama --output ckpts/llama-exact \\
        --num-experts 8 --granularity 2 --moe-router-topk 4 --weight-scaling exact
    # load + forward
    python examples/load_upcycled_cpu.py --load ckpts/llama-exact
    # + max |logit diff|
    python examples/load_upcycled_cpu.py --load ckpts/llama-exact --compare-hf hf/Llama

What it does, in the order Megatron-LM does it: read ``args`` from the checkpoint's common state
(``dist_checkpointing.load_common_state_dict``), build the MoE ``GPTModel`` those args describe
(local spec with ``DPSLRouter``; no Transformer Engine on a CPU), ask the model for its sharded
state dict with the checkpoint's content metadata, ``dist_checkpointing.load`` it and
``load_state_dict(strict=True)``. One gloo process; ``megatron_dpsl.train.cpu_platform.enable()``
answers megatron-core's few CUDA-only calls (leave it out on a GPU).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F


def step_dir(load: Path) -> Path:
    """The directory Megatron-LM's ``--load`` reads: ``release/`` or ``iter_XXXXXXX/`` per the
    tracker file."""
    tracker = (load / "latest_checkpointed_iteration.txt").read_text().strip()
    return load / ("release" if tracker == "release" else f"iter_{int(tracker):07d}")


def config_from_args(args: argparse.Namespace):
    """The ``DPSLTransformerConfig`` of the checkpoint's Megatron-LM ``args`` (what
    ``core_transformer_config_from_args`` would build from the same flags), for CPU inference."""
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    gated = bool(args.swiglu or getattr(args, "quick_geglu", False))
    activation = F.silu if args.swiglu else F.gelu
    return DPSLTransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        gated_linear_unit=gated,
        activation_func=activation,
        normalization=args.normalization,
        # --norm-epsilon's dest: layernorm_epsilon (Megatron-LM >= 0.14), norm_epsilon before
        layernorm_epsilon=getattr(args, "layernorm_epsilon", getattr(args, "norm_epsilon", 1e-5)),
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        moe_layer_freq=args.moe_layer_freq,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_score_function=args.moe_router_score_function,
        moe_token_dispatcher_type="allgather",  # alltoall creates a CUDA stream
        moe_router_load_balancing_type="dpsl",
        moe_aux_loss_coeff=0.0,
        moe_dpsl_coeff=0.01,
        moe_dpsl_alpha=1.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
    )


def load_upcycled(load: Path):
    """(model, args): the MoE GPTModel with the checkpoint's weights; model-parallel state must
    exist."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel

    from megatron_dpsl.models.specs import get_dpsl_decoder_block_spec

    step = step_dir(load)
    args = dist_checkpointing.load_common_state_dict(str(step))["args"]
    config = config_from_args(args)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_dpsl_decoder_block_spec(
            config, use_transformer_engine=False, normalization=args.normalization
        ),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )
    metadata = dist_checkpointing.load_content_metadata(str(step))
    loaded = dist_checkpointing.load(
        {"model": model.sharded_state_dict(metadata=metadata)}, str(step)
    )
    model.load_state_dict(loaded["model"], strict=True)
    return model, args


@torch.no_grad()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` tokens -> ``[batch, seq, vocab]`` logits (explicit causal mask: CPU
    attention)."""
    model.eval()
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    causal = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)
    return model(tokens, positions, causal).float()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--load", type=Path, required=True, help="the upcycler's --output directory")
    p.add_argument(
        "--compare-hf", type=Path, help="the HF source directory: print max |logit diff| against it"
    )
    p.add_argument(
        "--seq-length", type=int, default=16, help="tokens per sequence of the test batch"
    )
    args = p.parse_args(argv)

    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megatron_dpsl.train import cpu_platform

    cpu_platform.enable()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(
        1234
    )  # Megatron-LM's _set_random_seed (dropout streams)
    try:
        model, ckpt_args = load_upcycled(args.load)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(
            0, ckpt_args.padded_vocab_size, (2, args.seq_length), generator=generator
        )
        out = logits(model, tokens)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"loaded {args.load} (strict): {params} parameters, {ckpt_args.num_experts} experts, "
            f"top-{ckpt_args.moe_router_topk}; logits {list(out.shape)}, "
            f"finite: {bool(out.isfinite().all())}"
        )
        if args.compare_hf is not None:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(args.compare_hf).float().eval()
            with torch.no_grad():
                ref = hf(tokens).logits.float()
            print(f"max |logit diff| vs {args.compare_hf}: {(out - ref).abs().max().item():.3e}")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
