"""One builder for the small configs and router pairs of the router, MoE-layer, token-group and
model-builder tests (each test file used to carry its own copy).

``moe_config(**fields)``: a ``DPSLTransformerConfig`` for CPU router tests with ``TopKRouter``-sized
defaults, any field overridable; ``gpt_config(**fields)``: the same for the model-builder tests;
``router_pair(config, stock_config)``: a ``DPSLRouter`` and a stock ``TopKRouter`` with the same
weights, both at layer 1 in training mode.
"""

from __future__ import annotations

import torch

from support.common import pg

SMALL_MOE = dict(
    num_layers=2,
    hidden_size=16,
    ffn_hidden_size=8,
    num_attention_heads=4,
    num_moe_experts=8,
    moe_router_topk=2,
    moe_router_load_balancing_type="none",
    moe_aux_loss_coeff=0.0,
    moe_dpsl_log_interval=0,  # no diagnostics unless a test asks for them
    use_cpu_initialization=True,
    add_bias_linear=False,
    init_method_std=0.5,  # spread-out routing probabilities: losses and gradients above rounding
)
"""The fields every small test config shares."""


def moe_config(**fields):
    """``DPSLTransformerConfig(**SMALL_MOE | fields)``."""
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    return DPSLTransformerConfig(**{**SMALL_MOE, **fields})


SMALL_GPT = dict(
    num_layers=2,
    hidden_size=16,
    ffn_hidden_size=32,
    num_attention_heads=4,
    num_moe_experts=4,
    moe_router_topk=2,
    moe_router_load_balancing_type="dpsl",
    moe_aux_loss_coeff=0.0,
    use_cpu_initialization=True,
    add_bias_linear=False,
)
"""The small DPSL GPT of the model-builder tests (Megatron's initialisation and logging
defaults)."""


def gpt_config(**fields):
    """``DPSLTransformerConfig(**SMALL_GPT | fields)``."""
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    return DPSLTransformerConfig(**{**SMALL_GPT, **fields})


def plugin_types_config(types, coeffs, **fields):
    """``moe_config`` with plugin load-balancing ``types`` and one coefficient per type, λ taken
    from dpsl's slot (``moe_dpsl_coeff=None``) like the other plugin types."""
    return moe_config(
        **{
            "moe_router_load_balancing_type": list(types),
            "moe_aux_loss_coeff": list(coeffs),
            "moe_dpsl_coeff": None,
            **fields,
        }
    )


def router_pair(config, stock_config):
    """``DPSLRouter(config)`` and ``TopKRouter(stock_config)`` with identical weights (seed 0),
    both at layer 1 in training mode."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_dpsl.routing.router import DPSLRouter

    torch.manual_seed(0)
    d = DPSLRouter(config, pg_collection=pg())
    t = TopKRouter(stock_config, pg_collection=pg())
    t.load_state_dict(d.state_dict())
    for r in (d, t):
        r.set_layer_number(1)
        r.train()
    return d, t
