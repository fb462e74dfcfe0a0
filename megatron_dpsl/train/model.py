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


def build_model(args: argparse.Namespace, config, *, vp_stage: int | None = None):
    """This pipeline stage's ``GPTModel`` (virtual stage ``vp_stage`` with the interleaved
    schedule): the embedding on the first stage, the output layer and loss on the last, the stage's
    share of the layers (all of it without pipeline parallelism)."""
    from megatron.core import parallel_state

    from megatron_dpsl.models.gpt import build_gpt_model

    use_te = args.transformer_impl == "transformer_engine"
    whole = (
        vp_stage is None
    )  # one chunk per rank: its stage is the rank's (Megatron-LM's get_model)
    stage = dict(ignore_virtual=whole, vp_stage=vp_stage)
    return build_gpt_model(
        config,
        spec="layer",
        use_transformer_engine=use_te,
        spec_kwargs={}
        if use_te
        else {"normalization": args.normalization},  # the TE spec has no such argument
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(**stage),
        post_process=parallel_state.is_pipeline_last_stage(**stage),
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        **({} if whole else {"vp_stage": vp_stage}),
    )


def build_model_chunks(args: argparse.Namespace, config) -> list:
    """Megatron-LM's ``get_model``: one ``GPTModel`` per virtual pipeline stage of this rank (one in
    all without the interleaved schedule); ``LLaVAModel`` with ``--llava`` (one stage).

    On CPU, ``cpu_platform.model_construction`` answers the ``.cuda()`` calls made while building
    (CLIP's position ids, the tied embedding's move before its all-reduce across stages).
    """
    import contextlib

    from megatron_dpsl.train import cpu_platform

    building = (
        cpu_platform.model_construction if cpu_platform.is_enabled() else contextlib.nullcontext
    )
    with building():
        if args.llava:
            return [build_llava_model(args, config)]
        vpp = args.virtual_pipeline_model_parallel_size
        if vpp is None:
            return [build_model(args, config)]
        return [build_model(args, config, vp_stage=v) for v in range(vpp)]


def build_llava_model(args: argparse.Namespace, config):
    """A ``LLaVAModel`` (``--llava``): a CLIP ViT (``--encoder-num-layers``,
    ``--vision-hidden-size``), LLaVA-1.5's two-layer GELU projector and this language model, with
    automatic modality ids (``megatron_dpsl.models.vlm``); ``--freeze-LM`` / ``--freeze-ViT`` as
    Megatron-LM's ``pretrain_vlm``."""
    from megatron_dpsl.models.vlm import build_llava_model as build
    from megatron_dpsl.models.vlm import clip_vision_config
    from megatron_dpsl.train import vlm_data

    h = args.vision_hidden_size
    vision = clip_vision_config(
        config,
        hf_num_layers=args.encoder_num_layers,
        vision_feature_layer=-1,  # every layer: this ViT is trained here, not cut from CLIP-L
        hidden_size=h,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=4 * h,
    )
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
