"""specs.with_router / count_routers on both shapes of an MoE layer spec, whatever megatron-core is
installed.

megatron-core 0.16 specs the MoE layer as ``ModuleSpec(module=MoELayer,
submodules=MoESubmodules(...))``,
0.19 as ``partial(MoELayer, submodules=MoESubmodules(...))``; both shapes are built here by hand, so
the 0.16 leg checks the 0.19 shape too (test_router.py checks Megatron's own spec functions).
"""

from __future__ import annotations

import functools

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_dpsl.models.specs import count_routers, with_router
from megatron_dpsl.routing.router import DPSLRouter


def _layer(moe):
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(mlp=moe))


def test_with_router_swaps_module_spec_and_partial_moe_layers_and_copies():
    moe_spec = ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=None))
    moe_partial = functools.partial(MoELayer, submodules=MoESubmodules(experts=None))
    shared = MoESubmodules(experts=None)
    block = [
        _layer(moe_spec),
        _layer(moe_partial),
        _layer(functools.partial(MoELayer, submodules=shared)),
        _layer(functools.partial(MoELayer, submodules=shared)),
    ]
    assert count_routers(block, TopKRouter) == 3  # the shared MoESubmodules counts once
    swapped = with_router(block)
    assert count_routers(swapped, DPSLRouter) == 3 and count_routers(swapped, TopKRouter) == 0
    assert swapped[1].submodules.mlp.keywords["submodules"].router is DPSLRouter
    # a deep copy: the caller's spec keeps Megatron's router, and sharing survives the copy
    assert count_routers(block, TopKRouter) == 3
    assert (
        swapped[2].submodules.mlp.keywords["submodules"]
        is swapped[3].submodules.mlp.keywords["submodules"]
    )


def test_a_dense_spec_has_no_router():
    assert (
        count_routers(_layer(None)) == 0
        and count_routers(with_router(_layer(None)), DPSLRouter) == 0
    )
