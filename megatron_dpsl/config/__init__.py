"""Layer 3, config: ``DPSLTransformerConfig`` (Megatron's ``TransformerConfig`` plus the plugin's
fields, validated once) and the names of the plugin's load-balancing types."""
