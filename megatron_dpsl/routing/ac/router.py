"""``ACRouter``: the Adaptive Clustering router (Nielsen et al., ICLR 2025) as a ``DPSLRouter``.

An AC layer scores each token in a space reweighted by its *previous* cluster: tokens are grouped by
the expert the previous MoE layer sent them to, every cluster gets per-feature weights that are
large where the cluster is tight (``megatron_dpsl.routing.ac.clustering``), and the router computes
its logits from ``m_t ⊙ h_t`` instead of ``h_t``. The router weight, the routing that follows
(top-k, score function, capacity, expert bias), the aux losses, DPSL and the ``state_dict`` are
those of ``DPSLRouter``/``TopKRouter``; only ``gating``'s input changes, and the experts still
receive the unscaled tokens (as in the official language-model code). With DPSL on, DPSL shapes the
AC router's probabilities.

Which MoE layers use AC is ``DPSLTransformerConfig.moe_ac_layers``; every MoE layer of the model
gets an ``ACRouter`` (through ``megatron_dpsl.models.specs``) so that each one hands its top-1 on.
How that hand-over survives micro-batches, pipeline stages and activation recompute is described in
``megatron_dpsl.routing.ac.state``. An AC layer whose previous MoE layer is on another pipeline
stage has no assignment to use and routes like a standard router (a warning says so, once per
layer).

The dispersion statistics are summed over the ranks that hold the micro-batch's tokens
(``megatron_dpsl.parallel.token_gather.TokenSum``: TP×CP, plus the EP ranks DPSL's ``"micro_batch"``
gather covers), without gradient and without host synchronisation, so routing equals a
single-process run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from megatron.core.transformer.moe import moe_utils

from megatron_dpsl.config.moe_layers import moe_layer_numbers, previous_moe_layer
from megatron_dpsl.parallel.token_gather import TokenSum
from megatron_dpsl.routing.ac.clustering import adaptive_clustering_weights, token_scales
from megatron_dpsl.routing.ac.state import (
    ACRoutingState,
    ForwardPhase,
    ReplayEntry,
    forward_phase,
)
from megatron_dpsl.routing.router import DPSLRouter


@dataclass
class _Call:
    """One forward call's AC inputs, handed from ``forward`` to ``gating``."""

    clusters: torch.Tensor | None  # [N] int64 (-1 = none), or None: standard routing
    weights: torch.Tensor | None = None  # [E, H], computed by gating (or replayed)


