"""Reading the files a user points the upcycler at, with damage reported as one
:class:`UpcycleError` naming the file (not a traceback from the parser that found it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_dpsl.upcycle.errors import UpcycleError


def read_json(path: Path) -> object:
    """``path`` parsed; a missing or malformed file is one error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UpcycleError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UpcycleError(f"{path}: not valid JSON ({exc})") from None


def load_pickle(path: Path, **kwargs) -> object:
    """``torch.load(path)`` of a Megatron-LM file (``common.pt``, ``model_optim_rng.pt``).

    Megatron-LM pickles an argparse.Namespace (and dtypes) there, so ``weights_only=False``: only
    checkpoints the user trusts (docs/upcycling.md says so)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, **kwargs)
    except Exception as exc:  # noqa: BLE001  UnpicklingError, RuntimeError (zip), EOFError, ...
        raise UpcycleError(f"{path}: unreadable, truncated or not a PyTorch file ({exc})") from None
