"""The embedded trainer and the quickstart (megatron-core + DPSL router, Megatron-LM flag names).

Modules (imported lazily by their users; this package imports nothing at import time):
``arguments`` (flags), ``corpus`` / ``data`` (byte corpus with per-token group ids, DP-sharded
batches), ``model`` (config by field name, GPTModel with the DPSL spec), ``schedule`` /
``optimizer`` (Megatron's on GPU, plain-torch reproductions on CPU), ``checkpoint`` (Megatron-LM
layout), ``plots`` (validation routing figures; the metrics are logged through
``megatron_dpsl.tracking``), ``cpu_platform`` (CPU stand-ins, trainer only), ``trainer``
(``pretrain``, ``main``), ``quickstart``. See docs/trainer.md and docs/quickstart.md.
"""
