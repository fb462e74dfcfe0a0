"""Small helpers shared by the test modules (not tests themselves; imported via conftest's path setup)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for torchrun's --master-port / rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- across megatron-core 0.16 / 0.19


def reset_moe_tracker() -> None:
    """Forget every MoE metric recorded so far.

    megatron-core 0.16 keeps them in a dict; 0.19 in a ``MoEMetricsTracker``, whose ``clear()`` zeroes
    the values but keeps the names (and whose legacy dict view is a copy), so it is replaced instead.
    """
    try:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    except ImportError:  # 0.16
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
    else:
        destroy_moe_metrics_tracker()


def moe_tracked(name: str):
    """A copy of the per-layer values recorded under ``name`` (``[num_layers]``), or None if never recorded."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # 0.16
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        entry = get_moe_layer_wise_logging_tracker().get(name)
        return None if entry is None else entry["values"].clone()
    entry = get_moe_metrics_tracker().metrics.get(name)
    return None if entry is None else entry.values.clone()


def build_mlp(mlp_spec, config, **kwargs):
    """Build a layer spec's ``mlp`` entry: a ``ModuleSpec`` (megatron-core 0.16) or ``partial(MoELayer, ...)`` (0.19)."""
    import functools

    from megatron.core.transformer.spec_utils import build_module

    if isinstance(mlp_spec, functools.partial):
        return mlp_spec(config=config, **kwargs)
    return build_module(mlp_spec, config=config, **kwargs)
