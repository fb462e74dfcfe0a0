"""Megatron-LM's ``pretrain_vlm.py`` with an MoE language model and DPSL: the same flags plus
``--moe-dpsl-*``.

    export MEGATRON_LM_PATH=/path/to/Megatron-LM        # core_v0.16.1 or core_v0.19.0
    torchrun --nproc-per-node 8 -m megatron_dpsl.megatron_lm.pretrain_vlm \\
        <Megatron-LM pretrain_vlm.py flags> --num-experts 4 --moe-router-topk 2 \\
        --moe-router-load-balancing-type aux_loss dpsl --moe-aux-loss-coeff 1e-3 0.01 \\
        --moe-dpsl-alpha-base 0.75 --moe-dpsl-alpha-shift 0.5 --moe-dpsl-num-groups 2 \\
        --moe-dpsl-token-groups modality

Runs Megatron-LM's own ``pretrain_vlm`` flow (its datasets, ``get_batch``/``forward_step``, its
``model_provider``'s sequence-length arithmetic and freezing) and changes what stock
``pretrain_vlm`` gets wrong for an MoE LLaVA (``vlm_provider``):

1. Every argument parse knows the DPSL flags and the ``dpsl`` type (``registration``, as for GPT).
2. The language model's config is ``DPSLTransformerConfig`` and its MoE layers get the plugin's
   modules.
3. The vision projector is dense (stock builds it from the MoE spec and dies with
   ``'MoESubmodules' object has no attribute 'linear_fc1'``), the output layer is tied unless
   ``--untie-embeddings-and-output-weights``, and ``--rotary-base`` / ``--rope-scaling-factor``
   reach the language model (stock drops both: a Llama-3.2 LLaVA silently gets θ=10000 and factor
   8).
4. ``--moe-dpsl-token-groups modality``: every forward computes each position's modality (image
   rows vs text) from the batch itself, so group priors need no patched script.
5. core_v0.19.0: ``DPSLMetricsTracker`` reports ``dpsl_loss`` (``metrics_tracker``).

Flags the run cannot honour stop it before training with one line naming the flag
(``vlm_args.check_vlm_args``), among them a ``--load`` checkpoint whose vision config the flags
contradict. The release is told apart by ``pretrain``'s signature, as in ``pretrain_gpt``.
"""

from __future__ import annotations

import inspect

from megatron_dpsl.megatron_lm.pretrain_gpt import import_megatron_lm_script


def import_pretrain_vlm():
    """Megatron-LM's ``pretrain_vlm`` module, from ``$MEGATRON_LM_PATH`` or ``sys.path``."""
    return import_megatron_lm_script("pretrain_vlm")


def extra_args_provider(parser):
    """``pretrain_vlm``'s own flags (``--freeze-LM``, ``--freeze-ViT``, ...), the DPSL flags and the
    launcher's."""
    import pretrain_vlm

    from megatron_dpsl.megatron_lm.args import add_dpsl_args
    from megatron_dpsl.megatron_lm.vlm_args import add_vlm_args

    return add_vlm_args(add_dpsl_args(pretrain_vlm.add_vlm_extra_args(parser)))


def _check(args) -> None:
    from megatron_dpsl.megatron_lm.vlm_args import check_vlm_args

    try:
        check_vlm_args(args)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _run_core_v016(pretrain_vlm, pretrain) -> None:
    from megatron.core.enums import ModelType
    from megatron.training.arguments import parse_args

    from megatron_dpsl.megatron_lm.vlm_provider import dpsl_vlm_model_provider

    # pretrain parses the command line itself, after the process group exists; the launcher's checks
    # must stop a bad command before that, so it parses it once more here (same provider, same argv)
    _check(parse_args(extra_args_provider=extra_args_provider))
    pretrain(
        pretrain_vlm.train_valid_test_datasets_provider,
        dpsl_vlm_model_provider,
        ModelType.encoder_or_decoder,
        pretrain_vlm.forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=extra_args_provider,
        get_embedding_ranks=pretrain_vlm.llava_embedding_ranks,
        get_position_embedding_ranks=pretrain_vlm.llava_position_embedding_ranks,
    )


def _run_core_v019(pretrain_vlm, pretrain) -> None:
    # pretrain_vlm.py's __main__ at core_v0.19.0, with the DPSL provider and tracker
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_dpsl.megatron_lm.vlm_provider import dpsl_vlm_model_provider
    from megatron_dpsl.tracking.metrics_tracker import install_dpsl_metrics_tracker

    args = parse_and_validate_args(
        extra_args_provider=extra_args_provider,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )
    _check(args)
    # the MoE losses' averages over the language model's layers (args.num_layers is the ViT's depth
    # when --decoder-num-layers is given)
    install_dpsl_metrics_tracker(args.moe_router_load_balancing_type, args.decoder_num_layers)
    pretrain(
        pretrain_cfg_container_from_args(args),
        pretrain_vlm.train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        pretrain_vlm.forward_step,
        dpsl_vlm_model_provider,
        get_embedding_ranks=pretrain_vlm.llava_embedding_ranks,
        get_position_embedding_ranks=pretrain_vlm.llava_position_embedding_ranks,
    )


def main() -> None:
    pretrain_vlm = import_pretrain_vlm()
    from megatron.training import arguments, pretrain

    from megatron_dpsl.megatron_lm.registration import register_dpsl_arguments

    register_dpsl_arguments(
        arguments
    )  # before the first parse (ft_integration.setup's has no provider)
    pretrain_vlm.train_valid_test_datasets_provider.is_distributed = True
    if "extra_args_provider" in inspect.signature(pretrain).parameters:
        _run_core_v016(pretrain_vlm, pretrain)
    else:
        _run_core_v019(pretrain_vlm, pretrain)


if __name__ == "__main__":
    main()
