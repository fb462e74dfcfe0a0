"""Per-token group ids (modality/task priors) reaching ``DPSLRouter``, sharded exactly like the
tokens.

The training step knows each token's group (e.g. 0 = vision, 1 = language); the router, deep inside
the model, needs it aligned with its ``[s, b, num_experts]`` logits. The step sets the ids for the
duration of the forward pass::

    with dpsl_token_groups(group_ids):          # [batch, seq] int, the model input's layout
        output = model(input_ids, position_ids, attention_mask, labels=labels)
    loss.backward()                             # recompute in here replays the forward's own ids

or, in a loop that cannot wrap the forward, ``set_dpsl_token_groups(group_ids)`` before it and
``set_dpsl_token_groups(None)`` after. The ids live in a ``contextvars.ContextVar`` (per thread and
per asyncio task), not in the model.

**The ids travel with the micro-batch.** A forward reads the ids that are set while it runs. Under
activation recompute (Megatron's ``tensor_parallel.checkpoint``, Transformer Engine's checkpoint,
full or selective ``"moe"`` recompute) a router runs twice: once inside the checkpoint's forward,
with gradients off, and once more inside the backward pass, when the ``with`` block has long closed
and, under a pipeline schedule, other micro-batches have set their own ids.
:func:`token_groups_for_forward` therefore attaches the ids to the checkpoint's autograd node during
the first run (the ``ctx`` of the reentrant checkpoint ``Function`` whose forward is running) and,
in the replay, reads them back from the node the autograd engine is executing
(``torch._C._current_autograd_node()``): the checkpoint of this very micro-batch and layer range. No
queue and no ordering assumption: any number of micro-batches may be in flight (1F1B, interleaved
virtual stages), and the ids are freed with the micro-batch's autograd graph (after its backward, or
when a forward that is never backpropagated is dropped). Non-reentrant checkpointing (the original
forward keeps gradients enabled; no Megatron recompute path uses it) is refused with an error in the
replay.

Layouts (``cp_sliced``): pass the ids either as the full sequence, ``[b, s]`` *before*
``get_batch_on_this_cp_rank`` (``cp_sliced=False``, the default: the router applies Megatron's
load-balanced 2×CP chunking itself), or as this CP rank's slice ``[b, s / cp]`` *after* it
(``cp_sliced=True``, e.g. when the ids are part of the batch dict that went through
``get_batch_on_this_cp_rank``). Under sequence parallelism the router then takes this TP rank's
``s_local / tp`` rows of the ``[s_local, b]`` transpose, as ``scatter_to_sequence_parallel_region``
does for the embeddings, checks that the result has the hidden states' ``[s, b]`` shape, and
flattens like the router flattens its logits (``s``-major).

Padding (``padding_mask``, optional, ``[b, s]`` bool, True = padding, in the ids' layout): rows no
router loss may count (e.g. ``LLaVAModel``'s right padding: it gives its language model no mask). It
is sharded like the ids, travels with them (recompute included) and is OR-ed into the padding mask
``DPSLRouter`` passes to DPSL and to Megatron's aux losses, z-loss and expert-bias counts, whether
or not group priors are configured.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
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

_NODE_ATTR = "_dpsl_token_groups"
"""Attribute of a checkpoint's autograd node (its ``ctx``) that holds the ids of its forward."""


