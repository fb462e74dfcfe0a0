"""Router aux-loss logging through Megatron's aux-loss tracker (``moe_utils``).

Megatron's routers and ``DPSLRouter`` (``dpsl_loss`` and its diagnostics ``dpsl_cov``,
``dpsl_entropy``, ``dpsl_prior_distance``) write per-layer values into
``get_moe_layer_wise_logging_tracker()``. After every step the trainer calls Megatron's own
``track_moe_metrics``, as Megatron-LM's ``training_log`` does: it reduces the values across ranks,
writes ``name`` (mean over MoE layers) to TensorBoard, adds it to the console's loss dict and clears
the tracker. Unlike Megatron-LM's whitelist, every tracked name is passed in ``track_names``, so
``dpsl_loss`` is reduced across pipeline and data-parallel ranks too (MEGATRON_LM_INTEGRATION.md
§4).

``force_initialize`` stays False: it would allocate missing entries with ``device="cuda"``; every
name passed is already in the tracker. (gloo in torch >= 2.13 supports ``ReduceOp.AVG``, which the
function uses for the DP average.)
"""

from __future__ import annotations

from megatron_dpsl.config.load_balancing import plugin_types_in


def track_moe_metrics(
    *,
    loss_scale: float,
    iteration: int,
    writer,
    total_loss_dict: dict,
    per_layer_logging: bool,
    num_layers: int,
) -> None:
    """Reduce, log and clear Megatron's aux-loss tracker (no-op when nothing was tracked)."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if not tracker:
        return
    moe_utils.track_moe_metrics(
        loss_scale=loss_scale,
        iteration=iteration,
        writer=writer,
        total_loss_dict=total_loss_dict,
        per_layer_logging=per_layer_logging,
        force_initialize=False,
        track_names=sorted(tracker),  # same order on every rank
        num_layers=num_layers,
        moe_layer_freq=1,
    )


def clear_tracker() -> None:
    """Zero every tracked value (after forward-only evaluation, whose router losses are not
    logged)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()


def reset_tracker() -> None:
    """Drop every tracker entry (between runs in one process: Megatron's tracker is module-global).

    megatron-core 0.19 keeps the entries in ``MoEMetricsTracker.metrics``, and its legacy
    ``get_moe_layer_wise_logging_tracker()`` returns a fresh dict built from them (clearing that
    copy drops nothing); 0.16 returns the tracker dict itself.
    """
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_moe_metrics_tracker"):
        moe_utils.get_moe_metrics_tracker().metrics.clear()
    else:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()


def plugin_track_names(load_balancing_type) -> list[str]:
    """The MoE tracker names of the plugin losses that ``--moe-router-load-balancing-type`` turns
    on.

    ``load_balancing_type``: Megatron-LM's ``args.moe_router_load_balancing_type`` (a string or a
    list). Each plugin type ``t`` records ``f"{t}_loss"`` (``dpsl`` -> ``dpsl_loss``), and
    ``training_log`` must list it in ``track_names`` to reduce it over PP and DP (patch 4 of
    core_v0.16.1) or, at core_v0.19, to log it at all (patch 5 of core_v0.19.0, or the launcher's
    ``tracking.metrics_tracker.DPSLMetricsTracker``). Patched Megatron-LM trees call it as
    ``megatron_dpsl.megatron_lm.hooks.plugin_track_names``.
    """
    return [f"{t}_loss" for t in plugin_types_in(load_balancing_type)]
