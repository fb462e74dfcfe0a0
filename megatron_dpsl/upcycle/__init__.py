"""Offline upcycling of dense checkpoints into MoE checkpoints (docs/upcycling.md).

``upcycle(src, dst, **options)`` is the entry point; the CLI is ``megatron-dpsl-upcycle``.
Imports of megatron-core happen inside the functions that need them.
"""

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.options import UpcycleOptions


def upcycle(src, dst=None, **options):
    """See :func:`megatron_dpsl.upcycle.convert.upcycle`."""
    from megatron_dpsl.upcycle.convert import upcycle as _upcycle

    return _upcycle(src, dst, **options)


def convert_dense(src, dst, **kwargs):
    """See :func:`megatron_dpsl.upcycle.convert.convert_dense`."""
    from megatron_dpsl.upcycle.convert import convert_dense as _convert_dense

    return _convert_dense(src, dst, **kwargs)


__all__ = ["upcycle", "convert_dense", "UpcycleOptions", "UpcycleError"]