def _check(group_ids: torch.Tensor) -> None:
    if (
        not isinstance(group_ids, torch.Tensor)
        or group_ids.dim() != 2
        or group_ids.is_floating_point()
        or group_ids.is_complex()
        or group_ids.dtype == torch.bool
    ):
        shape = (
            f"{tuple(group_ids.shape)} {group_ids.dtype}"
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


# ---- the ids of the micro-batch a forward computes (module docstring) ----
def _running_checkpoint_nodes() -> list:
    """The ``ctx`` (autograd node) of every custom ``Function`` whose ``forward`` is running,
    innermost first.

    A reentrant checkpoint (``CheckpointFunction.forward(ctx, run_function, ...)`` in Megatron,
    Transformer Engine and torch) runs the checkpointed layers inside its ``forward``; PyTorch has
    no API for the running ``ctx``, so the caller's frames are searched for it (a few dozen frames,
    only on a forward with gradients off in training mode). Nested checkpoints each replay the
    forward, so each gets the ids.
    """
    nodes = []
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_argcount:
            ctx = frame.f_locals.get(code.co_varnames[0])
            if isinstance(ctx, torch.autograd.function.BackwardCFunction):
                nodes.append(ctx)
        frame = frame.f_back
    return nodes


def in_recompute() -> bool:
    """True when this forward runs inside the backward pass (activation recompute)."""
    return torch._C._current_graph_task_id() != -1


def token_groups_for_forward(training: bool, required: bool = True) -> TokenGroups | None:
    """The ids of the micro-batch the running forward computes, or ``None`` if none were set.

    ``training``: the calling module's ``training`` flag. In a replay inside the backward pass the
    ids come from the checkpoint node that runs it (raises if its forward recorded none); otherwise
    they are the ids set now. A training forward with gradients off (a checkpoint's first run, also
    one nested inside a replay) attaches them to its checkpoint's node for that checkpoint's replay.
    ``required=False`` (a router without group priors, reading only padding flags): a replay whose
    forward recorded nothing gets ``None``.
    """
    groups = _replayed_groups(required) if in_recompute() else _CURRENT.get()
    if training and not torch.is_grad_enabled():
        for node in _running_checkpoint_nodes():
            if not hasattr(node, _NODE_ATTR):
                # one micro-batch per checkpoint: every router inside it records the same ids
                setattr(node, _NODE_ATTR, groups)
    return groups


def _replayed_groups(required: bool) -> TokenGroups | None:
    """The ids the forward being recomputed recorded on the checkpoint node that replays it."""
    node = torch._C._current_autograd_node()
    if not hasattr(node, _NODE_ATTR):
        if not required:
            return None
        raise RuntimeError(
            "dpsl_token_groups: a router is being recomputed in the backward pass but its forward "
            "recorded no group ids: set them around that forward (with dpsl_token_groups(ids): "
            "...); non-reentrant checkpointing is not supported with group priors"
        )
    return getattr(node, _NODE_ATTR)


def _cp_slice(batch: dict, cp_group) -> dict:
    """Megatron's load-balanced 2×CP chunking of ``batch`` (``get_batch_on_this_cp_rank``).

    megatron-core 0.19 added a required ``is_hybrid_cp`` parameter; plain CP is ``False``.
    """
    import inspect

    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)


def _local_ids(
    groups: TokenGroups,
    tp_group,
    cp_group,
    sequence_parallel: bool,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's ids ``[s_local, b]``: CP slice, transpose, SP rows (of ``ids``, default the group
    ids: the padding flags are sharded the same way)."""
    ids = groups.group_ids if ids is None else ids
    cp_size = 1 if cp_group is None else cp_group.size()
    if cp_size > 1 and not groups.cp_sliced:
        if ids.shape[1] % (2 * cp_size):
            raise ValueError(
                f"dpsl_token_groups: group ids [batch, seq] = {tuple(ids.shape)}: seq is not "
                "divisible by "
                f"2 x CP size {cp_size}; pass the full sequence's ids (or cp_sliced=True with this "
                "rank's slice)"
            )
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
    return ids


def shard_token_group_ids(
    groups: TokenGroups,
    tp_group=None,
    cp_group=None,
    sequence_parallel: bool = False,
    hidden_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """This rank's ids, ``[s_local * b]``, aligned with the router's flattened ``[s_local, b, E]``
    logits.

    Args:
        groups: the ids as set by the training step.
        tp_group / cp_group: Megatron's TP and CP groups (``None`` = size 1).
        sequence_parallel: whether hidden states are split along the sequence over TP.
        hidden_shape: the router's hidden states' ``(s, b)``; when given, the ids' layout must match
            it exactly (not only the number of tokens), else ``ValueError``.
    """
    ids = _local_ids(groups, tp_group, cp_group, sequence_parallel)
    _check_layout(ids, groups, hidden_shape, "group ids")
    return ids.reshape(-1)


def shard_token_padding(
    groups: TokenGroups,
    tp_group=None,
    cp_group=None,
    sequence_parallel: bool = False,
    hidden_shape: tuple[int, int] | None = None,
) -> torch.Tensor | None:
    """This rank's padding flags, ``[s_local * b]`` bool, sharded like the ids (``None``: none
    set); ``hidden_shape`` as for :func:`shard_token_group_ids`."""
    if groups.padding_mask is None:
        return None
    pad = _local_ids(groups, tp_group, cp_group, sequence_parallel, groups.padding_mask)
    _check_layout(pad, groups, hidden_shape, "padding flags")
    return pad.reshape(-1)


def _check_layout(local: torch.Tensor, groups: TokenGroups, hidden_shape, what: str) -> None:
    """``ValueError`` unless this rank's ``[s, b]`` slice has the hidden states' ``[s, b]``."""
    if hidden_shape is None or tuple(local.shape) == tuple(hidden_shape):
        return
    s, b = hidden_shape
    raise ValueError(
        f"dpsl_token_groups: {what} give [s, b] = {list(local.shape)} on this rank (from "
        f"[batch, seq] = {list(groups.group_ids.shape)}), but the router's hidden states are "
        f"[s, b] = [{s}, {b}]; pass [batch, seq] ids of the model input "
        f"(cp_sliced={groups.cp_sliced})"
    )


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
