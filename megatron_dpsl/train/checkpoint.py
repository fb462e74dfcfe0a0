"""``--save``/``--load`` in Megatron-LM's on-disk layout (``torch_dist``), readable by the upcycler.

``SAVE/latest_checkpointed_iteration.txt`` names the newest step; ``SAVE/iter_0000100/`` is one
``dist_checkpointing.save`` of ``{"model": model.sharded_state_dict(), "optimizer": ...,
"opt_param_scheduler", "iteration", "args", "checkpoint_version": 3.0,
"num_floating_point_operations_so_far"}``, as Megatron-LM's ``save_checkpoint`` writes it
(MEGATRON_LM_INTEGRATION.md §5b); with virtual pipeline stages each model chunk is ``model0``,
``model1``, ... as in Megatron-LM's ``generate_state_dict``. Tensors are sharded and keyed by global
layer number, so a checkpoint written under one TP/EP/PP layout loads under another. ``--load`` of
a directory written by ``megatron-dpsl-upcycle`` (no optimizer) or with ``--finetune`` loads the
weights only and restarts at iteration 0.
"""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
# (flag, args attribute) pairs that must match between a checkpoint and the run loading it,
# as Megatron-LM's check_checkpoint_args compares them
_CHECKED_ARGS = (
    ("--num-layers", "num_layers"),
    ("--hidden-size", "hidden_size"),
    ("--num-attention-heads", "num_attention_heads"),
    ("--vocab-size", "padded_vocab_size"),
    ("--num-experts", "num_experts"),
    ("--swiglu", "swiglu"),
    ("--normalization", "normalization"),
    ("--position-embedding-type", "position_embedding_type"),
    ("--untie-embeddings-and-output-weights", "untie_embeddings_and_output_weights"),
    ("--disable-bias-linear", "add_bias_linear"),
)


