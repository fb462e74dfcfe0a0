"""``DPSLMoELayer``: Megatron-Core's ``MoELayer`` plus the orthogonality loss of Guo et al. (expert
side).

The loss needs, for each token, the *unweighted* outputs of its k selected experts after the token
dispatcher has brought them back, before they are weighted by ``probs`` and summed. Megatron weighs
inside the experts (``activation(fc1(x)) * probs`` before fc2, and the fc2 bias times probs), so an
expert's weighted output is exactly ``probs * unweighted``. While the loss is active this layer
therefore runs the experts with unit weights and applies ``probs`` itself after the combine:

- **alltoall**: the combine's all-to-all returns every (token, expert) row to the token's rank in
  the dispatcher's permuted order; the rows are copied into ``[num_tokens, k, hidden]`` slots for
  the loss, multiplied by the dispatcher's own permuted probs and handed to its unpermute (the sum),
  so the output path is Megatron's.
- **allgather**: Megatron sums a token's rows before the reduce-scatter, so the local experts' rows
  are scattered into ``[gathered tokens, k·hidden]`` slots instead (k times the reduce-scatter
  volume), reduce-scattered by the dispatcher (which also sums expert-tensor-parallel partial sums),
  and weighted and summed here.

Slot ``a`` of a token holds its a-th selected expert in ascending expert id; the dispatcher's rows
are expert-major with tokens ascending (Megatron's ``permute``; the allgather dispatcher relies on
the same order for its probs). The output equals ``MoELayer``'s up to rounding. Extra memory: the
slots, ``B·k·hidden`` per layer (kept for the backward), plus an fp32 copy for half-precision
activations. Everything else (routing, shared experts, latent projections, recompute) is
``MoELayer``'s. With the loss off (no ``"orthogonality"`` type, coefficient 0, eval, or no grad) the
layer *is* ``MoELayer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_dpsl.losses import orthogonality as ol
from megatron_dpsl.routing.aux_losses import attach_aux_loss


@dataclass
class _Routing:
    """One forward's routing, kept from ``route`` to ``combine`` (like the dispatcher's own
    state)."""

    probs: torch.Tensor  # [B, E]
    routing_map: torch.Tensor  # [B, E] bool
    padding_mask: torch.Tensor | None  # [B] bool, True = padding
    permuted_probs: torch.Tensor | None = None  # alltoall: the dispatcher's row weights


def rows_to_slots(
    rows: torch.Tensor, routing_map: torch.Tensor, experts: slice, topk: int
) -> torch.Tensor:
    """Copy a dispatcher's expert-major rows into per-token slots.

    Args:
        rows: ``[num_rows, hidden]``, the rows of ``routing_map[:, experts]`` in expert-major order
            with tokens ascending (Megatron's ``permute``).
        routing_map: ``[num_tokens, num_experts]`` bool, the tokens' full selections (slots count
            all experts).
        experts: the experts the rows belong to (all, or this rank's local experts).
        topk: k.

    Returns:
        ``[num_tokens, topk, hidden]``: slot a of token t is its a-th selected expert (ascending
        id); a slot with no row (a dropped expert) is zero.
    """
    num_tokens = routing_map.shape[0]
    slot_of = (
        routing_map.long().cumsum(dim=1) - 1
    )  # [B, E]: rank of each selected expert within its token
    selected = routing_map[:, experts].T  # [E_rows, B]
    token = (
        torch.arange(num_tokens, device=rows.device)
        .unsqueeze(0)
        .expand_as(selected)
        .masked_select(selected)
    )
    slot = slot_of[:, experts].T.masked_select(selected)
    out = rows.new_zeros(num_tokens * topk, rows.shape[-1]).index_copy(0, token * topk + slot, rows)
    return out.view(num_tokens, topk, rows.shape[-1])


class DPSLMoELayer(MoELayer):
    """``MoELayer`` with the orthogonality loss (on when ``moe_router_load_balancing_type`` names
    it).

    Args: those of ``MoELayer`` (newer Megatron passes e.g. ``is_mtp_layer`` and ``name`` too).
    """

    def __init__(
        self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs
    ) -> None:
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            **kwargs,
        )
        # a plain TransformerConfig has no plugin types: the layer is then MoELayer
        self.orthogonality_coeff = float(getattr(config, "moe_orthogonality_coeff", 0.0))
        self.orthogonality_form = getattr(config, "moe_orthogonality_loss_form", ol.PAPER)
        self._tp_cp_group = pg_collection.tp_cp
        self._routing: _Routing | None = None
        if hasattr(self.router, "needs_plugin_moe_layer"):
            self.router.needs_plugin_moe_layer = (
                False  # DPSLRouter refuses to train in a stock MoELayer
            )

    def orthogonality_active(self) -> bool:
        """True when the loss is computed this forward: coefficient > 0, training and grad
        enabled."""
        return self.orthogonality_coeff > 0 and self.training and torch.is_grad_enabled()

    def _alltoall(self) -> bool:
        return self.config.moe_token_dispatcher_type == "alltoall"

    def route(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        self._routing = None
        if self.orthogonality_active():
            pad = None if padding_mask is None else padding_mask.reshape(-1).bool()
            self._routing = _Routing(probs, routing_map, pad)
        return probs, routing_map

    def preprocess(
        self, hidden_states: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor
    ):
        hidden_states, probs = super().preprocess(hidden_states, probs, routing_map)
        if self._routing is not None and self._alltoall():
            self._routing.permuted_probs = (
                probs  # [rows]: the weights in the order the rows come back
            )
        return hidden_states, probs

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        if self._routing is None:
            return super().routed_experts_compute(hidden_states, probs)
        unit = torch.ones_like(probs)  # the experts return unweighted outputs
        if self._alltoall():
            return super().routed_experts_compute(hidden_states, unit)
        dispatcher = self.token_dispatcher
        gathered_map = (
            dispatcher.routing_map
        )  # [tokens of the TP×EP group, E]; dispatch_postprocess drops it
        dispatched_input, tokens_per_expert, unit_probs = dispatcher.dispatch_postprocess(
            hidden_states, unit
        )
        rows, mlp_bias = self.experts(dispatched_input, tokens_per_expert, unit_probs)
        assert mlp_bias is None, f"mlp_bias is not supported for {type(dispatcher)}"
        local = slice(self.local_expert_indices[0], self.local_expert_indices[-1] + 1)
        slots = rows_to_slots(rows, gathered_map, local, self.config.moe_router_topk)
        # [B_g, k·hidden]: the dispatcher's reduce-scatter brings each rank its own tokens' slots
        return slots.flatten(1), mlp_bias

    def combine(self, output: torch.Tensor):
        output = super().combine(output)
        routing, self._routing = self._routing, None
        if routing is None:
            return output
        topk, num_experts = self.config.moe_router_topk, self.config.num_moe_experts
        if self._alltoall():
            slots = rows_to_slots(
                output, routing.routing_map, slice(0, num_experts), topk
            )  # [B, k, h]
            weights = routing.permuted_probs.unsqueeze(-1)
            output_for_loss, weighted = (
                slots,
                (output.float() * weights).to(output.dtype),
            )  # unpermute sums rows
        else:
            slots = output.view(output.shape[0], topk, -1)  # [B, k, h], this rank's tokens
            row_probs = routing.probs.T.masked_select(routing.routing_map.T).unsqueeze(
                -1
            )  # expert-major
            slot_probs = rows_to_slots(
                row_probs, routing.routing_map, slice(0, num_experts), topk
            )  # [B, k, 1]
            output_for_loss = slots
            weighted = (slots.float() * slot_probs).sum(dim=1).to(output.dtype)
        return self._attach_orthogonality(weighted, output_for_loss, routing.padding_mask)

    def _attach_orthogonality(self, output, slots, padding_mask):
        """Add β·L_o of this rank's tokens; the replica's token count normalises it
        (docs/regularizers.md)."""
        x = slots.to(torch.promote_types(slots.dtype, torch.float32))
        paper = self.orthogonality_form == ol.PAPER
        total = (
            ol.orthogonality_sum(x, padding_mask)
            if paper
            else ol.span_projection_sum(x, padding_mask)
        )
        group = self._tp_cp_group
        size = 1 if group is None else group.size()
        if padding_mask is None:
            count = torch.tensor(
                float(x.shape[0] * size), dtype=torch.float64, device=x.device
            )  # equal shards
        else:
            count = (~padding_mask).sum().to(torch.float64)
            if size > 1:
                dist.all_reduce(
                    count, group=group
                )  # the normaliser only: no gradient flows through it
        loss = (
            self.orthogonality_coeff * total / (self.config.moe_router_topk * count.clamp(min=1.0))
        ).float()
        # each rank holds its tokens' share of the replica's loss: the tracker sums over TP×CP
        return attach_aux_loss(
            self, output, loss, "orthogonality_loss", valid_tokens=count, reduce_group=group
        )
