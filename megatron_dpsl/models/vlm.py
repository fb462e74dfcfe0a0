"""An MoE vision-language model with DPSL: Megatron-Core's ``LLaVAModel``, the plugin's language
spec.

    from megatron_dpsl import DPSLTransformerConfig
    from megatron_dpsl.models.llava_modality import ModalityGroups
    from megatron_dpsl.models.vlm import build_llava_model, clip_vision_config

    lm = DPSLTransformerConfig(..., num_moe_experts=4, moe_router_topk=2,
                               moe_router_load_balancing_type="dpsl", moe_dpsl_coeff=0.01,
                               moe_dpsl_alpha_base=0.75, moe_dpsl_alpha_shift=0.5,
                               moe_dpsl_num_groups=2)
    model = build_llava_model(lm, clip_vision_config(lm), vocab_size=32000,
                              max_sequence_length=4096, img_h=336, img_w=336, patch_dim=14,
                              token_groups=ModalityGroups(vision=0, text=1))   # the default
    output, loss_mask = model(images, input_ids, position_ids, attention_mask, labels=labels,
                              loss_mask=loss_mask, num_image_tiles=tiles)

The language model gets ``DPSLRouter`` (or ``ACRouter``) in its MoE layers (``models.gpt``); the ViT
and the projector are dense: their configs may not name experts, and the projector spec is built
here, never taken from the language spec (Megatron-LM's ``pretrain_vlm.py`` fails that way with
``--num-experts``). Every forward computes the modality ids itself (``models.llava_token_groups``):
image rows, text rows (split by data subset with ``dpsl_task_ids=``), padding left out of every
router loss. No user code computes ids.

LLaVA-1.5 (the paper's setting): ``clip_vision_config(lm)`` is CLIP ViT-L/14 cut at its penultimate
layer (HF layers - 1, quick-GELU, no ``ln_post``); ``drop_vision_class_token=True`` and the
norm-free two-layer GELU projector (``projector_norm=False``) are the defaults. Tied language models
(Llama-3.2-1B, Qwen2-1.5B) need ``share_embeddings_and_output_weights=True`` and Llama-3.2 its RoPE
factor (``language_rope_scaling=True, language_rope_scaling_factor=32.0``); ``LLaVAModel``'s
defaults (untied, factor 8) are wrong for them. docs/vlm.md has the details.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from megatron_dpsl.models.gpt import gpt_layer_spec
from megatron_dpsl.models.llava_modality import (
    IMAGE_TOKEN_INDEX,
    ModalityGroups,
    check_image_token_index,
)
from megatron_dpsl.models.llava_token_groups import attach_llava_token_groups
from megatron_dpsl.models.specs import require_te

MODALITY_PRIOR = ModalityGroups()  # image rows group 0, text rows group 1 (paper Sec. 3.4)
# fields the ViT and projector configs take from the language model's (parallelism, precision, init)
SHARED_FIELDS = (
    "tensor_model_parallel_size",
    "params_dtype",
    "fp16",
    "bf16",
    "use_cpu_initialization",
    "perform_initialization",
    "init_method_std",
    "gradient_accumulation_fusion",
)


def _shared(language_config) -> dict:
    return {name: getattr(language_config, name) for name in SHARED_FIELDS}


def clip_vision_config(
    language_config,
    *,
    hf_num_layers: int = 24,
    vision_feature_layer: int = -2,
    hidden_size: int = 1024,
    num_attention_heads: int = 16,
    ffn_hidden_size: int = 4096,
    **overrides,
):
    """A dense CLIP ViT ``TransformerConfig`` (``vision_model_type="clip"``), LLaVA-1.5's by
    default.

    HF LLaVA reads ``hidden_states[vision_feature_layer]`` (-2: the penultimate layer, before
    ``post_layernorm``); Megatron's CLIP returns its last layer, so the ViT keeps
    ``hf_num_layers + 1 + vision_feature_layer`` layers (23 for CLIP-L). quick-GELU, biases,
    LayerNorm, no dropout, as OpenAI CLIP. ``overrides`` go to ``TransformerConfig`` last.
    """
    from megatron.core.activations import quick_gelu
    from megatron.core.transformer.transformer_config import TransformerConfig

    num_layers = (
        hf_num_layers + 1 + vision_feature_layer
        if vision_feature_layer < 0
        else vision_feature_layer
    )
    if not 1 <= num_layers <= hf_num_layers:
        raise ValueError(
            f"clip_vision_config: vision_feature_layer={vision_feature_layer} selects no layer of "
            f"{hf_num_layers}"
        )
    fields = dict(
        _shared(language_config),
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=quick_gelu,
        bias_activation_fusion=False,
        normalization="LayerNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    fields.update(overrides)
    config = TransformerConfig(**fields)
    config.vision_model_type = "clip"  # read by LLaVAModel; not a TransformerConfig field
    return config


def projection_config(language_config, **overrides):
    """The dense projector's ``TransformerConfig``: LLaVA-1.5's ``mlp2x_gelu`` (vision hidden → LM
    hidden → LM hidden, erf GELU, biases). ``overrides`` (e.g. ``ffn_hidden_size``) go to
    ``TransformerConfig`` last."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        _shared(language_config),
        num_layers=1,  # unused by the projector, required by TransformerConfig
        hidden_size=language_config.hidden_size,
        ffn_hidden_size=language_config.hidden_size,
        num_attention_heads=language_config.num_attention_heads,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        bias_activation_fusion=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def vision_layer_spec(use_transformer_engine: bool = False):
    """Megatron's ViT layer spec with bidirectional attention (0.16's local spec says causal: a
    bug)."""
    from megatron.core.models.vision import vit_layer_specs
    from megatron.core.transformer.enums import AttnMaskType

    if use_transformer_engine:
        return vit_layer_specs.get_vit_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(vit_layer_specs.get_vit_layer_with_local_spec())
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    return spec


