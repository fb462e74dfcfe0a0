"""The embedded trainer's tracker reset empties Megatron's aux-loss tracker on megatron-core 0.16
and 0.19."""

from __future__ import annotations

import torch


def test_reset_tracker_drops_every_entry():
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker,
        save_to_aux_losses_tracker,
    )

    from megatron_dpsl.tracking import moe_tracker

    save_to_aux_losses_tracker("dpsl_loss", torch.tensor(0.5), layer_number=1, num_layers=2)
    assert (
        "dpsl_loss" in get_moe_layer_wise_logging_tracker()
    )  # recorded (0.19: through MoEMetricsTracker)
    moe_tracker.reset_tracker()
    assert "dpsl_loss" not in get_moe_layer_wise_logging_tracker()