class ACRouter(DPSLRouter):
    """``DPSLRouter`` whose logits are computed on AC-reweighted tokens in the layers
    ``moe_ac_layers`` names.

    Args:
        config: ``DPSLTransformerConfig`` (fields ``moe_ac_*``).
        pg_collection: Megatron's process groups (``tp_cp``, ``ep``, ``expt_tp``, ... as for
            ``DPSLRouter``).
        ac_state: the ``ACRoutingState`` shared by every router of this model chunk (the specs pass
            it).
        **kwargs: forwarded to ``DPSLRouter`` (newer Megatron passes e.g. ``is_mtp_layer``).
    """

    def __init__(
        self, config, pg_collection=None, ac_state: ACRoutingState | None = None, **kwargs
    ) -> None:
        if not hasattr(config, "moe_ac_layers"):
            raise TypeError(
                "ACRouter needs a megatron_dpsl.DPSLTransformerConfig (got "
                f"{type(config).__name__})"
            )
        if config.moe_ac_layers and ac_state is None:
            raise TypeError(
                "ACRouter needs the ac_state shared by the routers of one model chunk: build "
                "the layer spec "
                "with megatron_dpsl.get_dpsl_decoder_block_spec / get_dpsl_layer_spec, or use "
                "MoESubmodules(router=functools.partial(ACRouter, ac_state=ACRoutingState()))"
            )
        if pg_collection is None:
            pg_collection = moe_utils.get_default_pg_collection()
        super().__init__(config, pg_collection=pg_collection, **kwargs)
        self._ac_state = ac_state if ac_state is not None else ACRoutingState()
        self._ac_layers = frozenset(config.moe_ac_layers or ())
        self._moe_layers = moe_layer_numbers(config.num_layers, config.moe_layer_freq)
        self._ac_call: _Call | None = None
        self._ac_warned = False
        self._ac_sum = (
            TokenSum(
                tp_cp_group=self.tp_cp_group,
                ep_group=getattr(pg_collection, "ep", None),
                expt_tp_group=getattr(pg_collection, "expt_tp", None),
                field="moe_ac_layers",
            )
            if self._ac_layers
            else None
        )

    @property
    def ac_enabled(self) -> bool:
        """True when this router's layer is one of ``moe_ac_layers`` (MTP layers never are)."""
        return self.layer_number in self._ac_layers and not getattr(self, "is_mtp_layer", False)

    # ---- forward: pick the clusters, record/replay, hand the top-1 on ----
    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """``TopKRouter.forward`` with AC gating; publishes this layer's top-1 for the next MoE
        layer.

        Args:
            input: ``[s, b, hidden]`` router input.
            padding_mask: ``[s, b]`` bool, True = padding (excluded from the statistics and the
                hand-over).

        Returns:
            ``(probs, routing_map)``, both ``[s * b, num_experts]``.
        """
        phase = forward_phase(self.training)
        call = _Call(clusters=None)
        if self.ac_enabled:
            if phase is ForwardPhase.RECOMPUTE:
                entry = self._ac_state.replay(self.layer_number)
                call = _Call(clusters=entry.clusters, weights=entry.weights)
            else:
                if phase is ForwardPhase.PLAIN and self.training:
                    self._ac_state.discard_pending(self.layer_number)
                call = _Call(clusters=self._incoming_clusters(padding_mask))
        self._ac_call = call
        try:
            probs, routing_map = super().forward(input, padding_mask=padding_mask)
        finally:
            self._ac_call = None
        if self.ac_enabled and phase is ForwardPhase.CHECKPOINTED:
            self._ac_state.save_for_recompute(
                self.layer_number, ReplayEntry(call.clusters, call.weights)
            )
        if phase is not ForwardPhase.RECOMPUTE and not getattr(self, "is_mtp_layer", False):
            self._ac_state.publish(self.layer_number, _top1(probs, routing_map, padding_mask))
        return probs, routing_map

    def _incoming_clusters(self, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        previous = previous_moe_layer(self.layer_number, self._moe_layers)
        clusters = self._ac_state.clusters_from(previous)
        if clusters is None:
            if not self._ac_warned:
                self._ac_warned = True
                warnings.warn(
                    f"ACRouter layer {self.layer_number}: the assignment of MoE layer "
                    f"{previous} is not available "
                    "in this model chunk (it is on another pipeline stage): this layer routes "
                    "without AC",
                    stacklevel=3,
                )
            return None
        if padding_mask is not None:
            clusters = clusters.masked_fill(padding_mask.reshape(-1).bool(), -1)
        return clusters

    # ---- gating: the router weight applied to m ⊙ h ----
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Logits ``[s, b, num_experts]`` of ``m ⊙ input`` (``DPSLRouter.gating``'s device-agnostic,
        Transformer-Engine-optional matmul); plain ``DPSLRouter.gating`` without an assignment."""
        call = self._ac_call
        if call is None or call.clusters is None:
            return super().gating(input)
        hidden = input.reshape(-1, input.shape[-1])  # [N, H], the routing's s-major token order
        if call.clusters.shape[0] != hidden.shape[0]:
            raise RuntimeError(
                f"ACRouter layer {self.layer_number}: the previous MoE layer routed "
                f"{call.clusters.shape[0]} tokens, "
                f"this layer has {hidden.shape[0]}"
            )
        with torch.no_grad():  # statistics carry no gradient (paper and official code)
            if call.weights is None:
                call.weights = adaptive_clustering_weights(
                    hidden,
                    call.clusters,
                    self.config.num_moe_experts,
                    eps=self.config.moe_ac_eps,
                    clip=self.config.moe_ac_clip,
                    norm=self.config.moe_ac_weight_norm,
                    all_reduce=self._ac_sum,
                )
            scales = token_scales(call.weights, call.clusters).reshape(input.shape)  # [s, b, H]
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype
        )
        return super().gating(input.to(router_dtype) * scales.to(router_dtype))


def _top1(
    probs: torch.Tensor, routing_map: torch.Tensor, padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """``[N]`` the selected expert with the largest routing weight; -1 for padding and fully dropped
    tokens."""
    with torch.no_grad():
        top1 = probs.detach().argmax(dim=-1)
        assigned = routing_map.any(dim=-1)
        if padding_mask is not None:
            assigned = assigned & ~padding_mask.reshape(-1).bool()
        return torch.where(assigned, top1, torch.full_like(top1, -1))
