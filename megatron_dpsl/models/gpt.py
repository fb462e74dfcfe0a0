"""One ``GPTModel`` builder for the embedded trainer and the Megatron-LM launcher.

    from megatron_dpsl.models.gpt import build_gpt_model
    model = build_gpt_model(config, spec="decoder_block", use_transformer_engine=True,
                            spec_kwargs={"normalization": "RMSNorm"},
                            vocab_size=50304, max_sequence_length=4096,
                            position_embedding_type="rope")

MoE configs get ``DPSLRouter`` in their MoE layers (``specs``); dense configs Megatron's own spec.
Every keyword other than the spec's goes to ``GPTModel`` unchanged, so the callers keep
Megatron-LM's flag → argument mapping (``megatron_dpsl.train.model``, ``megatron_lm.pretrain_gpt``).
"""

from __future__ import annotations

from megatron_dpsl.models.specs import get_dpsl_decoder_block_spec, get_dpsl_layer_spec

SPEC_CHOICES = ("layer", "decoder_block")


def gpt_layer_spec(
    config, *, spec: str = "layer", use_transformer_engine: bool = False, **spec_kwargs
):
    """The ``transformer_layer_spec`` ``GPTModel`` gets for ``config``.

    Args:
        config: ``DPSLTransformerConfig`` (MoE when ``num_moe_experts`` is set, dense otherwise).
        spec: ``"layer"``: one layer spec for every layer
            (``get_gpt_layer_{local,with_transformer_engine}_spec``);
            ``"decoder_block"``: per-layer specs (``get_gpt_decoder_block_spec``:
            ``moe_layer_freq``, ``vp_stage``), what Megatron-LM's ``gpt_builder`` uses.
        use_transformer_engine: Transformer Engine modules instead of Megatron-Core's local ones.
        **spec_kwargs: forwarded to Megatron's spec function (``normalization``, ``qk_l2_norm``,
            ``vp_stage``...).
    """
    if spec not in SPEC_CHOICES:
        raise ValueError(f"spec must be one of {list(SPEC_CHOICES)}, got {spec!r}")
    if spec == "decoder_block":
        return get_dpsl_decoder_block_spec(config, use_transformer_engine, **spec_kwargs)
    if config.num_moe_experts:
        return get_dpsl_layer_spec(config, use_transformer_engine, **spec_kwargs)
    from megatron.core.models.gpt import gpt_layer_specs

    make = (
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
        if use_transformer_engine
        else gpt_layer_specs.get_gpt_layer_local_spec
    )
    return make(num_experts=None, **spec_kwargs)  # a dense model: no router to swap


def build_gpt_model(
    config,
    *,
    spec: str = "layer",
    use_transformer_engine: bool = False,
    spec_kwargs: dict | None = None,
    **gpt_kwargs,
):
    """``GPTModel(config, transformer_layer_spec=gpt_layer_spec(config, ...), **gpt_kwargs)``.

    ``spec``, ``use_transformer_engine`` and ``spec_kwargs`` choose the layer spec
    (``gpt_layer_spec``);
    ``gpt_kwargs`` are ``GPTModel``'s (``vocab_size``, ``max_sequence_length``, ``pre_process``,
    ...).
    """
    from megatron.core.models.gpt import GPTModel

    layer_spec = gpt_layer_spec(
        config, spec=spec, use_transformer_engine=use_transformer_engine, **(spec_kwargs or {})
    )
    return GPTModel(config=config, transformer_layer_spec=layer_spec, **gpt_kwargs)