def projection_submodules(use_transformer_engine: bool = False, norm: bool = False):
    """The projector's dense ``MLPSubmodules`` (fc1 → activation → fc2); ``norm`` puts a LayerNorm
    on fc1's input (TE only: Megatron-LM's TE projector has one; LLaVA-1.5's has none)."""
    from megatron.core.transformer.mlp import MLPSubmodules

    if use_transformer_engine:
        from megatron.core.extensions import transformer_engine as te

        fc1 = te.TELayerNormColumnParallelLinear if norm else te.TEColumnParallelLinear
        return MLPSubmodules(linear_fc1=fc1, linear_fc2=te.TERowParallelLinear)
    if norm:
        raise ValueError(
            "projector_norm=True needs use_transformer_engine=True (a fused LayerNorm linear)"
        )
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
    )

    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def _check_dense(config, name: str) -> None:
    if getattr(config, "num_moe_experts", None):
        raise ValueError(
            f"{name}.num_moe_experts must be None: the ViT and the projector stay dense "
            f"(got {config.num_moe_experts}); only the language model has experts"
        )


def _hook_groups(language_config, vision_config, token_groups, llava_kwargs):
    """The ``ModalityGroups`` to attach (``None``: no hook), after the checks that need no model."""
    if vision_config is None:
        raise ValueError(
            "build_llava_model: vision_config is None: LLaVAModel (and modality priors) need a "
            "vision "
            "encoder config; for a text-only model use megatron_dpsl.models.gpt.build_gpt_model"
        )
    uses_groups = getattr(language_config, "moe_dpsl_num_token_groups", None) is not None
    if token_groups is None:
        return None
    if (
        uses_groups
        and token_groups.vision is not None
        and llava_kwargs.get("pre_process", True)
        and not llava_kwargs.get("add_encoder", True)
    ):
        raise ValueError(
            "modality priors need a vision encoder: add_encoder=False builds none; "
            "use ModalityGroups(vision=None) for task-only groups"
        )
    return token_groups


def _llava_parts(language_config, vision_config, projection, use_te, language_layer_spec, norm):
    """``LLaVAModel``'s config and spec arguments for its three parts, the ViT and projector
    dense."""
    _check_dense(vision_config, "vision_config")
    _check_dense(projection, "vision_projection_config")
    if not hasattr(vision_config, "vision_model_type"):
        vision_config.vision_model_type = "clip"
    return dict(
        language_transformer_config=language_config,
        language_transformer_layer_spec=language_layer_spec,
        vision_transformer_config=vision_config,
        vision_transformer_layer_spec=vision_layer_spec(use_te),
        vision_projection_config=projection,
        vision_projection_layer_spec=projection_submodules(use_te, norm),
    )


