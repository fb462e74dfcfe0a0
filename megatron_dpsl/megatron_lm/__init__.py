"""Megatron-LM integration: the DPSL flags, a ``pretrain_gpt`` launcher and the patch applier.

``megatron_dpsl.megatron_lm.args`` needs neither megatron-core nor Megatron-LM at import time; the
launcher needs Megatron-LM's ``megatron/training`` (not in the megatron-core wheel), see
docs/megatron_lm.md.
"""

from megatron_dpsl.megatron_lm.args import (
    add_dpsl_args,
    add_moe_load_balancing_args,
    check_given_flags,
    dpsl_config_from_args,
    dpsl_enabled,
    megatron_lm_config_from_args,
)

__all__ = [
    "add_dpsl_args",
    "add_moe_load_balancing_args",
    "check_given_flags",
    "dpsl_config_from_args",
    "dpsl_enabled",
    "megatron_lm_config_from_args",
]
