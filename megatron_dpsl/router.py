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

from megatron_dpsl.config import split_dpsl_load_balancing
from megatron_dpsl.distributed import equal_plan, gather_for_loss, plan_gather
from megatron_dpsl.loss import dpsl_loss
from megatron_dpsl.token_groups import get_dpsl_token_groups, shard_token_group_ids


def _group_ranks(group):
    import torch.distributed as dist

    if group is None or not dist.is_initialized():
        return [0]
    return dist.get_process_group_ranks(group)


class DPSLRouter(TopKRouter):
    """``TopKRouter`` with DPSL (needs a ``DPSLTransformerConfig``-like config with the ``moe_dpsl_*`` fields).

    Args:
        config: ``DPSLTransformerConfig`` (DPSL on when ``moe_router_load_balancing_type`` names "dpsl").
        pg_collection: Megatron's process groups (``tp``, ``cp``, ``tp_cp``, ``tp_dp_cp``, ``ep``).
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
        enabled = split_dpsl_load_balancing(
            config.moe_router_load_balancing_type, config.moe_aux_loss_coeff
        )[0]
        self.dpsl_enabled = enabled
        self.ep_group = getattr(pg_collection, "ep", None)
        self.dp_group = getattr(pg_collection, "dp", None)
        self.dpsl_coeff = float(config.moe_dpsl_coeff)
        self._dpsl_calls = 0  # Python-side counter for the diagnostics interval (no sync)
        self._ep_replicas = None  # (keep, my_slot) of the EP gather: exchanged once, topology is static
        if enabled:
            self._check_micro_batch_layout(pg_collection)
            alpha = config.dpsl_alpha().to(torch.float64)
            self._dpsl_alpha_values = alpha.clone()
            # non-persistent: the state_dict stays TopKRouter's
            self.register_buffer("dpsl_alpha", alpha.to(self.weight.device), persistent=False)
            self._dpsl_uses_groups = alpha.dim() == 2
        else:
            self.dpsl_alpha = None
            self._dpsl_uses_groups = False

    def _check_micro_batch_layout(self, pg_collection) -> None:
        """"micro_batch" over EP needs gather groups that partition the ranks (docs/parallelism.md)."""
        ep, etp_group = self.ep_group, getattr(pg_collection, "expt_tp", None)
        if self.config.moe_dpsl_gather != "micro_batch" or ep is None or ep.size() == 1 or etp_group is None:
            return
        block, etp = self.tp_cp_group.size(), etp_group.size()
        span = etp * ep.size()
        # TP×CP groups are aligned blocks of tp·cp ranks and an EP group strides etp within an
        # aligned block of etp·ep ranks: when these sizes divide one another, the TP×CP blocks an
        # EP group touches are the same for every rank they contain
        if (block % etp and etp % block) or (block % span and span % block):
            raise ValueError(
                f"moe_dpsl_gather='micro_batch' with tp*cp={block}, expert_tensor_parallel={etp}, "
                f"expert_model_parallel={ep.size()}: these sizes must divide one another for the EP "
                "gather to form consistent groups; use moe_dpsl_gather='global_batch'"
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
        router_dtype = input.dtype
        if self.config.moe_router_dtype == "fp32":
            router_dtype = torch.float32
        elif self.config.moe_router_dtype == "fp64":
            router_dtype = torch.float64
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
        if not self._dpsl_uses_groups:
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
        num_groups = self.dpsl_alpha.shape[0]
        # range check once (a host sync): group ids come from the data pipeline, not the model
        if self._dpsl_calls == 0 and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_groups):
            raise ValueError(
                f"dpsl_token_groups: group ids must lie in [0, {num_groups}), got {ids.min()}..{ids.max()}"
            )
        return ids.to(device)

    def _gather(self, rows: torch.Tensor):
        """Gather ``rows`` ``[num_tokens, C]`` over the configured ranks; returns (gathered, num_replicas).

        Every rank of a gather group holds the same number of tokens (Megatron's micro-batches have
        a fixed shape and SP/CP split them evenly), so the plans need no size exchange: after the
        first call, the loss costs no collective but the data all-gathers and no host sync.
        """
        tp_cp = self.tp_cp_group
        num_tokens = rows.shape[0]
        if self.config.moe_dpsl_gather == "global_batch":
            group = self.tp_dp_cp_group
            replicas = group.size() // tp_cp.size()
            # every rank computes the loss on the whole global micro-batch; DDP divides by dp*cp and
            # the schedule's aux-loss scale multiplies by cp, so each rank's slice needs ×dp
            return gather_for_loss(rows, group, plan=equal_plan(num_tokens, group), grad_scale=replicas), replicas
        gathered = gather_for_loss(rows, tp_cp, plan=equal_plan(num_tokens, tp_cp))
        ep = self.ep_group
        if ep is None or ep.size() == 1 or set(_group_ranks(ep)) <= set(_group_ranks(tp_cp)):
            return gathered, 1
        # EP ranks outside this TP×CP group hold other data-parallel replicas' tokens: gather those
        # micro-batches too, once each (EP peers inside the same TP×CP group hold the same rows)
        if self._ep_replicas is None:
            first = plan_gather(gathered.shape[0], ep, replica_id=min(_group_ranks(tp_cp)), device=rows.device)
            self._ep_replicas = (first.keep, first.my_slot)
        plan = equal_plan(gathered.shape[0], ep, *self._ep_replicas)
        return gather_for_loss(gathered, ep, plan=plan, grad_scale=plan.num_replicas), plan.num_replicas

    def _maintain_dpsl_alpha(self, device):
        # Float16Module casts floating buffers to bf16/fp16: restore the exact float64 prior
        if self.dpsl_alpha.dtype != torch.float64 or self.dpsl_alpha.device != device:
            self.dpsl_alpha = self._dpsl_alpha_values.to(device)

    def _apply_dpsl(self, probs, logits, routing_map, padding_mask):
        num_tokens, num_experts = logits.shape
        self._maintain_dpsl_alpha(logits.device)
        # DPSL sees the full softmax over all experts in fp32, whatever score function, pre-softmax
        # or top-k renormalisation the routing itself uses
        scores = torch.softmax(logits.float(), dim=-1)  # [num_tokens, num_experts]
        group_ids = self._token_group_ids(num_tokens, logits.device)
        # one all-gather carries probs, group ids and the padding flag (exact in fp32: small ints)
        extra = [
            (group_ids if group_ids is not None else torch.zeros(num_tokens, device=logits.device)).float(),
            (padding_mask if padding_mask is not None else torch.zeros(num_tokens, device=logits.device)).float(),
        ]
        rows = torch.cat([scores, torch.stack(extra, dim=-1).detach()], dim=-1)  # [num_tokens, E + 2]
        gathered, replicas = self._gather(rows)
        all_scores = gathered[:, :num_experts]
        all_groups = gathered[:, num_experts].long() if group_ids is not None else None
        all_pad = gathered[:, num_experts + 1] > 0.5 if padding_mask is not None else None
        # the host copy of α: dpsl_loss caches its CDF table by α's values, so a device tensor would
        # cost a device-to-host copy (and a sync) per call
        loss = self.dpsl_coeff * dpsl_loss(
            all_scores, self._dpsl_alpha_values, group_ids=all_groups, padding_mask=all_pad
        )
        if getattr(self, "is_mtp_layer", False) and getattr(self.config, "mtp_use_repeated_layer", False):
            # newer Megatron runs one repeated MTP layer mtp_num_layers times (as its aux losses do)
            loss = loss / self.config.mtp_num_layers

        self._log_dpsl(loss, all_scores, routing_map, padding_mask, all_groups, all_pad)
        attached = loss
        if self.calculate_per_token_loss:
            # finalize_model_grads divides by the global valid-token count (≈ micro-batches × dp ×
            # tokens per replica); multiply back by this replica's valid tokens, as Megatron does
            # for its aux losses with the local count
            valid = all_scores.shape[0] if all_pad is None else (~all_pad).sum()
            attached = loss * (valid / replicas)
        return MoEAuxLossAutoScaler.apply(probs, attached)

    def _log_dpsl(self, loss, all_scores, routing_map, padding_mask, all_groups, all_pad):
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer_number = self.layer_number
        if layer_number is not None and getattr(self, "is_mtp_layer", False):
            layer_number = layer_number + self.config.num_layers
        # every rank holds the full λ·DPSL of its gather group: average (not sum) over all ranks
        save_to_aux_losses_tracker(
            "dpsl_loss", loss, layer_number, num_layers, reduce_group=None, avg_group=self.tp_dp_cp_group
        )
        self._dpsl_calls += 1
        interval = self.config.moe_dpsl_log_interval
        if not interval or self.layer_number is None or self._dpsl_calls % interval:
            return
        from megatron_dpsl import metrics

        with torch.no_grad():
            valid = None if padding_mask is None else ~padding_mask
            local_load = (routing_map if valid is None else routing_map & valid.unsqueeze(-1)).sum(0).float()
            load = local_load.clone()
            if self.tp_cp_group.size() > 1:  # only on log steps
                torch.distributed.all_reduce(load, group=self.tp_cp_group)
            keep = None if all_pad is None else ~all_pad
            scores = all_scores if keep is None else all_scores[keep]
            values = {
                "dpsl_cov": metrics.expert_load_cov(load),
                "dpsl_entropy": metrics.routing_entropy(scores),
                "dpsl_prior_distance": metrics.prior_distance(
                    all_scores, self._dpsl_alpha_values, group_ids=all_groups, padding_mask=all_pad
                ).max(),
            }
        for name, value in values.items():
            save_to_aux_losses_tracker(
                name, value.float(), layer_number, num_layers, reduce_group=None, avg_group=self.tp_dp_cp_group
            )
