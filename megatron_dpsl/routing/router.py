"""``DPSLRouter``: Megatron-Core's ``TopKRouter`` plus the plugin's router losses (DPSL, variance).

Plug it in through Megatron's own hook, ``MoESubmodules(router=DPSLRouter)`` (or
``megatron_dpsl.models.specs.get_dpsl_layer_spec``). Routing (``probs``, ``routing_map``), the stock
aux losses, z-loss, expert bias, capacity dropping and the ``state_dict`` are ``TopKRouter``'s,
untouched. DPSL adds one loss computed from the fp32 softmax over *all* experts of the router
logits, on every token the configured gather covers (see ``DPSLTransformerConfig.moe_dpsl_gather``),
logged as ``dpsl_loss`` (= λ·DPSL). The variance loss (Guo et al., ``moe_variance_loss_form``)
covers the same tokens through partial sums and is logged as ``variance_loss`` (= γ·L_v). Both are
attached with ``MoEAuxLossAutoScaler`` like Megatron's aux losses
(``megatron_dpsl.routing.aux_losses``).

Shape legend: s sequence, b micro-batch, E experts; B tokens (``s * b`` on this rank, or every token
of the gather group once gathered), G token groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_dpsl.losses import variance as vl
from megatron_dpsl.losses.dpsl import dpsl_loss
from megatron_dpsl.parallel.token_gather import TokenGather
from megatron_dpsl.parallel.token_groups import (
    check_group_ids,
    shard_token_group_ids,
    shard_token_padding,
    token_groups_for_forward,
)
from megatron_dpsl.routing.aux_losses import attach_aux_loss
from megatron_dpsl.tracking.router_diagnostics import routing_diagnostics


class DPSLRouter(TopKRouter):
    """``TopKRouter`` with DPSL (needs a ``DPSLTransformerConfig``-like config with the
    ``moe_dpsl_*`` fields).

    Args:
        config: ``DPSLTransformerConfig`` (DPSL on when ``moe_router_load_balancing_type`` names
            "dpsl").
        pg_collection: Megatron's process groups (``tp``, ``cp``, ``tp_cp``, ``tp_dp_cp``, ``ep``,
            ``expt_tp``).
        **kwargs: forwarded to ``TopKRouter`` (newer Megatron passes e.g. ``is_mtp_layer``).
    """

    def __init__(self, config, pg_collection=None, **kwargs) -> None:
        if not hasattr(config, "moe_dpsl_coeff"):
            raise TypeError(
                "DPSLRouter needs a megatron_dpsl.DPSLTransformerConfig (got "
                f"{type(config).__name__}); "
                "build the model config with DPSLTransformerConfig(...)"
            )
        if pg_collection is None:
            pg_collection = moe_utils.get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.dpsl_enabled = config.moe_dpsl_enabled
        self.dpsl_coeff = float(config.moe_dpsl_coeff)
        self.variance_coeff, self.variance_form = (
            config.moe_variance_coeff,
            config.moe_variance_loss_form,
        )
        self.needs_plugin_moe_layer = config.moe_orthogonality_coeff > 0  # DPSLMoELayer clears it
        self._dpsl_calls = 0  # Python-side counter for the diagnostics interval (no sync)
        if self.dpsl_enabled:
            # float64 on the host, not a buffer: dpsl_loss keys its CDF table on α's values (a
            # device tensor would cost a copy and a sync per call) and Float16Module would cast a
            # buffer
            self._dpsl_alpha = config.dpsl_alpha()
            self._dpsl_num_groups = config.moe_dpsl_num_token_groups
        if self.dpsl_enabled or self.variance_coeff > 0:
            self._token_gather = TokenGather(
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
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype
        )
        if hasattr(moe_utils, "te_general_gemm"):
            return moe_utils.router_gating_linear(input, self.weight, self.bias, router_dtype)
        bias = None if self.bias is None else self.bias.to(router_dtype)
        return F.linear(input.to(router_dtype), self.weight.to(router_dtype), bias)

    # ---- routing: stock routing + DPSL ----
    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """``TopKRouter.routing`` and then the variance loss and DPSL on the same logits.

        Args:
            logits: ``[s, b, num_experts]``.
            padding_mask: ``[s, b]`` bool, True = padding (Megatron's code convention), or None.
                The padding flags set with the token groups (``dpsl_token_groups(...,
                padding_mask=)``) are OR-ed in, for Megatron's losses as for the plugin's.

        Returns:
            ``(probs, routing_map)``, both ``[s * b, num_experts]``, TopKRouter's values; the losses
            ride on ``probs`` through ``MoEAuxLossAutoScaler``.
        """
        if self.needs_plugin_moe_layer and self.training:
            # the orthogonality loss lives in DPSLMoELayer, which marks its router: without it no
            # loss runs
            raise RuntimeError(
                "moe_router_load_balancing_type 'orthogonality' needs megatron_dpsl.DPSLMoELayer "
                "as the MoE "
                "layer; build the spec with megatron_dpsl.models.specs.get_dpsl_layer_spec / "
                "with_plugin_modules "
                "(with_router swaps only the router)"
            )
        groups = self._micro_batch_groups()  # also records them for a recompute's replay
        group_ids = self._token_group_ids(logits, groups)
        padding_mask = self._with_group_padding(padding_mask, logits, groups)
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        flat_logits = logits.reshape(-1, self.config.num_moe_experts)
        flat_pad = None if padding_mask is None else padding_mask.reshape(-1).bool()
        if self.variance_active():
            probs = self._apply_variance(probs, flat_logits, flat_pad)
        if self.dpsl_active():
            probs = self._apply_dpsl(probs, flat_logits, routing_map, flat_pad, group_ids)
        return probs, routing_map

    def dpsl_active(self) -> bool:
        """True when the loss is computed this call: enabled, λ > 0, training and grad enabled."""
        return (
            self.dpsl_enabled and self.dpsl_coeff > 0 and self.training and torch.is_grad_enabled()
        )

    def variance_active(self) -> bool:
        """True when the variance loss is computed this call: γ > 0, training and grad enabled."""
        return self.variance_coeff > 0 and self.training and torch.is_grad_enabled()

    def _apply_variance(self, probs, logits, padding_mask):
        # paper: Eq. 7 on the post-top-k probs (what mixes the experts); reference code: full
        # softmax
        paper = self.variance_form == vl.PAPER
        sums = (
            vl.variance_sums(probs, padding_mask)
            if paper
            else vl.sharpness_sums(logits, padding_mask)
        )
        # the loss is a function of sums over the batch's tokens: gather each rank's sums (one row)
        # through the DPSL gather, whose backward gives every rank the full gradient (×replicas)
        rows, replicas = self._token_gather(sums.unsqueeze(0))  # [ranks kept, C]
        total = rows.sum(0)
        loss = vl.variance_loss_from_sums(total) if paper else vl.sharpness_loss_from_sums(total)
        return attach_aux_loss(
            self,
            probs,
            (self.variance_coeff * loss).float(),
            "variance_loss",
            valid_tokens=total[-1].detach() / replicas,
            avg_group=self.tp_dp_cp_group,
        )

    def _apply_expert_bias(
        self, routing_map: torch.Tensor, padding_mask: torch.Tensor | None = None
    ):
        # megatron-core 0.16/0.19 compute routing_map & ~padding_mask with a [N] mask against an
        # [N, E] map (NVIDIA/Megatron-LM#6111): broadcast the mask over experts instead.
        if padding_mask is not None and padding_mask.dim() == 1:
            padding_mask = padding_mask.unsqueeze(-1)
        return super()._apply_expert_bias(routing_map, padding_mask=padding_mask)

    def _micro_batch_groups(self):
        """This micro-batch's ``TokenGroups`` (ids and padding flags), or ``None``."""
        uses_ids = self.dpsl_enabled and self._dpsl_num_groups is not None
        return token_groups_for_forward(self.training, required=uses_ids)

    def _with_group_padding(self, padding_mask, logits, groups):
        """``padding_mask`` ``[s, b]`` OR-ed with the padding flags set with the token groups."""
        if groups is None or groups.padding_mask is None:
            return padding_mask
        pad = shard_token_padding(
            groups,
            tp_group=self.tp_group,
            cp_group=self.cp_group,
            sequence_parallel=self.config.sequence_parallel,
            hidden_shape=tuple(logits.shape[:2]),
        )
        pad = pad.to(logits.device).reshape(logits.shape[:2])
        return pad if padding_mask is None else padding_mask.bool() | pad

    def _token_group_ids(self, logits: torch.Tensor, groups) -> torch.Tensor | None:
        """This micro-batch's group ids ``[s * b]`` for the ``[s, b, E]`` logits (``None``: no group
        priors).

        Read on every forward, also a checkpoint's first run, which records them for its replay in
        the backward pass (``megatron_dpsl.parallel.token_groups``); missing ids raise only when the
        loss needs them (training with gradients), ids of another layout always.
        """
        if not self.dpsl_enabled or self._dpsl_num_groups is None:
            return None
        if groups is None:
            if not self.dpsl_active():
                return None  # evaluation, or a checkpoint's first run: no loss to shape
            raise RuntimeError(
                "DPSLRouter: group priors are configured (moe_dpsl_group_alphas or "
                "moe_dpsl_num_groups) "
                "but no per-token group ids are set for this micro-batch; wrap its forward pass in "
                "`with megatron_dpsl.dpsl_token_groups(group_ids):` ([batch, seq] int)"
            )
        ids = shard_token_group_ids(
            groups,
            tp_group=self.tp_group,
            cp_group=self.cp_group,
            sequence_parallel=self.config.sequence_parallel,
            hidden_shape=tuple(logits.shape[:2]),
        ).to(logits.device)
        check_group_ids(ids, self._dpsl_num_groups)
        return ids

    def _apply_dpsl(self, probs, logits, routing_map, padding_mask, group_ids=None):
        num_tokens, num_experts = logits.shape
        # DPSL sees the full softmax over all experts in fp32, whatever score function, pre-softmax
        # or top-k renormalisation the routing itself uses
        scores = torch.softmax(logits.float(), dim=-1)  # [B, E]
        # one all-gather carries probs, group ids and the padding flag (exact in fp32: small ints)
        zeros = torch.zeros(num_tokens, device=logits.device)
        extra = torch.stack(
            [
                zeros if group_ids is None else group_ids.float(),
                zeros if padding_mask is None else padding_mask.float(),
            ],
            dim=-1,
        )
        gathered, replicas = self._token_gather(
            torch.cat([scores, extra.detach()], dim=-1)
        )  # [B gathered, E + 2]
        all_scores = gathered[:, :num_experts]
        all_groups = gathered[:, num_experts].long() if group_ids is not None else None
        all_pad = gathered[:, num_experts + 1] > 0.5 if padding_mask is not None else None
        loss = self.dpsl_coeff * dpsl_loss(
            all_scores, self._dpsl_alpha, group_ids=all_groups, padding_mask=all_pad
        )
        logs = None
        self._dpsl_calls += 1
        interval = self.config.moe_dpsl_log_interval
        if interval and self.layer_number is not None and self._dpsl_calls % interval == 0:
            logs = routing_diagnostics(
                routing_map=routing_map,
                padding_mask=padding_mask,
                all_scores=all_scores,
                alpha=self._dpsl_alpha,
                all_groups=all_groups,
                all_pad=all_pad,
                load_group=self.tp_cp_group,
            )
        # per-token loss: the gather group's valid tokens per replica micro-batch
        # (docs/parallelism.md); every rank holds the full value of its gather group: the tracker
        # averages over all ranks
        valid = all_scores.shape[0] if all_pad is None else (~all_pad).sum()
        return attach_aux_loss(
            self,
            probs,
            loss,
            "dpsl_loss",
            valid_tokens=valid / replicas,
            logs=logs,
            avg_group=self.tp_dp_cp_group,
        )
