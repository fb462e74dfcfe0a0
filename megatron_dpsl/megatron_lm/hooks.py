"""What the patched Megatron-LM files (``patches/``) call: the DPSL layer spec and per-token group
ids.

Kept here, not in the patches, so that each patch stays a few lines that only forward to this
module. Imports Megatron lazily: the patched files import this module from inside their functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from megatron_dpsl.config.load_balancing import plugin_types_in
from megatron_dpsl.losses.priors import num_prior_groups
from megatron_dpsl.megatron_lm.args import dpsl_enabled, require_token_groups


def decoder_block_spec_fn(config, default: Callable) -> Callable:
    """``get_dpsl_decoder_block_spec`` when ``config`` enables DPSL, else ``default``.

    ``gpt_builders.gpt_builder`` (patched) calls the result with Megatron's own arguments
    (``config, use_transformer_engine=..., normalization=..., qk_l2_norm=..., vp_stage=...``).
    """
    if getattr(config, "moe_plugin_enabled", False):  # any plugin type needs the plugin's spec
        from megatron_dpsl.models.specs import get_dpsl_decoder_block_spec

        return get_dpsl_decoder_block_spec
    return default


def plugin_track_names(load_balancing_type) -> list[str]:
    """The MoE tracker names of the plugin losses that ``--moe-router-load-balancing-type`` turns
    on.

    ``load_balancing_type``: Megatron-LM's ``args.moe_router_load_balancing_type`` (a string or a
    list). Each plugin type ``t`` records ``f"{t}_loss"`` (``dpsl`` -> ``dpsl_loss``), and
    ``training_log`` must list it in ``track_names`` to reduce it over PP and DP (patch 4 of
    core_v0.16.1) or, at core_v0.19, to log it at all (patch 5 of core_v0.19.0, or the launcher's
    ``DPSLMetricsTracker``).
    """
    return [f"{t}_loss" for t in plugin_types_in(load_balancing_type)]


def num_token_groups(args) -> int | None:
    """Token groups the run's DPSL prior distinguishes (``None``: no group priors, or DPSL off)."""
    if not dpsl_enabled(args):
        return None
    return num_prior_groups(
        getattr(args, "moe_dpsl_group_alphas", None), getattr(args, "moe_dpsl_num_groups", None)
    )


class _DatasetIdTap:
    """Iterator wrapper that keeps the ``dataset_id`` of the last batch it handed out.

    Megatron-LM's ``BlendedDataset`` yields ``{"dataset_id": i, **sample}``, ``i`` being the index
    of the sample's dataset in ``--data-path``; ``get_batch_on_this_tp_rank`` drops that key, so it
    is read here.
    """

    def __init__(self, data_iterator: Iterator):
        self._data_iterator = data_iterator
        self.dataset_id = None

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._data_iterator)
        self.dataset_id = batch.get("dataset_id") if isinstance(batch, dict) else None
        return batch


class DatasetTokenGroups:
    """Per-token group ids for DPSL group priors in Megatron-LM's ``forward_step`` (patched
    ``pretrain_gpt.py``).

    The group of a token is the index of its sample's dataset in the ``--data-path`` blend (e.g.
    ``--data-path 1 code_text_document 1 prose_text_document``: code is group 0, prose group 1).
    Without group priors this is a no-op: the data iterator is passed through and ``context`` enters
    nothing.

    Usage (what the patch does)::

        token_groups = DatasetTokenGroups(args, data_iterator)
        tokens, ... = get_batch(token_groups.data_iterator, vp_stage)
        with token_groups.context(tokens, packed_seq_params):
            output_tensor = model(tokens, ...)
    """

    def __init__(self, args, data_iterator: Iterator | None):
        self.args = args
        self.num_groups = num_token_groups(args)
        self.enabled = self.num_groups is not None
        if self.enabled:
            require_token_groups(args, ("dataset",), "pretrain_gpt")
        self._tap = (
            _DatasetIdTap(data_iterator) if self.enabled and data_iterator is not None else None
        )
        self.data_iterator = self._tap if self._tap is not None else data_iterator

    def group_ids(self, tokens):
        """``[batch, seq]`` int64 group ids aligned with ``tokens`` (``[batch, seq]``, this rank's
        CP slice).

        Collective over the tensor-parallel group: only TP rank 0 reads the data iterator.
        """
        import torch
        from megatron.core import parallel_state

        batch = tokens.shape[0]
        ids = torch.full((batch,), -1, dtype=torch.int64, device=tokens.device)
        if self._tap is not None and self._tap.dataset_id is not None:
            ids.copy_(torch.as_tensor(self._tap.dataset_id, dtype=torch.int64).reshape(batch))
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.broadcast(
                ids,
                parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group(),
            )
        num_groups = self.num_groups
        if bool((ids < 0).any()):
            raise ValueError(
                "--moe-dpsl-group-alphas/--moe-dpsl-num-groups: the batch has no dataset_id, "
                "so tokens have no "
                "group; give --data-path as a blend with one dataset per group (e.g. "
                "--data-path 1 code_text_document "
                "1 prose_text_document: group 0 = code, group 1 = prose)"
            )
        if bool((ids >= num_groups).any()):
            raise ValueError(
                f"--moe-dpsl-group-alphas/--moe-dpsl-num-groups: {num_groups} groups, but the "
                "--data-path blend has "
                f"a dataset with index {int(ids.max())}; list exactly one dataset per group"
            )
        # Every token of a sample belongs to the sample's dataset, so the CP slice needs no special
        # care.
        return ids[:, None].expand(batch, tokens.shape[1]).contiguous()

    def context(self, tokens, packed_seq_params=None) -> Any:
        """Context manager around the model forward: ``dpsl_token_groups(group_ids)``, or
        nothing."""
        if not self.enabled:
            return contextlib.nullcontext()
        if tokens is None or getattr(self.args, "pipeline_model_parallel_size", 1) > 1:
            # middle stages get no batch, and the last stage's non-source TP ranks get no tokens
            raise ValueError(
                "--moe-dpsl-group-alphas/--moe-dpsl-num-groups: Megatron-LM's pipeline stages "
                "after the first get "
                "no tokens, so their routers get no group ids; use "
                "--pipeline-model-parallel-size 1 with group priors"
            )
        if packed_seq_params is not None:
            raise ValueError(
                "--moe-dpsl-group-alphas/--moe-dpsl-num-groups: packed sequences (THD) mix "
                "samples of different "
                "datasets in one row; not supported with group priors"
            )
        if getattr(self.args, "overlap_moe_expert_parallel_comm", False):
            raise ValueError(
                "--overlap-moe-expert-parallel-comm runs the model forward outside "
                "forward_step; not supported "
                "with --moe-dpsl-group-alphas/--moe-dpsl-num-groups"
            )
        from megatron_dpsl.parallel.token_groups import dpsl_token_groups

        # tokens are this CP rank's slice already (get_batch ran get_batch_on_this_cp_rank).
        return dpsl_token_groups(self.group_ids(tokens), cp_sliced=True)