def _language_spec(language_config, spec: str, use_transformer_engine: bool, kwargs: dict | None):
    """The language model's layer spec (``models.gpt.gpt_layer_spec``)."""
    return gpt_layer_spec(
        language_config, spec=spec, use_transformer_engine=use_transformer_engine, **(kwargs or {})
    )


@contextlib.contextmanager
def clip_norms_without_te() -> Iterator[None]:
    """While ``LLaVAModel`` is built: CLIP's ``ln_pre``/``ln_post`` that build without Transformer
    Engine.

    Megatron-Core's ``CLIPViTModel`` defaults them to ``torch.nn.LayerNorm`` when TE is absent, and
    ``build_module`` then passes it ``config=`` (a TypeError at construction, on a GPU as on a CPU:
    found on an H200 without TE). ``LLaVAModel`` looks ``CLIPViTModel`` up at call time, so for the
    block it gets Megatron's own ``WrappedTorchNorm``. A no-op where TE provides the norm.
    """
    from megatron.core.models.multimodal import llava_model
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    stock = llava_model.CLIPViTModel
    if clip_vit_model.NORM_IMPL is torch.nn.LayerNorm:
        llava_model.CLIPViTModel = functools.partial(
            clip_vit_model.CLIPViTModel, ln_pre_impl=WrappedTorchNorm, ln_post_impl=WrappedTorchNorm
        )
    try:
        yield
    finally:
        llava_model.CLIPViTModel = stock


def build_llava_model(
    language_config,
    vision_config,
    *,
    vocab_size: int,
    max_sequence_length: int,
    vision_projection_config=None,
    use_transformer_engine: bool = False,
    language_spec: str = "layer",
    language_spec_kwargs: dict | None = None,
    projector_norm: bool = False,
    drop_vision_class_token: bool = True,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    token_groups: ModalityGroups | None = MODALITY_PRIOR,
    **llava_kwargs,
):
    """Megatron-Core's ``LLaVAModel``: the plugin's language spec, dense ViT, projector, group ids.

    Args:
        language_config: the language model's ``DPSLTransformerConfig`` (MoE or dense).
        vision_config: the ViT's config (no experts; ``clip_vision_config``).
        vocab_size / max_sequence_length: the language model's (longer combined rows are truncated).
        vision_projection_config: the projector's (default ``projection_config(language_config)``).
        use_transformer_engine: TE specs for all three parts (``LLaVAModel`` needs them for SP/CP).
        language_spec / language_spec_kwargs: ``models.gpt.gpt_layer_spec``'s ``spec`` and kwargs.
        projector_norm: a LayerNorm before the projector's fc1 (TE only; LLaVA-1.5 has none).
        drop_vision_class_token / image_token_index: ``LLaVAModel``'s (the index: no vocab id).
        token_groups: the row → group mapping of the forward pre-hook (``None``: no hook).
        **llava_kwargs: ``LLaVAModel``'s other arguments (``img_h``, ``patch_dim``,
            ``share_embeddings_and_output_weights``, ``language_rope_scaling_factor``...).
    """
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    require_te(use_transformer_engine)  # before any part is built: one message, not three
    token_groups = _hook_groups(language_config, vision_config, token_groups, llava_kwargs)
    check_image_token_index(image_token_index, vocab_size)
    parts = _llava_parts(
        language_config,
        vision_config,
        vision_projection_config or projection_config(language_config),
        use_transformer_engine,
        _language_spec(
            language_config, language_spec, use_transformer_engine, language_spec_kwargs
        ),
        projector_norm,
    )
    with clip_norms_without_te():
        model = LLaVAModel(
            **parts,
            language_vocab_size=vocab_size,
            language_max_sequence_length=max_sequence_length,
            drop_vision_class_token=drop_vision_class_token,
            image_token_index=image_token_index,
            vision_projection_type="mlp",
            **llava_kwargs,
        )
    if token_groups is not None:
        attach_llava_token_groups(model, token_groups)
    return model
