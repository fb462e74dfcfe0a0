"""scripts/megatron_lm_story.py's summary notes: the values a GPU run logged, read from
Megatron-LM's log lines."""

from __future__ import annotations

import megatron_lm_story as story

# Megatron-LM's training_log line (megatron/training/training.py: ' iteration {:8d}/{:8d} |' then
# ' {key}: {avg:.6E} |' per loss, MoE aux losses included), as the story's stages print it
LINE = (
    " [2026-11-27 12:00:0{i}] iteration        {i}/       8 | consumed samples:           32 | "
    "elapsed time per "
    "iteration (ms): 512.3 | learning rate: 1.000000E-03 | global batch size:     4 | lm loss: "
    "6.87301{i}E+00 | "
    "load_balancing_loss: 1.005123E+00 | dpsl_loss: 5.73000{i}E-03 | loss scale: 1.0 | grad "
    "norm: 1.234 | "
    "number of skipped iterations:   0 | number of nan iterations:   0 |"
)


def test_summary_reports_the_last_iterations_losses():
    log = "\n".join(
        [
            "$ torchrun ...",
            LINE.format(i=4),
            " validation loss at iteration 4 | lm loss value: 7.1E+00 |",
            LINE.format(i=8),
            "[after training is done] datetime: ...",
        ]
    )
    assert (
        story.log_summary(log)
        == "iteration 8/8, lm loss 6.873, dpsl_loss 0.00573, load_balancing_loss 1.005"
    )


def test_summary_of_a_log_without_training_lines_is_empty():
    assert story.log_summary("converted 2 layers\nwrote /tmp/ckpt_moe_init") == ""
