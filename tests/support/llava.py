"""Helpers shared by the LLaVA upcycler tests (no tests here): real Megatron-Core ``LLaVAModel``s on
CPU, built from the Megatron-LM ``args`` a checkpoint carries, saved the two ways Megatron-LM saves
them (``torch_dist``; the legacy per-rank ``torch`` format), and their logits for prompts with
images.

Two vision sides: by default the ViT and projector are what upstream's ``pretrain_vlm.py`` builds
(a copy of the language model's config with ``--encoder-num-layers`` layers, the projector a dense
MLP of the same config); with ``args.vision_hidden_size`` (what the upcycler writes for a Hugging
Face LLaVA) a CLIP-style ViT of those fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch
import torch.nn.functional as F

from support.upcycle import dense_args, transformer_config

IMAGE_TOKEN = -200  # megatron.core.models.multimodal.llava_model.DEFAULT_IMAGE_TOKEN_INDEX


def llava_args(tp=1, **lm) -> argparse.Namespace:
    """Megatron-LM args of a tiny dense LLaVA as upstream's ``pretrain_vlm.py`` saves them: the
    dense GPT of support.upcycle plus a 2-layer ViT on 16x16 images in 8x8 patches, class token
    dropped. Weights drawn with std 0.2 so that logits are O(1) and a mapping error shows."""
    args = dense_args(**lm)
    args.init_method_std = 0.2
    args.tensor_model_parallel_size = tp
    args.encoder_num_layers = 2
    args.img_h = args.img_w = 16
    args.patch_dim = 8
    args.disable_vision_class_token = True
    return args


def _dense(config):
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    fields.update(
        num_moe_experts=None,
        moe_ffn_hidden_size=None,
        moe_router_topk=2,
        moe_shared_expert_intermediate_size=None,
        moe_layer_freq=1,
    )
    return type(config)(**fields)


def vision_configs(args, lm_config):
    """(ViT config, projector config): pretrain_vlm's copies of the language config, or the
    CLIP-style fields the upcycler writes for a Hugging Face source."""
    from megatron.core.activations import quick_gelu

    if getattr(args, "vision_hidden_size", None) is None:
        vit = _dense(lm_config)
        vit.num_layers = args.encoder_num_layers
        proj = _dense(lm_config)
    else:
        acts = {"quick_gelu": quick_gelu, "gelu": F.gelu}
        vit = dataclasses.replace(
            _dense(lm_config),
            num_layers=args.encoder_num_layers,
            hidden_size=args.vision_hidden_size,
            ffn_hidden_size=args.vision_ffn_hidden_size,
            num_attention_heads=args.vision_num_attention_heads,
            num_query_groups=args.vision_num_attention_heads,
            kv_channels=args.vision_kv_channels,
            gated_linear_unit=False,
            activation_func=acts[args.vision_activation],
            normalization="LayerNorm",
            layernorm_epsilon=args.vision_layernorm_epsilon,
            add_bias_linear=True,
            add_qkv_bias=True,
        )
        proj = dataclasses.replace(
            _dense(lm_config),
            ffn_hidden_size=args.vision_projector_ffn_hidden_size,
            gated_linear_unit=False,
            activation_func=acts[args.vision_projector_activation],
            add_bias_linear=args.vision_projector_bias,
        )
    vit.vision_model_type = "clip"
    return vit, proj


def rope_scaling(args) -> dict:
    """``LLaVAModel``'s RoPE-scaling arguments from the args (Llama-3.2's llama3 rule, factor 32);
    LLaVAModel's own default factor is 8."""
    if not getattr(args, "use_rope_scaling", False):
        return {}
    return dict(language_rope_scaling=True, language_rope_scaling_factor=args.rope_scaling_factor)


def _submodules(spec):
    """A spec's submodules; megatron-core 0.19 builds some specs as partials (VLM_NOTES §6.2
    (6))."""
    try:
        from megatron.core.transformer.spec_utils import get_submodules
    except ImportError:  # megatron-core 0.16
        return spec.submodules
    return get_submodules(spec)


