"""Layer 5, tracking: logging the metrics (the router's diagnostics into Megatron's aux-loss
tracker, reducing and writing that tracker, validation-time routing statistics)."""