# Router state a weights-only load (--finetune, an upcycled checkpoint) may lack: the aux-loss-free
# expert bias starts at zero in a fresh run, and the upcycler does not write it (docs/upcycling.md)
_FRESH_START_BUFFERS = (".router.expert_bias",)


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> str | None:
    """The step directory ``--load ROOT`` points at (``iter_XXXXXXX`` or ``release``), or None."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if text == "release":
        return os.path.join(root, "release")
    try:
        return checkpoint_dir(root, int(text))
    except ValueError:
        raise ValueError(
            f"--load: {path} holds {text!r}, expected an iteration number or 'release'"
        ) from None


def _save_strategy():
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    # one writer thread: the default forks several per rank, too many on a 2-core laptop
    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)


def model_state_dicts(model_chunks: list) -> dict:
    """Megatron-LM's model entries: ``{"model": ...}`` for one chunk, ``{"model0": ..., "model1":
    ...}`` for several (virtual pipeline stages)."""
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def save_checkpoint(
    args: argparse.Namespace, iteration: int, model_chunks: list, optimizer, scheduler
) -> str:
    """Write ``args.save/iter_{iteration:07d}`` and update the tracker file; returns the step
    directory."""
    from megatron.core import dist_checkpointing

    path = checkpoint_dir(args.save, iteration)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    model_sd = model_state_dicts(model_chunks)
    state = {
        **model_sd,
        "iteration": iteration,
        "args": argparse.Namespace(**vars(args)),
        "checkpoint_version": CHECKPOINT_VERSION,
        "num_floating_point_operations_so_far": 0,
    }
    if optimizer is not None and not args.no_save_optim:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd)
        state["opt_param_scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, path, sharded_strategy=_save_strategy())
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(args.save, TRACKER_FILENAME), "w", encoding="utf-8") as f:
            f.write(str(iteration))
    dist.barrier()
    return path


def check_checkpoint_args(saved: argparse.Namespace, args: argparse.Namespace, path: str) -> None:
    """ValueError naming the flag whose value differs between the checkpoint and this run."""
    for flag, name in _CHECKED_ARGS:
        if not hasattr(saved, name):
            continue
        ours, theirs = getattr(args, name, None), getattr(saved, name)
        if (
            name == "num_experts"
            and theirs is None
            and getattr(saved, "num_moe_experts", None) is not None
        ):
            theirs = saved.num_moe_experts
        if ours != theirs:
            raise ValueError(f"{flag}: the checkpoint at {path} has {theirs!r}, this run {ours!r}")


def load_checkpoint(
    args: argparse.Namespace, model_chunks: list, optimizer, scheduler
) -> tuple[int, str]:
    """Load ``args.load`` into this rank's model chunks (and optimizer/scheduler unless
    finetuning), whatever TP/EP/PP layout wrote it.

    Returns ``(iteration to resume from, step directory)``. Weights only (iteration 0) with
    ``--finetune`` or when the checkpoint holds no optimizer state (an upcycled checkpoint).
    """
    from megatron.core import dist_checkpointing

    path = read_tracker(args.load)
    if path is None:
        if os.path.isfile(os.path.join(args.load, "metadata.json")):
            path = args.load  # a bare dist_checkpointing directory
        else:
            raise ValueError(  # a flag error (one line, exit 2), not a traceback
                f"--load: no {TRACKER_FILENAME} (Megatron-LM layout) or metadata.json "
                f"(dist_checkpointing) in {args.load}"
            )
    common = dist_checkpointing.load_common_state_dict(path)
    saved_args = common.get("args")
    if saved_args is not None:
        check_checkpoint_args(saved_args, args, path)
    weights_only = args.finetune or "optimizer" not in _sharded_keys(path) or args.no_load_optim
    model_sd = model_state_dicts(model_chunks)
    request = dict(model_sd)
    if not weights_only:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    from megatron.core.dist_checkpointing.validation import StrictHandling

    # buffers a converter may not write (e.g. router bookkeeping) stay at their initial values
    loaded = dist_checkpointing.load(request, path, strict=StrictHandling.LOG_UNEXPECTED)
    for key, chunk in zip(model_sd, model_chunks):
        _load_chunk(chunk, loaded[key], path, weights_only)
    if weights_only:
        return 0, path
    optimizer.load_state_dict(loaded["optimizer"])
    if "opt_param_scheduler" in common:
        check_schedule(common["opt_param_scheduler"], scheduler, args, path)
        scheduler.load_state_dict(common["opt_param_scheduler"])
    return int(common.get("iteration", 0)), path


# OptimizerParamScheduler.state_dict() entries and the flags that set them
_SCHEDULE_FLAGS = (
    ("max_lr", "--lr"),
    ("min_lr", "--min-lr"),
    ("lr_warmup_steps", "--lr-warmup-iters"),
    ("lr_decay_steps", "--lr-decay-iters (default --train-iters)"),
    ("lr_decay_style", "--lr-decay-style"),
    ("start_wd", "--weight-decay"),
    ("end_wd", "--weight-decay"),
)  # (the weight decay is constant: its increment steps do not matter)


def check_schedule(saved: dict, scheduler, args: argparse.Namespace, path: str) -> None:
    """Megatron-LM's resume rule: the checkpoint's learning-rate and weight-decay schedule must
    equal this run's unless ``--override-opt_param-scheduler`` (this run's) or
    ``--use-checkpoint-opt_param-scheduler`` (the checkpoint's) says which wins; ValueError naming
    the flag (megatron-core's own check is an ``assert``, and its default keeps the checkpoint's
    schedule without a word: a resume with a longer --train-iters then trains at lr 0)."""
    if args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    for key, flag in _SCHEDULE_FLAGS:
        ours = getattr(scheduler, key)
        if key in saved and saved[key] != ours:
            raise ValueError(
                f"{flag}: the checkpoint at {path} has {key} = {saved[key]!r}, this run "
                f"{ours!r}; pass --override-opt_param-scheduler to use this run's schedule or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's"
            )


def _load_chunk(chunk, state_dict: dict, path: str, weights_only: bool) -> None:
    """``chunk.load_state_dict`` that names missing tensors; a weights-only load may lack the
    router's fresh-start buffers."""
    missing, _ = chunk.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    fresh = [k for k in missing if weights_only and k.endswith(_FRESH_START_BUFFERS)]
    if fresh and dist.get_rank() == 0:
        print(
            f" --load: {path} has no {', '.join(fresh)}: they start at zero, as in a fresh run",
            flush=True,
        )
    missing = [k for k in missing if k not in fresh]
    if missing:
        raise KeyError(
            f"--load: {path} lacks model tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )


def _sharded_keys(path: str) -> set:
    """Top-level state-dict keys stored in a checkpoint (``model``, ``optimizer``, ...)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(path)
    keys = set(common)
    metadata = dist_checkpointing.load_tensors_metadata(path)
    keys.update(k.split(".", 1)[0] for k in metadata)
    # optimizer tensors are keyed "optimizer.state.exp_avg.<param key>"
    return keys
