"""Build the ``DPSLTransformerConfig`` from the parsed flags and a Megatron-Core ``GPTModel`` from
it.

The config is filled by dataclass field name (``dpsl_config_from_args``, as Megatron-LM's
``core_transformer_config_from_args`` does); the few values Megatron-LM derives rather than copies
(``--swiglu``, dtypes, CPU initialisation) are passed as overrides. The model comes from
``megatron_dpsl.models.gpt.build_gpt_model``, the builder the Megatron-LM launcher shares: MoE
models get the DPSL layer spec (Megatron's GPT layer with ``DPSLRouter``), dense models Megatron's
own local (or Transformer Engine) spec.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def config_from_args(args: argparse.Namespace, *, use_cpu_initialization: bool):
    """``DPSLTransformerConfig`` for ``args`` (validated by ``arguments.validate_args``)."""
    from megatron_dpsl.megatron_lm.args import dpsl_config_from_args

    overrides = dict(
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=use_cpu_initialization,
        # Megatron-LM's core_transformer_config_from_args translation of --swiglu
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        bias_activation_fusion=False,
        num_query_groups=args.num_query_groups,
    )
    if args.num_experts is None:
        # a dense model: the MoE flags (defaults included) must not reach the config
        overrides.update(
            moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None
        )
    return dpsl_config_from_args(args, **overrides)


def build_model(args: argparse.Namespace, config):
    """A ``GPTModel`` (pre- and post-process: the trainer has no pipeline parallelism)."""
    from megatron_dpsl.models.gpt import build_gpt_model

    use_te = args.transformer_impl == "transformer_engine"
    return build_gpt_model(
        config,
        spec="layer",
        use_transformer_engine=use_te,
        spec_kwargs={}
        if use_te
        else {"normalization": args.normalization},  # the TE spec has no such argument
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
    )


def build_llava_model(args: argparse.Namespace, config):
    """A ``LLaVAModel`` (``--llava``): a CLIP ViT (``--encoder-num-layers``,
    ``--vision-hidden-size``), LLaVA-1.5's two-layer GELU projector and this language model, with
    automatic modality ids (``megatron_dpsl.models.vlm``); ``--freeze-LM`` / ``--freeze-ViT`` as
    Megatron-LM's ``pretrain_vlm``."""
    import contextlib

    from megatron_dpsl.models.vlm import build_llava_model as build
    from megatron_dpsl.models.vlm import clip_vision_config
    from megatron_dpsl.train import cpu_platform, vlm_data

    h = args.vision_hidden_size
    vision = clip_vision_config(
        config,
        hf_num_layers=args.encoder_num_layers,
        vision_feature_layer=-1,  # every layer: this ViT is trained here, not cut from CLIP-L
        hidden_size=h,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=4 * h,
    )
    building = (
        cpu_platform.llava_construction if cpu_platform.is_enabled() else contextlib.nullcontext
    )
    with building():
        model = build(
            config,
            vision,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.seq_length,
            language_spec_kwargs={"normalization": args.normalization},
            drop_vision_class_token=args.disable_vision_class_token,
            img_h=vlm_data.IMAGE_SIZE,
            img_w=vlm_data.IMAGE_SIZE,
            patch_dim=args.patch_dim,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            language_position_embedding_type=args.position_embedding_type,
        )
    model.freeze(args.freeze_LM, args.freeze_ViT, False)
    return model
