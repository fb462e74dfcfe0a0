"""``dpsl_loss`` in Megatron-LM core_v0.19's MoE metrics report, without patching ``training.py``.

At core_v0.19.0 ``training_log`` calls ``get_moe_metrics_tracker().report(track_names=[...])`` with
a list built from Megatron's own load-balancing types (``load_balancing_loss``, ``z_loss``, ...),
and ``MoEMetricsTracker.report`` syncs, logs and returns only the listed names: the ``dpsl_loss``
that ``DPSLRouter`` records is silently dropped (and zeroed by ``clear``). ``DPSLMetricsTracker``
adds the plugin's losses (``moe_tracker.plugin_track_names``) to that list, so they are reduced
over PP, TP×CP and DP like ``load_balancing_loss`` and reach the console, TensorBoard and W&B.
The launcher installs it with Megatron's own setter, ``set_moe_metrics_tracker``, before training;
a patched checkout builds the same list in ``training_log`` (patch 5 of ``patches/core_v0.19.0``).

core_v0.16.1 has no tracker class: its ``track_moe_metrics`` logs unlisted names unreduced (patch 4
of ``patches/core_v0.16.1`` reduces them).
"""

from __future__ import annotations

from megatron.core.transformer.moe.moe_logging import (
    MoEMetricsTracker,
    get_moe_metrics_tracker,
    set_moe_metrics_tracker,
)

from megatron_dpsl.tracking.moe_tracker import plugin_track_names


class DPSLMetricsTracker(MoEMetricsTracker):
    """``MoEMetricsTracker`` whose ``report`` also covers the plugin losses of the run.

    Args:
        load_balancing_type: ``args.moe_router_load_balancing_type`` (a string or a list). The names
            come from it, not from what this rank recorded: with ``force_initialize`` every pipeline
            rank, MoE layers or not, must report the same names, or the PP all-reduce hangs.
        num_layers: the layer count the averages divide by, instead of ``training_log``'s
            ``args.num_layers`` (``None``: that one). The VLM launcher gives the language model's
            ``--decoder-num-layers``: ``validate_args`` sets ``args.num_layers`` to the ViT's depth.
    """

    def __init__(self, load_balancing_type, num_layers: int | None = None):
        super().__init__()
        self.plugin_track_names = plugin_track_names(load_balancing_type)
        self.num_layers = num_layers

    def report(self, *args, track_names=None, **kwargs) -> str:
        if self.num_layers is not None and "num_layers" in kwargs:
            kwargs["num_layers"] = self.num_layers
        # None already means "every recorded name"
        if track_names is not None:
            names = [track_names] if isinstance(track_names, str) else list(track_names)
            track_names = names + [n for n in self.plugin_track_names if n not in names]
        return super().report(*args, track_names=track_names, **kwargs)


def install_dpsl_metrics_tracker(
    load_balancing_type, num_layers: int | None = None
) -> MoEMetricsTracker:
    """Make Megatron's global MoE tracker a ``DPSLMetricsTracker`` when the run has plugin losses
    or ``num_layers`` (see the class).

    Call before training (nothing recorded yet). Returns the tracker in place.
    """
    if plugin_track_names(load_balancing_type) or num_layers is not None:
        set_moe_metrics_tracker(DPSLMetricsTracker(load_balancing_type, num_layers))
    return get_moe_metrics_tracker()
