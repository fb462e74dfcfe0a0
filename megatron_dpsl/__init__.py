"""megatron-dpsl: the Dirichlet-Prior Shaping Loss for Megatron-Core mixture-of-experts routers."""

from megatron_dpsl.beta import beta_cdf
from megatron_dpsl.loss import dpsl_loss

__version__ = "0.1.0"

__all__ = ["beta_cdf", "dpsl_loss", "__version__"]
