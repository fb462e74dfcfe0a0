"""The embedded trainer's smallest command lines, shared by the trainer tests."""

from __future__ import annotations

TINY = [
    "--mock-data",
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--ffn-hidden-size",
    "64",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--lr",
    "1e-2",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
    "--disable-bias-linear",
    "--log-interval",
    "1",
    "--eval-iters",
    "1",
    "--seed",
    "7",
    "--device",
    "cpu",
]
"""A 2-layer dense GPT on mock data, CPU, one step's worth of flags (no --train-iters)."""

SMALL_MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]
"""With ``TINY``: 4 experts, top-2, narrow expert FFNs."""

GROUP_PRIORS = [
    "--moe-dpsl-alpha-base",
    "0.75",
    "--moe-dpsl-alpha-shift",
    "0.5",
    "--moe-dpsl-num-groups",
    "2",
]
"""DPSL modality priors over the data's two token groups (with ``--moe-dpsl-coeff``)."""
