"""megatron-core 0.19: ``dpsl_loss`` reaches Megatron-LM's MoE report through
``DPSLMetricsTracker``.

core_v0.19.0's ``training_log`` calls ``get_moe_metrics_tracker().report(track_names=[...])`` with
the stock names only, and ``MoEMetricsTracker.report`` returns only those: the stock tracker drops
the ``dpsl_loss`` a real ``DPSLRouter`` recorded, the plugin's tracker reports it (megatron-core
0.16 has no tracker class: skipped there, with the reason).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "megatron.core.transformer.moe.moe_logging",
    reason="megatron-core < 0.19 has no MoEMetricsTracker (the 0.19 CI leg runs this)",
)

from support.common import build_mlp, reset_moe_tracker  # noqa: E402
from support.megatron_cpu import init_single_process  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_tracker():
    init_single_process()
    reset_moe_tracker()
    yield
    reset_moe_tracker()


def _record_with_a_real_router():
    """One forward of an MoE layer with DPSLRouter (λ = 0.01, aux_loss 1e-3): records both
    losses."""
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig
    from megatron_dpsl.models.specs import get_dpsl_layer_spec

    cfg = DPSLTransformerConfig(
        num_layers=2,
        hidden_size=16,
        ffn_hidden_size=32,
        num_attention_heads=2,
        num_moe_experts=4,
        moe_router_topk=2,
        use_cpu_initialization=True,
        moe_router_load_balancing_type=["aux_loss", "dpsl"],
        moe_aux_loss_coeff=[1e-3, 0.01],
        moe_token_dispatcher_type="allgather",
        add_bias_linear=False,
    )
    torch.manual_seed(0)
    layer = build_mlp(get_dpsl_layer_spec(cfg).submodules.mlp, cfg)
    layer.set_layer_number(1)
    out, _ = layer(torch.randn(6, 3, 16))
    out.sum().backward()


def _training_log_report(tracker, num_layers: int = 2) -> dict:
    """What core_v0.19.0's training_log does (training.py 2758-2794), on one rank."""
    total = {}
    tracker.report(
        loss_scale=1.0,
        iteration=1,
        per_layer_logging=False,
        force_initialize=True,
        track_names=["load_balancing_loss"],
        num_layers=num_layers,
        moe_layer_freq=1,
        mtp_num_layers=None,
        total_loss_dict=total,
    )
    return total


def test_stock_tracker_drops_dpsl_loss_the_plugin_tracker_reports_it():
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_dpsl.tracking.metrics_tracker import (
        DPSLMetricsTracker,
        install_dpsl_metrics_tracker,
    )

    _record_with_a_real_router()
    stock = get_moe_metrics_tracker()
    recorded = stock.metrics["dpsl_loss"].values.sum().item()
    assert recorded > 0 and set(_training_log_report(stock)) == {"load_balancing_loss"}

    reset_moe_tracker()
    tracker = install_dpsl_metrics_tracker(["aux_loss", "dpsl"])
    assert isinstance(tracker, DPSLMetricsTracker) and get_moe_metrics_tracker() is tracker
    _record_with_a_real_router()
    total = _training_log_report(tracker)
    assert set(total) == {"load_balancing_loss", "dpsl_loss"}
    # averaged over the 2 MoE layers of num_layers=2 with moe_layer_freq=1, as load_balancing_loss
    # is
    torch.testing.assert_close(total["dpsl_loss"].item(), recorded / 2)


def test_every_rank_reports_the_same_names():
    """A pipeline rank without MoE layers records nothing but must report the same names (PP
    all-reduce)."""
    from megatron_dpsl.tracking.metrics_tracker import install_dpsl_metrics_tracker

    total = _training_log_report(install_dpsl_metrics_tracker("dpsl"))
    assert set(total) == {"load_balancing_loss", "dpsl_loss"} and total["dpsl_loss"].item() == 0.0


def test_runs_without_plugin_types_keep_megatrons_tracker():
    from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

    from megatron_dpsl.tracking.metrics_tracker import install_dpsl_metrics_tracker

    assert type(install_dpsl_metrics_tracker("aux_loss")) is MoEMetricsTracker


def test_vlm_launcher_averages_over_the_language_models_layers():
    """pretrain_vlm with --encoder-num-layers 24 --decoder-num-layers 2: training_log passes
    args.num_layers = 24 (the ViT's depth); the launcher's tracker divides by the LM's 2 layers."""
    from megatron_dpsl.tracking.metrics_tracker import install_dpsl_metrics_tracker

    tracker = install_dpsl_metrics_tracker(["aux_loss", "dpsl"], num_layers=2)
    _record_with_a_real_router()
    recorded = {
        n: tracker.metrics[n].values.sum().item() for n in ("dpsl_loss", "load_balancing_loss")
    }
    total = _training_log_report(tracker, num_layers=24)
    for name, value in recorded.items():
        torch.testing.assert_close(total[name].item(), value / 2)
    # without the override the same report divides by 24
    reset_moe_tracker()
    stock = install_dpsl_metrics_tracker(["aux_loss", "dpsl"])
    _record_with_a_real_router()
    torch.testing.assert_close(
        _training_log_report(stock, num_layers=24)["dpsl_loss"].item(), recorded["dpsl_loss"] / 24
    )
