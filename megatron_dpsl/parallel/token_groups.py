"""Per-token group ids (modality/task priors) reaching ``DPSLRouter``, sharded exactly like the
tokens.

The training step knows each token's group (e.g. 0 = vision, 1 = language); the router, deep inside
the model, needs it aligned with its ``[num_tokens, num_experts]`` logits. The step sets the ids for
the duration of the forward pass::

    with dpsl_token_groups(group_ids):          # [batch, seq] int, the model input's layout
        output = model(input_ids, position_ids, attention_mask, labels=labels)
    loss.backward()                             # the ids are only read in the forward

or, in a loop that cannot wrap the forward, ``set_dpsl_token_groups(group_ids)`` before it and
``set_dpsl_token_groups(None)`` after. The ids live in a ``contextvars.ContextVar`` (per thread and
per asyncio task), not in the model.

Layouts (``cp_sliced``): pass the ids either as the full sequence, ``[b, s]`` *before*
``get_batch_on_this_cp_rank`` (``cp_sliced=False``, the default: the router applies Megatron's
load-balanced 2×CP chunking itself), or as this CP rank's slice ``[b, s / cp]`` *after* it
(``cp_sliced=True``, e.g. when the ids are part of the batch dict that went through
``get_batch_on_this_cp_rank``). Under sequence parallelism the router then takes this TP rank's
``s_local / tp`` rows of the ``[s_local, b]`` transpose, as ``scatter_to_sequence_parallel_region``
does for the embeddings, and flattens like the router flattens its logits (``s``-major).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenGroups:
    """Group ids as the training step gave them."""

    group_ids: torch.Tensor  # [b, s] or [b, s / cp] int
    cp_sliced: bool = False


_CURRENT: contextvars.ContextVar[TokenGroups | None] = contextvars.ContextVar(
    "dpsl_token_groups", default=None
)


def _check(group_ids: torch.Tensor) -> None:
    if (
        not isinstance(group_ids, torch.Tensor)
        or group_ids.dim() != 2
        or group_ids.is_floating_point()
    ):
        shape = (
            tuple(group_ids.shape)
            if isinstance(group_ids, torch.Tensor)
            else type(group_ids).__name__
        )
        raise ValueError(
            f"dpsl_token_groups: group_ids must be an int tensor [batch, seq], got {shape}"
        )


def set_dpsl_token_groups(group_ids: torch.Tensor | None, cp_sliced: bool = False):
    """Set (or clear, with ``None``) the ids the next forward passes read; returns a reset token."""
    if group_ids is None:
        return _CURRENT.set(None)
    _check(group_ids)
    return _CURRENT.set(TokenGroups(group_ids, cp_sliced))


def get_dpsl_token_groups() -> TokenGroups | None:
    """The ids currently set (``None`` if none)."""
    return _CURRENT.get()


@contextlib.contextmanager
def dpsl_token_groups(group_ids: torch.Tensor | None, cp_sliced: bool = False) -> Iterator[None]:
    """Make ``group_ids`` ``[batch, seq]`` visible to every ``DPSLRouter`` in this block."""
    token = set_dpsl_token_groups(group_ids, cp_sliced)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _cp_slice(batch: dict, cp_group) -> dict:
    """Megatron's load-balanced 2×CP chunking of ``batch`` (``get_batch_on_this_cp_rank``).

    megatron-core 0.19 added a required ``is_hybrid_cp`` parameter; plain CP is ``False``.
    """
    import inspect

    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)


def shard_token_group_ids(
    groups: TokenGroups,
    tp_group=None,
    cp_group=None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """This rank's ids, ``[s_local * b]``, aligned with the router's flattened ``[s_local, b, E]``
    logits.

    Args:
        groups: the ids as set by the training step.
        tp_group / cp_group: Megatron's TP and CP groups (``None`` = size 1).
        sequence_parallel: whether hidden states are split along the sequence over TP.
    """
    ids = groups.group_ids
    cp_size = 1 if cp_group is None else cp_group.size()
    if cp_size > 1 and not groups.cp_sliced:
        ids = _cp_slice({"dpsl_group_ids": ids}, cp_group)["dpsl_group_ids"]
    ids = ids.transpose(0, 1)  # [s_local, b], the layout of hidden states
    tp_size = 1 if tp_group is None else tp_group.size()
    if sequence_parallel and tp_size > 1:
        s_local = ids.shape[0]
        if s_local % tp_size:
            raise ValueError(
                f"dpsl_token_groups: sequence length {s_local} not divisible by TP size {tp_size}"
            )
        rows = s_local // tp_size
        ids = ids[tp_group.rank() * rows : (tp_group.rank() + 1) * rows]
    return ids.reshape(-1)


def check_group_ids(ids: torch.Tensor, num_groups: int) -> None:
    """Every id in ``[0, num_groups)``: ``ValueError`` on the CPU, a device-side assert elsewhere.

    On an accelerator the check is queued with the kernels (``torch._assert_async``), so it costs no
    host sync; a bad id then fails the next synchronising call with this message.
    """
    message = f"dpsl_token_groups: group ids must lie in [0, {num_groups})"
    if ids.numel() == 0:
        return
    if ids.device.type == "cpu":
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"{message}, got {lo}..{hi}")
        return
    torch._assert_async(((ids >= 0) & (ids < num_groups)).all(), message)
