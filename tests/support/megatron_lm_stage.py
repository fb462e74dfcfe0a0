"""Inside the chain child (megatron_lm_chain.py): patched Megatron-LM on a middle pipeline stage.

A middle stage's ``get_batch`` returns no batch, yet its routers need the group ids of the
micro-batch they run. :func:`middle_stage_report` runs the patched tree's own
``is_dataset_built_on_rank`` and ``forward_step`` (upstream's ``get_batch``, the patch's
``DatasetTokenGroups``) with a real middle model chunk (the launcher's builder, no embedding, no
output layer, DPSL routers with group priors) on one gloo rank, and compares the DPSL loss each
micro-batch logs with the same chunk run inside ``dpsl_token_groups`` with the expected ids.

Replaced leaves, each named: the tree's ``is_first_or_last_pipeline_stage`` answers False (one
process cannot hold a middle stage of a real pipeline; upstream's middle-stage branch of
``get_batch`` then runs), and ``get_default_causal_mask`` builds its mask on the CPU (a middle stage
passes no attention mask, and upstream's default mask is allocated on CUDA).
"""

from __future__ import annotations

SAMPLE_DATASET_IDS = (1, 0, 1)  # the blend index of each micro-batch's sample


def _middle_chunk(args):
    """The launcher's GPT model chunk without pre- and post-process (a middle stage), in training
    mode."""
    from megatron_dpsl.megatron_lm import pretrain_gpt as launcher
    from support.megatron_lm_chain import _pretrain_parameters

    if "extra_args_provider" in _pretrain_parameters():  # core_v0.16.x
        model = launcher.dpsl_gpt_builder(args, False, False)
    else:
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.training.models.gpt import GPTModelBuilder

        model = GPTModelBuilder(launcher.dpsl_gpt_config(args)).build_model(
            ProcessGroupCollection.use_mpu_process_groups(), pre_process=False, post_process=False
        )
    return model.train()


def _dpsl_per_micro_batch(run, model, hidden, num) -> list:
    """``run(i)`` for each micro-batch on the same stage input; the DPSL loss logged by each."""
    from support.common import moe_tracked, reset_moe_tracker

    out = []
    for i in range(num):
        reset_moe_tracker()
        model.set_input_tensor(hidden)
        run(i)
        logged = moe_tracked("dpsl_loss")
        out.append(None if logged is None else logged.tolist())
    reset_moe_tracker()
    return out


def middle_stage_report(argv: list, argv_without_groups: list) -> dict:
    import pretrain_gpt  # the patched tree's (megatron_lm_chain put the tree first on sys.path)
    import torch
    from megatron.core.fusions import fused_softmax
    from megatron.training import global_vars

    from megatron_dpsl.megatron_lm.args import add_dpsl_args
    from megatron_dpsl.parallel.token_groups import dpsl_token_groups
    from support.megatron_cpu import init_single_process
    from support.megatron_lm_chain import _parse

    init_single_process()
    pretrain_gpt.is_first_or_last_pipeline_stage = lambda vp_stage=None: False  # replaced leaf
    fused_softmax.get_default_causal_mask = lambda sq: torch.triu(  # replaced leaf (CUDA-only)
        torch.ones(sq, sq, dtype=torch.bool), diagonal=1
    )
    report: dict = {}
    try:
        plain = _parse(argv_without_groups, add_dpsl_args)
        global_vars.set_args(plain)
        report["dataset_built_without_groups"] = pretrain_gpt.is_dataset_built_on_rank()
        global_vars.unset_global_variables()

        args = _parse(argv, add_dpsl_args)
        args.padded_vocab_size = 32
        global_vars.set_args(args)
        global_vars._set_timers(args)
        report["dataset_built_with_groups"] = pretrain_gpt.is_dataset_built_on_rank()

        model = _middle_chunk(args)
        torch.manual_seed(1)
        hidden = torch.randn(args.seq_length, args.micro_batch_size, args.hidden_size)
        samples = [
            {"dataset_id": torch.full((args.micro_batch_size,), i)} for i in SAMPLE_DATASET_IDS
        ]
        stream = iter(samples)
        report["forward_step"] = _dpsl_per_micro_batch(
            lambda i: pretrain_gpt.forward_step(stream, model), model, hidden, len(samples)
        )
        report["samples_left"] = sum(1 for _ in stream)

        def with_ids(i):
            ids = torch.full((args.micro_batch_size, args.seq_length), SAMPLE_DATASET_IDS[i])
            with dpsl_token_groups(ids):
                model(None, None, None)

        report["expected"] = _dpsl_per_micro_batch(with_ids, model, hidden, len(samples))
    finally:
        global_vars.unset_global_variables()
    return report
