"""How the previous MoE layer's per-token top-1 expert reaches the next Adaptive-Clustering router.

An AC router (``megatron_dpsl.routing.ac.router.ACRouter``) at layer L groups its tokens by the
expert the previous MoE layer P sent them to. That assignment must come from the *same* forward pass
of the *same* micro-batch, on the same pipeline stage, and an activation-recompute pass must see
exactly what the original pass saw. No global state is involved; the design has two parts.

**One ``ACRoutingState`` per model chunk** (one pipeline stage, or one virtual-pipeline chunk),
shared by the routers of that chunk: the layer spec builds it and hands the same object to every
router it creates (``megatron_dpsl.models.specs``). It holds one slot, ``(layer_number, top1 [N])``,
written by every router after its forward. Layer L reads the slot only if it was written by P, the
MoE layer right before L in the model (``previous_moe_layer``). Megatron runs a chunk's layers in
order and one micro-batch's forward through a chunk without interruption, so at L's read the slot
holds P's output for this micro-batch if P is in this chunk; if P is on another stage (or another
chunk) the slot holds a different layer's number and L falls back to standard routing. A stale slot
from an earlier micro-batch can never pass the check: within a chunk the last write of every forward
is the chunk's last MoE layer, which is no layer's predecessor in that chunk.

**Recompute replay per layer.** Megatron's activation recompute (``recompute_granularity="full"``,
or ``"selective"`` with ``"moe"`` in ``recompute_modules``; ``tensor_parallel.checkpoint`` and
Transformer Engine's checkpoint) runs the original forward under ``torch.no_grad()`` and recomputes
it *during the backward pass*, in the backward order of the micro-batches, which for every Megatron
schedule is their forward order (per layer). So :func:`forward_phase` classifies each call:

- ``RECOMPUTE``: the forward runs inside autograd's backward (``torch._C._current_graph_task_id()``
  is set). The AC layer pops the oldest entry of its queue: the clusters *and* the feature weights
  ``W [E, H]`` of its original pass, so the recomputed logits are bit-identical and no statistics
  are re-reduced across ranks. Nothing is written to the slot.
- ``CHECKPOINTED``: training mode with gradients disabled outside a backward: the first half of a
  recompute pair. The AC layer reads the slot as usual and queues what it used.
- ``PLAIN``: everything else (training with gradients, evaluation). Reads and writes the slot.

A training-mode forward under ``torch.no_grad()`` that is never recomputed would leave an entry
behind: a later ``PLAIN`` training forward of that layer discards such entries (a checkpointed
layer never has one), and more than ``MAX_PENDING`` waiting entries raise. Run forward-only passes
in evaluation mode (``model.eval()``), as Megatron-LM's ``evaluate`` does.

Not covered: CUDA graphs that capture the router (the slot is Python state a replayed graph does
not update; the config rejects them) and non-reentrant checkpointing whose original forward keeps
gradients enabled (a recompute then finds no entry and raises).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

import torch

MAX_PENDING = 1024
"""Waiting recompute entries per layer beyond which a forward raises (a leak, see module
docstring)."""


class ForwardPhase(enum.Enum):
    """Which kind of forward call a router is in (module docstring)."""

    PLAIN = "plain"
    CHECKPOINTED = "checkpointed"
    RECOMPUTE = "recompute"


def forward_phase(training: bool) -> ForwardPhase:
    """Classify the current forward call; ``training`` is the module's ``training`` flag."""
    if torch._C._current_graph_task_id() != -1:  # a forward inside the backward pass: recompute
        return ForwardPhase.RECOMPUTE
    if training and not torch.is_grad_enabled():
        return ForwardPhase.CHECKPOINTED
    return ForwardPhase.PLAIN


@dataclass
class ReplayEntry:
    """What one AC layer used in a checkpointed forward: ``clusters [N]`` and ``weights [E, H]``
    (both ``None`` when it routed without AC)."""

    clusters: torch.Tensor | None
    weights: torch.Tensor | None


class ACRoutingState:
    """The top-1 hand-over slot and the recompute queues of one model chunk's routers.

    Build one per model chunk and pass it to every router of that chunk (the specs do). A deep copy
    of a model (or a spec) copies it once, so the copy's routers share their own state.
    """

    def __init__(self) -> None:
        self._slot_layer: int | None = None
        self._slot_top1: torch.Tensor | None = None  # [N] int64, -1 = no expert
        self._pending: dict[int, collections.deque[ReplayEntry]] = collections.defaultdict(
            collections.deque
        )

    # ---- the slot (PLAIN and CHECKPOINTED forwards) ----
    def publish(self, layer_number: int, top1: torch.Tensor) -> None:
        """Record layer ``layer_number``'s per-token top-1 expert ``[N]`` (``-1``: none)."""
        self._slot_layer, self._slot_top1 = layer_number, top1.detach()

    def clusters_from(self, previous_layer: int | None) -> torch.Tensor | None:
        """``[N]`` top-1 of ``previous_layer`` if the slot holds it (this forward), else
        ``None``."""
        if previous_layer is None or self._slot_layer != previous_layer:
            return None
        return self._slot_top1

    # ---- recompute replay ----
    def save_for_recompute(self, layer_number: int, entry: ReplayEntry) -> None:
        """Queue what a CHECKPOINTED forward of ``layer_number`` used."""
        queue = self._pending[layer_number]
        if len(queue) >= MAX_PENDING:
            raise RuntimeError(
                f"ACRouter (layer {layer_number}): {len(queue)} training-mode forward passes "
                "without gradient "
                "were never recomputed. Forward-only passes must run in evaluation mode "
                "(model.eval()); "
                "see megatron_dpsl/routing/ac/state.py"
            )
        queue.append(entry)

    def replay(self, layer_number: int) -> ReplayEntry:
        """The oldest queued entry of ``layer_number`` (a RECOMPUTE forward); raises if there is
        none."""
        queue = self._pending.get(layer_number)
        if not queue:
            raise RuntimeError(
                f"ACRouter (layer {layer_number}) is being recomputed in the backward pass, "
                "but its original "
                "forward was not recorded: the original forward must run with gradients "
                "disabled, as "
                "Megatron's (reentrant) activation recompute does; non-reentrant checkpointing "
                "is not supported"
            )
        return queue.popleft()

    def discard_pending(self, layer_number: int) -> int:
        """Drop ``layer_number``'s queued entries (a PLAIN training forward: they will never be
        replayed)."""
        queue = self._pending.pop(layer_number, None)
        return 0 if queue is None else len(queue)

    def num_pending(self, layer_number: int) -> int:
        """Entries waiting for a recompute of ``layer_number``."""
        queue = self._pending.get(layer_number)
        return 0 if queue is None else len(queue)
