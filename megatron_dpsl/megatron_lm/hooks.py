"""What the patched Megatron-LM files (``patches/``) call: the DPSL layer spec and per-token group
ids.

Kept here, not in the patches, so that each patch stays a few lines that only forward to this
module.
Imports Megatron lazily: the patched files import this module from inside their functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from megatron_dpsl.losses.priors import num_prior_groups
from megatron_dpsl.megatron_lm.args import dpsl_enabled, require_token_groups
from megatron_dpsl.tracking.moe_tracker import plugin_track_names  # noqa: F401 - the patches call it here


def decoder_block_spec_fn(config, default: Callable) -> Callable:
    """``get_dpsl_decoder_block_spec`` when ``config`` enables DPSL, else ``default``.

    ``gpt_builders.gpt_builder`` (patched) calls the result with Megatron's own arguments
    (``config, use_transformer_engine=..., normalization=..., qk_l2_norm=..., vp_stage=...``).
    """
    if getattr(config, "moe_plugin_enabled", False):  # any plugin type needs the plugin's spec
        from megatron_dpsl.models.specs import get_dpsl_decoder_block_spec

        return get_dpsl_decoder_block_spec
    return default


def num_token_groups(args) -> int | None:
    """Token groups the run's DPSL prior distinguishes (``None``: no group priors, or DPSL off)."""
    if not dpsl_enabled(args):
        return None
    return num_prior_groups(
        getattr(args, "moe_dpsl_group_alphas", None), getattr(args, "moe_dpsl_num_groups", None)
    )


def dataset_on_every_stage(args) -> bool:
    """Whether every pipeline stage builds the datasets (patched ``is_dataset_built_on_rank``).

    Megatron-LM builds them only where ``get_batch`` reads them (the first and last stage, MTP
    stages). With group priors the middle stages' routers need the ids of their micro-batch too, so
    every stage (TP rank 0) builds them and reads its own, identical, stream of micro-batches: the
    sampler depends on the data-parallel rank only, and each (virtual) stage consumes one sample
    per micro-batch (``DatasetTokenGroups``).
    """
    return num_token_groups(args) is not None


class _DatasetIdTap:
    """Iterator wrapper that keeps the ``dataset_id`` of the last batch it handed out.

    Megatron-LM's ``BlendedDataset`` yields ``{"dataset_id": i, **sample}``, ``i`` being the index
    of the sample's dataset in ``--data-path``; ``get_batch_on_this_tp_rank`` drops that key, so it
    is read here.
    """

    def __init__(self, data_iterator: Iterator):
        self._data_iterator = data_iterator
        self.dataset_id = None
        self.consumed = False

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._data_iterator)
        self.consumed = True
        self.dataset_id = batch.get("dataset_id") if isinstance(batch, dict) else None
        return batch


class DatasetTokenGroups:
    """Per-token group ids for DPSL group priors in Megatron-LM's ``forward_step`` (patched
    ``pretrain_gpt.py``).

    The group of a token is the index of its sample's dataset in the ``--data-path`` blend (e.g.
    ``--data-path 1 code_text_document 1 prose_text_document``: code is group 0, prose group 1).
    Without group priors this is a no-op: the data iterator is passed through and ``context``
    enters nothing.

    Every pipeline stage runs this, each (virtual) stage on its own data iterator (the patched
    ``is_dataset_built_on_rank`` builds the datasets on every stage with group priors). Where
    ``get_batch`` reads a sample (first and last stage) the tap records its ``dataset_id``; where
    it reads none (a middle stage gets no batch) ``group_ids`` reads the micro-batch's sample
    itself, so every stage's routers get the ids of the micro-batch they run, whatever the
    schedule.

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

    def _dataset_ids(self, batch: int):
        """``[batch]`` dataset ids of this micro-batch on this rank (``-1``: none read)."""
        import torch

        ids = torch.full((batch,), -1, dtype=torch.int64)
        if self._tap is not None:
            if not self._tap.consumed:  # get_batch read nothing on this stage: read the sample here
                next(self._tap)
            if self._tap.dataset_id is not None:
                ids.copy_(torch.as_tensor(self._tap.dataset_id, dtype=torch.int64).reshape(batch))
        return ids

    def group_ids(self, tokens=None):
        """``[micro_batch, seq / cp]`` int64 group ids of this micro-batch (this rank's CP slice).

        ``tokens`` is unused (a middle stage has none); the shape comes from ``--micro-batch-size``,
        ``--seq-length`` and ``--context-parallel-size``. Collective over the tensor-parallel group:
        only TP rank 0 reads the data iterator.
        """
        import torch
        from megatron.core import parallel_state

        batch = self.args.micro_batch_size
        seq = self.args.seq_length // getattr(self.args, "context_parallel_size", 1)
        ids = self._dataset_ids(batch)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        ids = ids.to(device)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.broadcast(
                ids,
                parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group(),
            )
        self._check(ids)
        # Every token of a sample belongs to the sample's dataset, so the CP slice needs no special
        # care.
        return ids[:, None].expand(batch, seq).contiguous()

    def _check(self, ids) -> None:
        if bool((ids < 0).any()):
            raise ValueError(
                "--moe-dpsl-group-alphas/--moe-dpsl-num-groups: the batch has no dataset_id, "
                "so tokens have no "
                "group; give --data-path as a blend with one dataset per group (e.g. "
                "--data-path 1 code_text_document "
                "1 prose_text_document: group 0 = code, group 1 = prose)"
            )
        if bool((ids >= self.num_groups).any()):
            raise ValueError(
                f"--moe-dpsl-group-alphas/--moe-dpsl-num-groups: {self.num_groups} groups, but the "
                f"--data-path blend has a dataset with index {int(ids.max())}; list exactly one "
                "dataset per group"
            )

    def context(self, tokens=None, packed_seq_params=None) -> Any:
        """Context manager around the model forward: ``dpsl_token_groups(group_ids)``, or
        nothing."""
        if not self.enabled:
            return contextlib.nullcontext()
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

        # the ids are this CP rank's slice already, like the tokens of get_batch_on_this_cp_rank
        return dpsl_token_groups(self.group_ids(tokens), cp_sliced=True)
