"""``DPSLRouter``: Megatron-Core's ``TopKRouter`` plus the Dirichlet-Prior Shaping Loss.

Plug it in through Megatron's own hook, ``MoESubmodules(router=DPSLRouter)`` (or
``megatron_dpsl.specs.get_dpsl_layer_spec``). Routing (``probs``, ``routing_map``), the stock aux
losses, z-loss, expert bias, capacity dropping and the ``state_dict`` are ``TopKRouter``'s, untouched.
DPSL adds one loss computed from the fp32 softmax over *all* experts of the router logits, on every
token the configured gather covers (see ``DPSLTransformerConfig.moe_dpsl_gather``), attached with
``MoEAuxLossAutoScaler`` like Megatron's aux losses and logged as ``dpsl_loss`` (= λ·DPSL).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.moe.router import TopKRouter

from megatron_dpsl.diagnostics import routing_diagnostics
from megatron_dpsl.distributed import TokenGather
from megatron_dpsl.loss import dpsl_loss
from megatron_dpsl.token_groups import check_group_ids, get_dpsl_token_groups, shard_token_group_ids


class DPSLRouter(TopKRouter):
    """``TopKRouter`` with DPSL (needs a ``DPSLTransformerConfig``-like config with the ``moe_dpsl_*`` fields).

    Args:
        config: ``DPSLTransformerConfig`` (DPSL on when ``moe_router_load_balancing_type`` names "dpsl").
        pg_collection: Megatron's process groups (``tp``, ``cp``, ``tp_cp``, ``tp_dp_cp``, ``ep``, ``expt_tp``).
        **kwargs: forwarded to ``TopKRouter`` (newer Megatron passes e.g. ``is_mtp_layer``).
    """

    def __init__(self, config, pg_collection=None, **kwargs) -> None:
        if not hasattr(config, "moe_dpsl_coeff"):
            raise TypeError(
                f"DPSLRouter needs a megatron_dpsl.DPSLTransformerConfig (got {type(config).__name__}); "
                "build the model config with DPSLTransformerConfig(...)"
            )
        if pg_collection is None:
            pg_collection = moe_utils.get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.dpsl_enabled = config.moe_dpsl_enabled
        self.dpsl_coeff = float(config.moe_dpsl_coeff)
        self._dpsl_calls = 0  # Python-side counter for the diagnostics interval (no sync)
        if self.dpsl_enabled:
            # float64 on the host, not a buffer: dpsl_loss keys its CDF table on α's values (a device
            # tensor would cost a copy and a sync per call) and Float16Module would cast a buffer
            self._dpsl_alpha = config.dpsl_alpha()
            self._dpsl_num_groups = config.moe_dpsl_num_token_groups
            self._dpsl_gather = TokenGather(
                mode=config.moe_dpsl_gather,
                tp_cp_group=self.tp_cp_group,
                tp_dp_cp_group=self.tp_dp_cp_group,
                ep_group=getattr(pg_collection, "ep", None),
                expt_tp_group=getattr(pg_collection, "expt_tp", None),
            )

    # ---- gating: device-agnostic, works without Transformer Engine ----
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits ``[s, b, num_experts]`` in ``moe_router_dtype`` (input dtype when unset).

        Unlike ``Router.gating`` this never moves the weight to ``torch.cuda.current_device()``; it
        follows the input's device. With Transformer Engine importable, Megatron's
        ``router_gating_linear`` runs; without it (megatron-core 0.16 then raises NameError on
        ``te_general_gemm``) a plain ``F.linear`` in the router dtype computes the same matmul
        Megatron's own non-TE branch does.
        """
        if self.weight.device != input.device:
            self.weight.data = self.weight.data.to(device=input.device)
        if self.bias is not None and self.bias.device != input.device:
            self.bias.data = self.bias.data.to(device=input.device)
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        if hasattr(moe_utils, "te_general_gemm"):
            return moe_utils.router_gating_linear(input, self.weight, self.bias, router_dtype)
        bias = None if self.bias is None else self.bias.to(router_dtype)
        return F.linear(input.to(router_dtype), self.weight.to(router_dtype), bias)

    # ---- routing: stock routing + DPSL ----
    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``TopKRouter.routing`` and then DPSL on the same logits.

        Args:
            logits: ``[s, b, num_experts]``.
            padding_mask: ``[s, b]`` bool, True = padding (Megatron's code convention), or None.

        Returns:
            ``(probs, routing_map)``, both ``[s * b, num_experts]``, TopKRouter's values; the DPSL
            loss rides on ``probs`` through ``MoEAuxLossAutoScaler``.
        """
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.dpsl_active():
            flat_logits = logits.reshape(-1, self.config.num_moe_experts)
            flat_pad = None if padding_mask is None else padding_mask.reshape(-1).bool()
            probs = self._apply_dpsl(probs, flat_logits, routing_map, flat_pad)
        return probs, routing_map

    def dpsl_active(self) -> bool:
        """True when the loss is computed this call: enabled, λ > 0, training and grad enabled."""
        return self.dpsl_enabled and self.dpsl_coeff > 0 and self.training and torch.is_grad_enabled()

    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        # megatron-core 0.16/0.19 compute routing_map & ~padding_mask with a [N] mask against an
        # [N, E] map (NVIDIA/Megatron-LM#6111): broadcast the mask over experts instead.
        if padding_mask is not None and padding_mask.dim() == 1:
            padding_mask = padding_mask.unsqueeze(-1)
        return super()._apply_expert_bias(routing_map, padding_mask=padding_mask)

    def _token_group_ids(self, num_tokens: int, device) -> Optional[torch.Tensor]:
        if self._dpsl_num_groups is None:
            return None
        groups = get_dpsl_token_groups()
        if groups is None:
            raise RuntimeError(
                "DPSLRouter: group priors are configured (moe_dpsl_group_alphas or moe_dpsl_num_groups) "
                "but no per-token group ids are set; wrap the forward pass in "
                "`with megatron_dpsl.dpsl_token_groups(group_ids):` ([batch, seq] int)"
            )
        ids = shard_token_group_ids(
            groups, tp_group=self.tp_group, cp_group=self.cp_group, sequence_parallel=self.config.sequence_parallel
        )
        if ids.numel() != num_tokens:
            raise ValueError(
                f"dpsl_token_groups: group ids give {ids.numel()} tokens on this rank, the router has "
                f"{num_tokens}; pass [batch, seq] ids of the model input (cp_sliced={groups.cp_sliced})"
            )
        ids = ids.to(device)
        check_group_ids(ids, self._dpsl_num_groups)
        return ids

    def _apply_dpsl(self, probs, logits, routing_map, padding_mask):
        num_tokens, num_experts = logits.shape
        # DPSL sees the full softmax over all experts in fp32, whatever score function, pre-softmax
        # or top-k renormalisation the routing itself uses
        scores = torch.softmax(logits.float(), dim=-1)  # [num_tokens, num_experts]
        group_ids = self._token_group_ids(num_tokens, logits.device)
        # one all-gather carries probs, group ids and the padding flag (exact in fp32: small ints)
        zeros = torch.zeros(num_tokens, device=logits.device)
        extra = torch.stack([zeros if group_ids is None else group_ids.float(),
                             zeros if padding_mask is None else padding_mask.float()], dim=-1)
        gathered, replicas = self._dpsl_gather(torch.cat([scores, extra.detach()], dim=-1))  # [B, E + 2]
        all_scores = gathered[:, :num_experts]
        all_groups = gathered[:, num_experts].long() if group_ids is not None else None
        all_pad = gathered[:, num_experts + 1] > 0.5 if padding_mask is not None else None
        loss = self.dpsl_coeff * dpsl_loss(all_scores, self._dpsl_alpha, group_ids=all_groups, padding_mask=all_pad)
        if getattr(self, "is_mtp_layer", False) and getattr(self.config, "mtp_use_repeated_layer", False):
            # newer Megatron runs one repeated MTP layer mtp_num_layers times (as its aux losses do)
            loss = loss / self.config.mtp_num_layers
        self._log_dpsl(loss, routing_map, padding_mask, all_scores, all_groups, all_pad)
        if self.calculate_per_token_loss:
            # finalize_model_grads divides by the global valid-token count (≈ micro-batches × dp ×
            # tokens per replica); multiply back by this replica's valid tokens, as Megatron does
            # for its aux losses with the local count
            valid = all_scores.shape[0] if all_pad is None else (~all_pad).sum()
            loss = loss * (valid / replicas)
        return MoEAuxLossAutoScaler.apply(probs, loss)

    def _log_dpsl(self, loss, routing_map, padding_mask, all_scores, all_groups, all_pad):
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer_number = self.layer_number
        if layer_number is not None and getattr(self, "is_mtp_layer", False):
            layer_number = layer_number + self.config.num_layers
        values = {"dpsl_loss": loss}
        self._dpsl_calls += 1
        interval = self.config.moe_dpsl_log_interval
        if interval and self.layer_number is not None and self._dpsl_calls % interval == 0:
            values.update(routing_diagnostics(
                routing_map=routing_map, padding_mask=padding_mask, all_scores=all_scores, alpha=self._dpsl_alpha,
                all_groups=all_groups, all_pad=all_pad, load_group=self.tp_cp_group,
            ))
        # every rank holds the full value of its gather group: average (not sum) over all ranks
        for name, value in values.items():
            save_to_aux_losses_tracker(
                name, value, layer_number, num_layers, reduce_group=None, avg_group=self.tp_dp_cp_group
            )
