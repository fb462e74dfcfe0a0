"""Megatron-LM's ``pretrain_gpt.py`` with DPSL: the same flags plus ``--moe-dpsl-*``.

    export MEGATRON_LM_PATH=/path/to/Megatron-LM        # a checkout of core_v0.16.1 (patches/upstream.lock)
    torchrun --nproc-per-node 8 -m megatron_dpsl.megatron_lm.pretrain_gpt \\
        <Megatron-LM pretrain_gpt.py flags> --num-experts 8 \\
        --moe-router-load-balancing-type dpsl --moe-dpsl-coeff 0.01 --moe-dpsl-alpha 0.75

Runs Megatron-LM's own flow (``pretrain`` with ``pretrain_gpt``'s datasets, ``forward_step`` and
``model_provider``) and changes three things: ``add_dpsl_args`` as ``extra_args_provider``, the
model config built as ``DPSLTransformerConfig``, and the MoE layer spec with ``DPSLRouter``
(``get_dpsl_decoder_block_spec``). Works on an unpatched checkout; group priors and the reduced
``dpsl_loss`` log need ``patches/`` (docs/megatron_lm.md).
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from functools import partial

_PROGRAM_START_TIME = time.time()

PATH_ENV = "MEGATRON_LM_PATH"


def import_pretrain_gpt():
    """Megatron-LM's ``pretrain_gpt`` module, from ``$MEGATRON_LM_PATH`` or ``sys.path``."""
    root = os.environ.get(PATH_ENV)
    if root:
        if not os.path.isfile(os.path.join(root, "pretrain_gpt.py")):
            raise SystemExit(f"{PATH_ENV}={root}: no pretrain_gpt.py there; point it at a Megatron-LM checkout")
        sys.path.insert(0, os.path.abspath(root))
    try:
        import megatron.training  # noqa: F401  (not in the megatron-core wheel)
        import pretrain_gpt
    except ImportError as e:
        raise SystemExit(
            f"megatron_dpsl.megatron_lm.pretrain_gpt needs Megatron-LM's megatron/training and pretrain_gpt.py, "
            f"which the megatron-core wheel does not ship ({e}). Set {PATH_ENV}=/path/to/Megatron-LM "
            f"(git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout core_v0.16.1)."
        ) from e
    return pretrain_gpt


def _is_patched(fn) -> bool:
    return "megatron-dpsl" in inspect.getsource(fn)


def dpsl_gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    """``gpt_builders.gpt_builder`` with the DPSL config and, for MoE with DPSL, the DPSL layer spec."""
    import gpt_builders
    from megatron_dpsl.megatron_lm.args import megatron_lm_config_from_args

    if config is None and args.yaml_cfg is None:
        config = megatron_lm_config_from_args(args)
    if not getattr(config, "moe_dpsl_enabled", False) or _is_patched(gpt_builders.gpt_builder):
        return gpt_builders.gpt_builder(args, pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection)
    return _build_dpsl_gpt(args, config, pre_process, post_process, vp_stage, pg_collection)


def _build_dpsl_gpt(args, config, pre_process, post_process, vp_stage, pg_collection):
    # Unpatched gpt_builder hard-codes the spec function, so build the MoE GPTModel here.
    from megatron.core.models.gpt import GPTModel
    from megatron_dpsl.specs import get_dpsl_decoder_block_spec

    def unpatched_forward_step():
        import pretrain_gpt

        return not _is_patched(pretrain_gpt.forward_step)

    unsupported = [
        ("--use-legacy-models", args.use_legacy_models),
        ("--spec", args.spec is not None),
        ("--experimental-attention-variant", args.experimental_attention_variant is not None),
        ("--mtp-num-layers", args.mtp_num_layers is not None),
        # without patch 3, forward_step never sets the token groups the router needs
        ("--moe-dpsl-group-alphas/--moe-dpsl-num-groups", config.moe_dpsl_uses_groups and unpatched_forward_step()),
    ]
    for flag, on in unsupported:
        if on:
            raise SystemExit(
                f"{flag}: not supported with --moe-router-load-balancing-type dpsl on an unpatched Megatron-LM; "
                f"apply patches/ (bash scripts/apply_megatron_patches.sh ${PATH_ENV})"
            )
    spec = get_dpsl_decoder_block_spec(
        config,
        use_transformer_engine=args.transformer_impl == "transformer_engine",
        normalization=args.normalization,
        qk_l2_norm=args.qk_l2_norm,
        vp_stage=vp_stage,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
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


def main() -> None:
    pretrain_gpt = import_pretrain_gpt()
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain, set_startup_timestamps

    if "extra_args_provider" not in inspect.signature(pretrain).parameters:
        raise SystemExit(
            "this Megatron-LM's pretrain() takes no extra_args_provider (core_v0.19 and later); the launcher "
            "supports core_v0.16.x, see docs/megatron_lm.md for newer releases"
        )
    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    run, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
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


if __name__ == "__main__":
    main()
