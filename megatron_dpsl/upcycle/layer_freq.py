"""``--moe-layer-freq`` for the upcycler: the one bounded parser
(``megatron_dpsl.config.layer_freq``: Megatron-LM's spellings without ``eval``; Megatron-LM's own
parse uses it too, through ``add_dpsl_args``), its errors as ``UpcycleError``."""

from __future__ import annotations

from megatron_dpsl.config import layer_freq
from megatron_dpsl.upcycle.errors import UpcycleError


def parse_layer_freq(value) -> int | list[int]:
    """An int N >= 1 (layers 0, N, 2N, ... are MoE) or a per-layer 0/1 list with a 1, from any
    accepted spelling (``2``, ``1,0,1,0``, ``[1,0,1,0]``, ``([1]*3+[0])*2``, ``2*[1,0]``)."""
    try:
        return layer_freq.parse_layer_freq(value)
    except layer_freq.LayerFreqError as err:
        raise UpcycleError(str(err)) from None
