"""How a plugin loss joins Megatron's: MTP scaling, the aux-loss tracker, per-token scaling, the
autoscaler.

Every plugin loss (DPSL and the variance loss in ``DPSLRouter``, the orthogonality loss in
``DPSLMoELayer``) goes through :func:`attach_aux_loss`, so the four rules Megatron's own aux losses
follow are written once:

1. a repeated MTP layer runs ``mtp_num_layers`` times per step, so its loss is divided by that;
2. the tracker logs the coefficient-scaled loss under the plugin's name (``dpsl_loss``,
   ``variance_loss``, ``orthogonality_loss``) at the layer's position, MTP layers after the
   decoder's;
3. with ``calculate_per_token_loss``, ``finalize_model_grads`` divides every gradient by the global
   valid-token count, so the loss is multiplied back by this replica's valid tokens (as Megatron
   does for its aux losses);
4. the loss rides on an activation through ``MoEAuxLossAutoScaler``, whose backward injects the
   schedule's aux-loss scale.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker


def tracker_position(module):
    """``(layer_number, num_layers)`` for Megatron's tracker: MTP layers come after the decoder's
    layers."""
    config = module.config
    num_layers = config.num_layers + (config.mtp_num_layers or 0)
    layer_number = module.layer_number
    if layer_number is not None and getattr(module, "is_mtp_layer", False):
        layer_number = layer_number + config.num_layers
    return layer_number, num_layers


def attach_aux_loss(
    module,
    activation: torch.Tensor,
    loss: torch.Tensor,
    name: str,
    *,
    valid_tokens=None,
    logs: dict[str, torch.Tensor] | None = None,
    reduce_group=None,
    avg_group=None,
) -> torch.Tensor:
    """Log ``loss`` and attach it to ``activation``; returns the activation to use downstream.

    Args:
        module: the router or MoE layer (``config``, ``layer_number``, optional ``is_mtp_layer``).
        activation: a tensor on the forward path (``probs`` or the layer output), returned
            unchanged.
        loss: 0-dim coefficient-scaled loss, normalised per token (what is logged).
        name: tracker name of the loss.
        valid_tokens: with ``calculate_per_token_loss``, this replica's valid-token count the loss
            is multiplied by (a number or 0-dim tensor); ignored otherwise.
        logs: further values to log with the same groups (e.g. diagnostics), or None.
        reduce_group, avg_group: Megatron's tracker groups: ranks whose values add up to the
            replica's value / ranks whose values are averaged.
    """
    config = module.config
    if getattr(module, "is_mtp_layer", False) and getattr(config, "mtp_use_repeated_layer", False):
        # newer Megatron runs one repeated MTP layer mtp_num_layers times (as its aux losses do)
        loss = loss / config.mtp_num_layers
    layer_number, num_layers = tracker_position(module)
    for key, value in {name: loss, **(logs or {})}.items():
        save_to_aux_losses_tracker(
            key, value, layer_number, num_layers, reduce_group=reduce_group, avg_group=avg_group
        )
    if config.calculate_per_token_loss and valid_tokens is not None:
        loss = loss * valid_tokens
    return MoEAuxLossAutoScaler.apply(activation, loss)
