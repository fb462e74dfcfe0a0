"""scripts/megatron_lm_vlm_story.py's summary: step times and DPSL's overhead read from
Megatron-LM's log lines.

(The stages' argv go through Megatron-LM's call chain in test_vlm_launcher.py.)

"""

from __future__ import annotations

import megatron_lm_vlm_story as vlm
import pytest

# Megatron-LM's training_log line as the VLM stages print it
LINE = (
    " [2026-12-04 12:00:00] iteration {i:8d}/      12 | consumed samples: {s:10d} | elapsed time "
    "per "
    "iteration (ms): {ms} | learning rate: 2.000000E-05 | global batch size:     8 | lm loss: "
    "1.187{i:02d}E+01 | "
    "{name}: {loss}E-02 | loss scale: 1.0 | grad norm: 3.210 | number of skipped iterations:   0 |"
)


def _log(name: str, times: list[float]) -> str:
    return "\n".join(
        LINE.format(i=i, s=8 * i, ms=ms, name=name, loss=f"{1 + i / 100:.6f}")
        for i, ms in enumerate(times, start=1)
    )


def test_step_time_is_the_median_after_warmup():
    # iterations 1-3 (compilation, first allocations) are left out: 5000, 4000 and 900 ms here
    log = _log("dpsl_loss", [5000.0, 4000.0, 900.0, 410.0, 400.0, 430.0, 420.0])
    assert vlm.step_ms(log) == 415.0
    assert vlm.step_ms("no training lines") is None


def test_report_gives_the_overhead_of_dpsl_over_aux_loss(tmp_path):
    rows = [
        {
            "name": "vlm_aux",
            "te": False,
            "result": "pass",
            "seconds": 80,
            "ms": 400.0,
            "notes": "...",
        },
        {
            "name": "vlm_dpsl",
            "te": False,
            "result": "pass",
            "seconds": 85,
            "ms": 430.0,
            "notes": "...",
        },
    ]
    text = vlm.report("core_v0.19.0", rows, tmp_path)
    assert "# VLM stage, core_v0.19.0 (local spec)" in text
    assert "DPSL step-time overhead over aux_loss: +7.5 %" in text
    assert "| vlm_dpsl | pass | 85 | 430.0 | ... |" in text


def test_per_layer_dpsl_loss_from_tensorboard_events(tmp_path):
    """The names Megatron-LM's MoE tracker writes with --moe-per-layer-logging
    (moe/<name>_layer_<i>)."""
    from torch.utils.tensorboard import SummaryWriter

    tb = tmp_path / "tb_vlm_dpsl"
    with SummaryWriter(str(tb)) as writer:
        for it in (1, 2):
            for layer, value in enumerate((0.011, 0.009, 0.012)):
                writer.add_scalar(f"moe/dpsl_loss_layer_{layer}", value * it, it)
            writer.add_scalar("dpsl_loss", 1.0, it)
    # TensorBoard stores float32: the last step's values to float32 precision
    assert vlm.per_layer(tb) == pytest.approx({0: 0.022, 1: 0.018, 2: 0.024}, rel=1e-6)
    text = vlm.report("core_v0.16.1", [], tmp_path)
    assert "| dpsl_loss | 0.022 | 0.018 | 0.024 |" in text
    assert "mean over the 3 MoE layers: 0.02133" in text
