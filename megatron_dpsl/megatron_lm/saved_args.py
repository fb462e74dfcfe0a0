"""The ``args`` a Megatron-LM checkpoint was saved with, read without loading its tensors.

Megatron-LM writes ``DIR/latest_checkpointed_iteration.txt`` (an iteration or ``release``) and one
directory per saved step, ``iter_0000100/`` or ``release/``: ``torch_dist`` (one
``dist_checkpointing`` save; ``args`` is in its common state) or the legacy ``torch`` format (one
``mp_rank_XX[_YYY]/model_optim_rng.pt`` per rank, each holding ``args``).

"""

from __future__ import annotations

import argparse
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"


def step_dir(load: str, ckpt_step: int | None = None) -> Path | None:
    """The step directory ``--load`` (and ``--ckpt-step``) points at, or ``None`` without a
    checkpoint."""
    root = Path(load)
    if ckpt_step is not None:
        step = root / f"iter_{int(ckpt_step):07d}"
        return step if step.is_dir() else None
    tracker = root / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    step = root / ("release" if text == "release" else f"iter_{int(text):07d}")
    return step if step.is_dir() else None


def _torch_args(step: Path) -> argparse.Namespace | None:
    import torch

    files = sorted(step.glob("mp_rank_*/model_optim_rng.pt"))
    if not files:
        return None
    # mmap: the tensors stay on disk; only the pickled Namespace is read (a trusted checkpoint of
    # the user's)
    state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    return state.get("args")


def _dist_args(step: Path) -> argparse.Namespace | None:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(step)).get("args")


def read_saved_args(
    load: str, ckpt_step: int | None = None
) -> tuple[argparse.Namespace, str] | None:
    """``(args, where)`` of the checkpoint ``--load`` names (``where``: its step directory, for
    messages), or ``None`` when there is no checkpoint or it holds no ``args``."""
    step = step_dir(load, ckpt_step)
    if step is None:
        return None
    args = _torch_args(step) if any(step.glob("mp_rank_*")) else _dist_args(step)
    return None if args is None else (args, str(step))
