"""Megatron-LM's ``pretrain_gpt.py`` with DPSL: the same flags plus ``--moe-dpsl-*``.

    # core_v0.16.1 or core_v0.19.0 (patches/*/upstream.lock)
    export MEGATRON_LM_PATH=/path/to/Megatron-LM
    torchrun --nproc-per-node 8 -m megatron_dpsl.megatron_lm.pretrain_gpt \\
        <Megatron-LM pretrain_gpt.py flags> --num-experts 8 \\
        --moe-router-load-balancing-type aux_loss dpsl --moe-aux-loss-coeff 1e-3 0.01 \\
        --moe-dpsl-alpha 0.75

Runs Megatron-LM's own flow (its ``__main__``: the datasets, ``forward_step`` and model building of
``pretrain_gpt``) and changes four things:

1. Every argument parse knows the DPSL flags and the ``dpsl`` type, including the re-parses that get
   no ``extra_args_provider`` (``registration.register_dpsl_arguments``).
2. The model config is ``DPSLTransformerConfig`` (``megatron_lm_config_from_args``).
3. The MoE layers get the plugin's modules (``DPSLRouter``, ``DPSLMoELayer``; ``specs``):
   core_v0.16.1 through its own builder around ``gpt_builders.gpt_builder``; core_v0.19.0 through
   ``GPTModelConfig.transformer_layer_spec`` as a callable around Megatron-LM's
   ``default_layer_spec``.
4. core_v0.19.0: ``DPSLMetricsTracker`` reports ``dpsl_loss``
   (``megatron_dpsl.tracking.metrics_tracker``).

The release is told apart by ``pretrain``'s signature: core_v0.16.x takes ``extra_args_provider``,
core_v0.19 a ``PretrainConfigContainer``. Works on an unpatched checkout; group priors need
``patches/`` (docs/megatron_lm.md).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
from functools import partial

_PROGRAM_START_TIME = time.time()

PATH_ENV = "MEGATRON_LM_PATH"


def import_megatron_lm_script(name: str):
    """Megatron-LM's entry script ``name`` (``pretrain_gpt``, ``pretrain_vlm``) as a module, from
    ``$MEGATRON_LM_PATH`` or ``sys.path``."""
    root = os.environ.get(PATH_ENV)
    if root:
        if not os.path.isfile(os.path.join(root, f"{name}.py")):
            raise SystemExit(
                f"{PATH_ENV}={root}: no {name}.py there; point it at a Megatron-LM checkout"
            )
        sys.path.insert(0, os.path.abspath(root))
    try:
        import megatron.training  # noqa: F401  (not in the megatron-core wheel)

        return importlib.import_module(name)
    except ImportError as e:
        raise SystemExit(
            f"megatron_dpsl.megatron_lm.{name} needs Megatron-LM's megatron/training and "
            f"{name}.py, which the megatron-core wheel does not ship ({e}). Set "
            f"{PATH_ENV}=/path/to/Megatron-LM "
            "(git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout "
            "core_v0.19.0, or "
            f"core_v0.16.1)."
        ) from e


def import_pretrain_gpt():
    """Megatron-LM's ``pretrain_gpt`` module, from ``$MEGATRON_LM_PATH`` or ``sys.path``."""
    return import_megatron_lm_script("pretrain_gpt")


def _is_patched(fn) -> bool:
    return "megatron-dpsl" in inspect.getsource(fn)


def dpsl_gpt_builder(
    args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None
):
    """``gpt_builders.gpt_builder`` with the DPSL config and, for MoE with DPSL, the DPSL layer
    spec."""
    import gpt_builders

    from megatron_dpsl.megatron_lm.args import megatron_lm_config_from_args

    _refuse_modality(args)
    if config is None and args.yaml_cfg is None:
        config = megatron_lm_config_from_args(args)
    if not getattr(config, "moe_plugin_enabled", False) or _is_patched(gpt_builders.gpt_builder):
        return gpt_builders.gpt_builder(
            args, pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection
        )
    return _build_dpsl_gpt(args, config, pre_process, post_process, vp_stage, pg_collection)


