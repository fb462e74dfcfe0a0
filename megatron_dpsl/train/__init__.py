"""The embedded trainer and the quickstart (megatron-core + DPSL router, Megatron-LM flag names).

Modules (imported lazily by their users; this package imports nothing at import time):
``arguments`` (flags), ``corpus`` / ``data`` (byte corpus with per-token group ids, DP-sharded
batches), ``model`` (config by field name, GPTModel with the DPSL spec), ``schedule`` /
``optimizer`` (Megatron's on GPU, plain-torch reproductions on CPU), ``checkpoint`` (Megatron-LM
layout), ``moe_logging`` (Megatron's aux-loss tracker), ``routing_stats`` / ``plots`` (validation
routing diagnostics and figures), ``cpu_platform`` (CPU stand-ins, trainer only), ``trainer``
(``pretrain``, ``main``), ``quickstart``. See docs/trainer.md and docs/quickstart.md.
"""
