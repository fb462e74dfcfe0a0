"""Layer 2, metrics: routing-distribution diagnostics as pure tensor functions (CoV of expert
loads, routing entropy, KS and prior distances). Logging them is ``megatron_dpsl.tracking``'s
job."""

from megatron_dpsl.metrics.routing import (
    expert_load_cov,
    group_expert_usage,
    ks_distance,
    mean_max_prob,
    prior_distance,
    routing_entropy,
)

__all__ = [
    "expert_load_cov",
    "group_expert_usage",
    "ks_distance",
    "mean_max_prob",
    "prior_distance",
    "routing_entropy",
]
