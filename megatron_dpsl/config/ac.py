"""The Adaptive Clustering router's choices, shared by the config, the flags and the router.

Free of torch and Megatron (the math is ``megatron_dpsl.routing.ac.clustering``).
"""

from __future__ import annotations

WEIGHT_NORMS = ("feature", "cluster", "global")
"""Values of ``DPSLTransformerConfig.moe_ac_weight_norm`` (``routing/ac/clustering.py`` and
docs/ac_router.md say what each normalises)."""
