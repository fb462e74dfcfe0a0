"""Which layers of a model are MoE layers, by Megatron's ``moe_layer_freq`` rule.

Read by the config (``moe_ac_layers`` must name MoE layers with an earlier MoE layer) and by the
Adaptive Clustering router (its clusters come from the previous MoE layer). Free of torch and
Megatron.
"""

from __future__ import annotations


def moe_layer_numbers(num_layers: int, moe_layer_freq) -> list[int]:
    """1-based numbers of the MoE layers, by Megatron's ``moe_layer_freq`` rule (int N: every N-th
    layer from the first; list: a 0/1 pattern with one entry per layer)."""
    if isinstance(moe_layer_freq, int) and not isinstance(moe_layer_freq, bool):
        return [i + 1 for i in range(num_layers) if i % moe_layer_freq == 0]
    return [i + 1 for i, flag in enumerate(moe_layer_freq) if flag == 1]


def previous_moe_layer(layer_number: int, moe_layers: list[int]) -> int | None:
    """The MoE layer right before ``layer_number`` in the whole model, or ``None``."""
    earlier = [n for n in moe_layers if n < layer_number]
    return earlier[-1] if earlier else None
