"""Layer 6, routing: Megatron modules. ``DPSLRouter(TopKRouter)``, the MoE layer that hosts the
orthogonality loss, how plugin losses join Megatron's aux-loss scaler and tracker; ``ac/`` holds
the Adaptive Clustering router."""
