"""The VLM launcher's model provider: Megatron-LM's own ``pretrain_vlm.model_provider`` with the MoE
fixes.

Stock ``pretrain_vlm.model_provider`` does four things right that the plugin keeps (the tag's own
code runs them): the sequence-length arithmetic (image rows + ``--dataloader-seq-length``, CP/SP
padding, ``args.decoder_seq_length``), the padding attention-mask types, the ViT and projector
configs copied from the language config, and ``model.freeze(--freeze-LM, --freeze-ViT)``. It gets
four things wrong for an MoE LLaVA, which ``dpsl_vlm_model_provider`` fixes by giving it the DPSL
config (its ``config=`` argument) and, for the duration of the call, a ``LLaVAModel`` in its
namespace that rewrites the keyword arguments (``llava_kwargs``) before building Megatron-Core's
``LLaVAModel``:

============================================  =================================================
stock ``pretrain_vlm`` (core_v0.16.1, core_v0.19.0)  the launcher
============================================  =================================================
projector from the LM's MLP spec: with        the dense MLP spec of the same backend (local/TE):
``--num-experts`` ``MoESubmodules`` and        what stock builds for the same LM without experts,
``AttributeError: ... 'linear_fc1'``           so a dense stage's projector loads unchanged
MoE layers keep ``TopKRouter``                 ``DPSLRouter`` / ``DPSLMoELayer`` (``specs``)
ViT and projector configs inherit              ``num_moe_experts=None`` for both
``num_moe_experts`` ``share_embeddings_and_output_weights`` never  ``not
--untie-embeddings-and-output-weights`` passed (always untied)
(Megatron-LM's meaning of the flag) ``--rotary-base``, ``--rope-scaling-factor``   passed
(``language_rotary_base``, not passed (θ 10000, factor 8)
``language_rope_scaling_factor``) ViT widths = the LM's; projector = LM's MLP
``--vision-model-type clip``: CLIP ViT-L/14 widths
                                               and LLaVA-1.5's GELU projector
local ViT spec causal (core_v0.16.1)           ``no_mask`` (the ViT attends to every patch)
============================================  =================================================

After the build, ``--moe-dpsl-token-groups modality`` attaches the modality-id hook
(``models.llava_token_groups``) to the model.

"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator


def _dense(config):
    config = copy.copy(config)
    config.num_moe_experts = None
    return config


def _vision_config(args, stock):
    """The ViT's config: stock's copy of the language config without experts, or with
    ``--vision-model-type clip`` CLIP ViT-L/14's widths (``models.vlm.clip_vision_config``, all
    ``--encoder-num-layers`` layers)."""
    if getattr(args, "vision_model_type", None) != "clip":
        return _dense(stock)
    from megatron_dpsl.models.vlm import clip_vision_config

    return clip_vision_config(
        stock, hf_num_layers=stock.num_layers, vision_feature_layer=-1, num_moe_experts=None
    )


def llava_kwargs(args, kwargs: dict) -> dict:
    """The ``LLaVAModel`` keyword arguments the launcher builds with, from stock ``pretrain_vlm``'s
    ``kwargs``."""
    from megatron_dpsl.models.specs import router_for, with_plugin_modules
    from megatron_dpsl.models.vlm import (
        projection_config,
        projection_submodules,
        vision_layer_spec,
    )

    out = dict(kwargs)
    language = kwargs["language_transformer_config"]
    if getattr(language, "moe_plugin_enabled", False):
        out["language_transformer_layer_spec"] = with_plugin_modules(
            kwargs["language_transformer_layer_spec"], router_for(language)
        )
    use_te = args.transformer_impl == "transformer_engine"
    out["vision_transformer_config"] = _vision_config(args, kwargs["vision_transformer_config"])
    out["vision_transformer_layer_spec"] = vision_layer_spec(use_te)  # bidirectional at both tags
    if getattr(args, "vision_model_type", None) == "clip":
        # LLaVA-1.5's norm-free two-layer GELU projector (vision hidden -> LM hidden -> LM hidden,
        # biases): what the upcycler writes for a Hugging Face LLaVA
        out["vision_projection_config"] = projection_config(language)
        out["vision_projection_layer_spec"] = projection_submodules(use_te, norm=False)
    else:
        # the dense MLP stock builds for the same LM without experts (TE: its fused LayerNorm)
        out["vision_projection_config"] = _dense(kwargs["vision_projection_config"])
        out["vision_projection_layer_spec"] = projection_submodules(use_te, norm=use_te)
    out["share_embeddings_and_output_weights"] = not args.untie_embeddings_and_output_weights
    out["language_rotary_base"] = args.rotary_base
    out["language_rope_scaling_factor"] = args.rope_scaling_factor
    return out


@contextlib.contextmanager
def _llava_model_bound(pretrain_vlm, args) -> Iterator[None]:
    """In the block ``pretrain_vlm.LLaVAModel`` builds with ``llava_kwargs``; stock afterwards."""
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    from megatron_dpsl.models.vlm import clip_norms_without_te

    def build(**kwargs):
        with clip_norms_without_te():
            return LLaVAModel(**llava_kwargs(args, kwargs))

    stock = pretrain_vlm.LLaVAModel
    pretrain_vlm.LLaVAModel = build
    try:
        yield
    finally:
        pretrain_vlm.LLaVAModel = stock


@contextlib.contextmanager
def _ckpt_format_checked_here(args) -> Iterator[None]:
    """Stock ``model_provider`` asserts ``--ckpt-format torch``; the launcher also saves and loads
    torch_dist (``LLaVAModel``'s sharded state dict; what the upcycler writes) and checks the flag
    itself (``vlm_args.check_vlm_args``), so the stock assertion sees ``torch`` for the duration of
    the call."""
    fmt = args.ckpt_format
    args.ckpt_format = "torch"
    try:
        yield
    finally:
        args.ckpt_format = fmt


def dpsl_vlm_model_provider(
    pre_process=True,
    post_process=True,
    add_encoder=True,
    add_decoder=True,
    parallel_output=True,
    config=None,
    pg_collection=None,
    vp_stage=None,
):
    """``pretrain_vlm.model_provider`` (same signature) building the LLaVA described in the module
    docstring."""
    import pretrain_vlm
    from megatron.training import get_args

    from megatron_dpsl.megatron_lm.args import megatron_lm_config_from_args

    args = get_args()
    if config is None:
        config = megatron_lm_config_from_args(args)
    with _llava_model_bound(pretrain_vlm, args), _ckpt_format_checked_here(args):
        model = pretrain_vlm.model_provider(
            pre_process=pre_process,
            post_process=post_process,
            add_encoder=add_encoder,
            add_decoder=add_decoder,
            parallel_output=parallel_output,
            config=config,
            pg_collection=pg_collection,
        )
    if getattr(args, "moe_dpsl_token_groups", None) == "modality":
        attach_modality_ids(model, args.moe_dpsl_vision_group or 0)
    return model


def attach_modality_ids(model, vision_group: int) -> None:
    """Every forward of ``model`` sets the ``[b, S]`` modality ids (image rows ``vision_group``,
    text the other; padding excluded) for the routers: ``models.llava_token_groups``' forward
    pre-hook.
    """
    from megatron_dpsl.models.llava_modality import ModalityGroups
    from megatron_dpsl.models.llava_token_groups import attach_llava_token_groups

    attach_llava_token_groups(model, ModalityGroups(vision=vision_group, text=1 - vision_group))
