"""Per-token group ids (modality/task priors) reaching ``DPSLRouter``, sharded exactly like the tokens.

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

Padding (``padding_mask``, optional, ``[b, s]`` bool, True = padding, in the ids' layout): rows no
router loss may count (e.g. ``LLaVAModel``'s right padding: it gives its language model no mask). It is
sharded like the ids and OR-ed into the padding mask ``DPSLRouter`` passes to DPSL and to Megatron's aux
losses, z-loss and expert-bias counts, whether or not group priors are configured.
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
    padding_mask: torch.Tensor | None = None  # [b, s] or [b, s / cp] bool, True = padding


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


def _check_padding(group_ids: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
    if padding_mask is None:
        return
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.shape != group_ids.shape:
        shape = (
            tuple(padding_mask.shape)
            if isinstance(padding_mask, torch.Tensor)
            else type(padding_mask).__name__
        )
        raise ValueError(
            "dpsl_token_groups: padding_mask must be a bool tensor shaped like group_ids "
            f"{tuple(group_ids.shape)}, got {shape}"
        )


def set_dpsl_token_groups(
    group_ids: torch.Tensor | None,
    cp_sliced: bool = False,
    padding_mask: torch.Tensor | None = None,
):
    """Set (or clear, with ``None``) the ids (and padding flags) the next forward passes read;
    returns a reset token."""
    if group_ids is None:
        return _CURRENT.set(None)
    _check(group_ids)
    _check_padding(group_ids, padding_mask)
    padding_mask = None if padding_mask is None else padding_mask.bool()
    return _CURRENT.set(TokenGroups(group_ids, cp_sliced, padding_mask))


def reset_dpsl_token_groups(token) -> None:
    """Put back the ids set before the ``set_dpsl_token_groups`` call that returned ``token``."""
    _CURRENT.reset(token)


def get_dpsl_token_groups() -> TokenGroups | None:
    """The ids currently set (``None`` if none)."""
    return _CURRENT.get()


@contextlib.contextmanager
def dpsl_token_groups(
    group_ids: torch.Tensor | None,
    cp_sliced: bool = False,
    padding_mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Make ``group_ids`` ``[batch, seq]`` (and ``padding_mask``, same shape) visible to every
    ``DPSLRouter`` in this block."""
    token = set_dpsl_token_groups(group_ids, cp_sliced, padding_mask)
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


def _shard(tokens: torch.Tensor, cp_sliced: bool, tp_group, cp_group, sequence_parallel: bool):
    """This rank's ``[s_local * b]`` part of ``[b, s]`` ``tokens`` (see ``shard_token_group_ids``)."""
    cp_size = 1 if cp_group is None else cp_group.size()
    if cp_size > 1 and not cp_sliced:
        tokens = _cp_slice({"dpsl_group_ids": tokens}, cp_group)["dpsl_group_ids"]
    tokens = tokens.transpose(0, 1)  # [s_local, b], the layout of hidden states
    tp_size = 1 if tp_group is None else tp_group.size()
    if sequence_parallel and tp_size > 1:
        s_local = tokens.shape[0]
        if s_local % tp_size:
            raise ValueError(
                f"dpsl_token_groups: sequence length {s_local} not divisible by TP size {tp_size}"
            )
        rows = s_local // tp_size
        tokens = tokens[tp_group.rank() * rows : (tp_group.rank() + 1) * rows]
    return tokens.reshape(-1)


def shard_token_group_ids(
    groups: TokenGroups,
    tp_group=None,
    cp_group=None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """This rank's ids, ``[s_local * b]``, aligned with the router's flattened ``[s_local, b, E]`` logits.

    Args:
        groups: the ids as set by the training step.
        tp_group / cp_group: Megatron's TP and CP groups (``None`` = size 1).
        sequence_parallel: whether hidden states are split along the sequence over TP.
    """
    return _shard(groups.group_ids, groups.cp_sliced, tp_group, cp_group, sequence_parallel)


def shard_token_padding(
    groups: TokenGroups,
    tp_group=None,
    cp_group=None,
    sequence_parallel: bool = False,
) -> torch.Tensor | None:
    """This rank's padding flags, ``[s_local * b]`` bool, sharded like the ids (``None``: none set)."""
    if groups.padding_mask is None:
        return None
    return _shard(groups.padding_mask, groups.cp_sliced, tp_group, cp_group, sequence_parallel)


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