def build_llava(args, lm_spec=None, tp=1, **kwargs):
    """A ``LLaVAModel`` (local specs; MoE language model when ``args.num_experts``) on CPU with
    tensor-parallel size ``tp``; ``kwargs`` go to ``LLaVAModel``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.models.multimodal.llava_spec import decoder_model_with_local_default_spec
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    from support.megatron_cpu import llava_construction

    lm_config = transformer_config(args, tensor_model_parallel_size=tp)
    vit, proj = vision_configs(args, lm_config)
    vit_spec = get_vit_layer_with_local_spec()
    # core_v0.16.1's local ViT spec says causal (fixed to no_mask at 0.19); CLIP attends to all
    # patches
    vit_spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    with llava_construction():
        return LLaVAModel(
            language_transformer_config=lm_config,
            language_transformer_layer_spec=lm_spec
            or decoder_model_with_local_default_spec(getattr(args, "num_experts", None)),
            language_vocab_size=args.padded_vocab_size,
            language_max_sequence_length=args.max_position_embeddings,
            vision_transformer_config=vit,
            vision_transformer_layer_spec=vit_spec,
            drop_vision_class_token=args.disable_vision_class_token,
            vision_projection_config=proj,
            vision_projection_layer_spec=_submodules(get_mlp_module_spec(use_te=False)),
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            language_position_embedding_type="rope",
            language_rotary_base=args.rotary_base,
            **rope_scaling(args),
            img_h=args.img_h,
            img_w=args.img_w,
            patch_dim=args.patch_dim,
            **kwargs,
        )


def prompts(vocab=96, seed=5):
    """Two prompts with one image each (first row: image mid-prompt; second: image first) and the
    16x16 images: ``(images [2, 3, 16, 16], tokens [2, 10])``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, 10), generator=g)
    tokens[0, 4] = IMAGE_TOKEN
    tokens[1, 0] = IMAGE_TOKEN
    return torch.randn(2, 3, 16, 16, generator=g), tokens


@torch.no_grad()
def llava_logits(model, images, tokens):
    """``[b, s_text]`` tokens with one ``-200`` per image -> ``[b, s, vocab]`` logits (s: the
    combined
    length; explicit causal mask on CPU)."""
    model.eval()
    b, s_text = tokens.shape
    n_images = int((tokens == IMAGE_TOKEN).sum(dim=1).max())
    s = s_text + n_images * (model.img_seq_len - 1)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)
    logits, _ = model(images, tokens, pos, mask, labels=None)
    return logits.float()


def vision_state(model) -> dict[str, torch.Tensor]:
    """The ViT's and projector's parameters (what upcycling must copy bit for bit)."""
    return {
        k: v
        for k, v in model.state_dict().items()
        if k.startswith(("vision_model.", "vision_projection.")) and torch.is_tensor(v)
    }


def save_legacy(model, save_dir, args, iteration=3, tp_rank=0):
    """Save like Megatron-LM's ``--ckpt-format torch``:
    ``iter_XXXXXXX/mp_rank_TT/model_optim_rng.pt`` holding ``state_dict_for_save_checkpoint()``
    (this rank's TP shards), args and iteration
    (``get_checkpoint_name`` and ``generate_state_dict`` in megatron/training/checkpointing.py)."""
    step = os.path.join(save_dir, f"iter_{iteration:07d}", f"mp_rank_{tp_rank:02d}")
    os.makedirs(step, exist_ok=True)
    state = {
        "args": argparse.Namespace(**{**vars(args), "ckpt_format": "torch"}),
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "model": model.state_dict_for_save_checkpoint(),
        "rng_state": [{"random_rng_state": torch.get_rng_state()}],
    }
    torch.save(state, os.path.join(step, "model_optim_rng.pt"))
    if tp_rank == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))


def build_plugin_llava(args, **dpsl):
    """The same LLaVA from the plugin's ``build_llava_model`` (GPT local spec, ``DPSLRouter``,
    modality ids on every forward); ``dpsl``: ``DPSLTransformerConfig`` fields for the router."""
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig
    from megatron_dpsl.models.vlm import build_llava_model
    from support.megatron_cpu import llava_construction

    base = transformer_config(args)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    fields.update(moe_router_load_balancing_type="dpsl", moe_dpsl_coeff=0.01, **dpsl)
    vit, proj = vision_configs(args, base)
    with llava_construction():
        return build_llava_model(
            DPSLTransformerConfig(**fields),
            vit,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            vision_projection_config=proj,
            img_h=args.img_h,
            img_w=args.img_w,
            patch_dim=args.patch_dim,
            drop_vision_class_token=args.disable_vision_class_token,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            language_position_embedding_type="rope",
            language_rotary_base=args.rotary_base,
            **rope_scaling(args),
        )