def _build_dpsl_gpt(args, config, pre_process, post_process, vp_stage, pg_collection):
    # Unpatched gpt_builder hard-codes the spec function, so build the MoE GPTModel here.
    from megatron_dpsl.models.gpt import build_gpt_model

    _refuse_unpatched_group_priors(config)
    unsupported = [
        ("--use-legacy-models", args.use_legacy_models),
        ("--spec", args.spec is not None),
        ("--experimental-attention-variant", args.experimental_attention_variant is not None),
        ("--mtp-num-layers", args.mtp_num_layers is not None),
    ]
    for flag, on in unsupported:
        if on:
            raise SystemExit(
                f"{flag}: not supported with --moe-router-load-balancing-type dpsl on an "
                "unpatched Megatron-LM; "
                f"apply patches/ (bash scripts/apply_megatron_patches.sh ${PATH_ENV})"
            )
    return build_gpt_model(
        config,
        spec="decoder_block",
        use_transformer_engine=args.transformer_impl == "transformer_engine",
        spec_kwargs=dict(
            normalization=args.normalization, qk_l2_norm=args.qk_l2_norm, vp_stage=vp_stage
        ),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        # Megatron-LM's gpt_builders passes no factor (GPTModel's default 8.0 at core_v0.16.1 and
        # core_v0.19.0): Llama 3.2's 32 would silently become 8
        rope_scaling_factor=args.rope_scaling_factor,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def extra_args_provider(parser):
    """``add_dpsl_args``, composed with ModelOpt's provider when pretrain_gpt uses one."""
    import pretrain_gpt

    from megatron_dpsl.megatron_lm.args import add_dpsl_args

    if pretrain_gpt.has_nvidia_modelopt:
        parser = pretrain_gpt.add_modelopt_args(parser)
    return add_dpsl_args(parser)


def dpsl_layer_spec(base=None):
    """core_v0.19: a ``GPTModelConfig.transformer_layer_spec`` callable giving ``base`` with the
    plugin's modules (``DPSLRouter``, or ``ACRouter``, and ``DPSLMoELayer``:
    ``specs.with_plugin_modules``).

    ``base``: what the layer spec would have been (``None``: Megatron-LM's ``default_layer_spec``;
    or the ``--spec`` object, a ``ModuleSpec`` or a callable). ``GPTModelBuilder.build_model`` calls
    the result as ``spec(model_config, vp_stage=vp_stage)``.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_dpsl.models.specs import router_for, with_plugin_modules

    def layer_spec(model_config, vp_stage=None):
        if base is None:
            from megatron.training.models.gpt import default_layer_spec

            spec = default_layer_spec(model_config, vp_stage)
        elif isinstance(base, ModuleSpec) or not callable(base):
            spec = base
        elif "vp_stage" in inspect.signature(base).parameters:  # as GPTModelBuilder calls it
            spec = base(model_config, vp_stage=vp_stage)
        else:
            spec = base(model_config)
        return with_plugin_modules(spec, router_for(model_config.transformer))

    return layer_spec


def dpsl_gpt_config(args, model_config_cls=None):
    """core_v0.19: ``gpt_config_from_args`` with the DPSL config and, with DPSL on, the DPSL layer
    spec."""
    from megatron.training.argument_utils import gpt_config_from_args

    from megatron_dpsl.megatron_lm.args import megatron_lm_config_from_args

    _refuse_modality(args)
    config = megatron_lm_config_from_args(args) if args.yaml_cfg is None else None
    extra = {} if model_config_cls is None else {"model_config_cls": model_config_cls}
    model_cfg = gpt_config_from_args(args, config=config, **extra)
    # gpt_config_from_args sets rope_scaling but no factor (GPTModelConfig's default 8.0 at
    # core_v0.19.0): Llama 3.2's 32 would silently become 8
    model_cfg.rope_scaling_factor = args.rope_scaling_factor
    if getattr(config, "moe_plugin_enabled", False):
        _refuse_unpatched_group_priors(config)
        model_cfg.transformer_layer_spec = dpsl_layer_spec(model_cfg.transformer_layer_spec)
    return model_cfg


def _refuse_modality(args) -> None:
    from megatron_dpsl.megatron_lm.args import require_token_groups

    try:
        require_token_groups(args, ("dataset",), "pretrain_gpt")
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _refuse_unpatched_group_priors(config) -> None:
    import pretrain_gpt

    # without patch 3 (4 at core_v0.19.0), forward_step never sets the token groups the router needs
    if config.moe_dpsl_uses_groups and not _is_patched(pretrain_gpt.forward_step):
        raise SystemExit(
            "--moe-dpsl-group-alphas/--moe-dpsl-num-groups: not supported on an unpatched "
            "Megatron-LM (its "
            "forward_step passes no token groups); apply patches/ (bash "
            f"scripts/apply_megatron_patches.sh ${PATH_ENV})"
        )


def _run_core_v016(pretrain_gpt, run, store) -> None:
    from megatron.core.enums import ModelType

    run(
        pretrain_gpt.train_valid_test_datasets_provider,
        partial(pretrain_gpt.model_provider, dpsl_gpt_builder),
        ModelType.encoder_or_decoder,
        pretrain_gpt.forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=extra_args_provider,
        store=store,
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )


def _run_core_v019(pretrain_gpt, run, store) -> None:
    # pretrain_gpt.py's __main__ at core_v0.19.0, with the DPSL provider, config, spec and tracker
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_dpsl.tracking.metrics_tracker import install_dpsl_metrics_tracker

    args = parse_and_validate_args(
        extra_args_provider=extra_args_provider,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )
    model_config_cls = None
    if pretrain_gpt.has_nvidia_modelopt:
        pretrain_gpt.maybe_enable_modelopt(args)
        if getattr(args, "modelopt_enabled", False):
            model_config_cls = pretrain_gpt.ModelOptModelConfig
    model_cfg = dpsl_gpt_config(args, model_config_cls)
    install_dpsl_metrics_tracker(args.moe_router_load_balancing_type)
    run(
        pretrain_cfg_container_from_args(args, model_cfg),
        pretrain_gpt.train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        pretrain_gpt.forward_step,
        store=store,
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )


def main() -> None:
    pretrain_gpt = import_pretrain_gpt()
    from megatron.training import arguments, inprocess_restart, pretrain, set_startup_timestamps

    from megatron_dpsl.megatron_lm.registration import register_dpsl_arguments

    register_dpsl_arguments(arguments)  # before the first parse (maybe_wrap_for_inprocess_restart)
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    if "extra_args_provider" in inspect.signature(pretrain).parameters:
        _run_core_v016(pretrain_gpt, run, store)
    else:
        _run_core_v019(pretrain_gpt, run, store)


if __name__ == "__main__":
    main()
