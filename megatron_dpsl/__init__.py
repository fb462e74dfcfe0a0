"""megatron-dpsl: the Dirichlet-Prior Shaping Loss for Megatron-Core mixture-of-experts routers."""

from megatron_dpsl import metrics  # torch-only: importable without megatron-core
from megatron_dpsl.losses import priors
from megatron_dpsl.losses.beta import beta_cdf
from megatron_dpsl.losses.dpsl import dpsl_loss, dpsl_loss_per_expert
from megatron_dpsl.losses.orthogonality import orthogonality_loss
from megatron_dpsl.losses.variance import variance_loss, variance_loss_reference_code

__version__ = "0.1.0"

__all__ = [
    "beta_cdf",
    "dpsl_loss",
    "dpsl_loss_per_expert",
    "orthogonality_loss",
    "variance_loss",
    "variance_loss_reference_code",
    "metrics",
    "priors",
    "__version__",
]

# Megatron-dependent names load on first use, so `import megatron_dpsl` works without megatron-core.
_LAZY = {
    "DPSLTransformerConfig": "megatron_dpsl.config.transformer_config",
    "DPSLRouter": "megatron_dpsl.routing.router",
    "DPSLMoELayer": "megatron_dpsl.routing.moe_layer",
    "get_dpsl_layer_spec": "megatron_dpsl.models.specs",
    "get_dpsl_decoder_block_spec": "megatron_dpsl.models.specs",
    "dpsl_token_groups": "megatron_dpsl.parallel.token_groups",
    "set_dpsl_token_groups": "megatron_dpsl.parallel.token_groups",
    "gather_for_loss": "megatron_dpsl.parallel.token_gather",
    "ACRouter": "megatron_dpsl.routing.ac.router",
    "ACRoutingState": "megatron_dpsl.routing.ac.state",
    "adaptive_clustering_weights": "megatron_dpsl.routing.ac.clustering",
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_dpsl' has no attribute {name!r}")
