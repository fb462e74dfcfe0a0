"""Teach every Megatron-LM argument parser the DPSL flags, on an unpatched checkout.

Megatron-LM parses the command line several times before it trains, and only some of those parses
get the launcher's ``extra_args_provider``:

============================================  ===========================
===========================
call site                                     core_v0.16.1                 core_v0.19.0
============================================  ===========================
===========================
``inprocess_restart.maybe_wrap_for_...``      line 128, no provider        line 133, no provider
``ft_integration.setup`` (inside pretrain)    line 78, no provider         line 78, no provider
``initialize_megatron`` / ``parse_and_...``   provider                     provider
============================================  ===========================
===========================

``parse_args(ignore_unknown_args=True)`` forgives unknown flags but not a value outside a known
flag's ``choices``, so ``--moe-router-load-balancing-type aux_loss dpsl`` died in the first of them
with "invalid choice: 'dpsl'" before training started.

Every one of these parses (and those of Megatron-LM's other scripts and ``tools/checkpoint``) builds
its parser with ``arguments.add_megatron_arguments(parser)``, which ``parse_args`` looks up in the
module's globals at call time. :func:`register_dpsl_arguments` wraps that one function so that it
also runs :func:`~megatron_dpsl.megatron_lm.args.add_dpsl_args`: the flags, and the plugin's
load-balancing types (``PLUGIN_LOAD_BALANCING_TYPES``) among the choices. It is the run-time form of
the first hunk of patch 1 (same function, same call), so the launcher on an unpatched checkout and a
patched checkout parse the same command line the same way.

Why this design, and not the alternatives a maintainer would weigh:

- Passing ``extra_args_provider`` on to each re-parse needs edits of ``inprocess_restart.py`` and
  ``ft_integration.py`` at every tag (a patch, not a plugin) and misses the next call site.
- Wrapping ``arguments.parse_args`` misses callers that bound the name at import time
  (``initialize.py`` does ``from megatron.training.arguments import parse_args``).
- Stripping the DPSL flags from ``sys.argv`` for the re-parses loses their values and still leaves
  ``dpsl`` outside the choices.
- Registering on ``import megatron_dpsl`` would change Megatron-LM for every user of the package.
  Here the launcher registers explicitly, once, before Megatron-LM parses anything. Registering is
  idempotent (so is ``add_dpsl_args``: a patched parser already has the flags), and
  :func:`unregister_dpsl_arguments` restores Megatron-LM's function.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator
from types import ModuleType

from megatron_dpsl.megatron_lm.args import add_dpsl_args

_HOOK = "add_megatron_arguments"


def _arguments_module(arguments: ModuleType | None) -> ModuleType:
    return (
        arguments
        if arguments is not None
        else importlib.import_module("megatron.training.arguments")
    )


def is_registered(arguments: ModuleType | None = None) -> bool:
    """Whether ``arguments.add_megatron_arguments`` adds the DPSL flags through this module's
    wrapper."""
    return getattr(getattr(_arguments_module(arguments), _HOOK), "__dpsl_wrapper__", False)


def register_dpsl_arguments(arguments: ModuleType | None = None) -> None:
    """Wrap ``megatron.training.arguments.add_megatron_arguments`` so every parser gets
    ``add_dpsl_args``.

    ``arguments``: Megatron-LM's ``megatron.training.arguments`` module (imported when omitted).
    Calling it again is a no-op.
    """
    arguments = _arguments_module(arguments)
    original = getattr(arguments, _HOOK)
    if getattr(original, "__dpsl_wrapper__", False):
        return

    @functools.wraps(original)
    def add_megatron_arguments(parser):
        return add_dpsl_args(original(parser))

    add_megatron_arguments.__dpsl_wrapper__ = True
    setattr(arguments, _HOOK, add_megatron_arguments)


def unregister_dpsl_arguments(arguments: ModuleType | None = None) -> None:
    """Restore Megatron-LM's own ``add_megatron_arguments`` (no-op when not registered)."""
    arguments = _arguments_module(arguments)
    if is_registered(arguments):
        setattr(arguments, _HOOK, getattr(arguments, _HOOK).__wrapped__)


@contextlib.contextmanager
def dpsl_arguments_registered(arguments: ModuleType | None = None) -> Iterator[None]:
    """``register_dpsl_arguments`` for the duration of a ``with`` block (restores what was
    there)."""
    arguments = _arguments_module(arguments)
    was = is_registered(arguments)
    register_dpsl_arguments(arguments)
    try:
        yield
    finally:
        if not was:
            unregister_dpsl_arguments(arguments)
