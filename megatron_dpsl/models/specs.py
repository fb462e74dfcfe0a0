"""Megatron's GPT layer/block specs with the plugin's modules swapped in (no patching).

``DPSLRouter`` goes into ``MoESubmodules.router`` and ``DPSLMoELayer`` replaces ``MoELayer`` (it
hosts the orthogonality loss and is ``MoELayer`` when that loss is off). Both spec shapes are
handled: megatron-core 0.16's ``ModuleSpec(module=MoELayer, submodules=MoESubmodules(...))`` and
0.19's ``functools.partial(MoELayer, submodules=MoESubmodules(...))``.

With ``config.moe_ac_layers`` set, the router is ``ACRouter`` bound to one ``ACRoutingState`` per
spec
call: build one spec per model chunk (Megatron-LM's ``model_provider`` does), so that the routers of
a chunk share it and different chunks do not (megatron_dpsl/routing/ac/state.py).

    from megatron_dpsl import DPSLTransformerConfig, get_dpsl_decoder_block_spec
    config = DPSLTransformerConfig(..., num_moe_experts=8, moe_router_load_balancing_type="dpsl")
    model = GPTModel(config, transformer_layer_spec=get_dpsl_decoder_block_spec(config), ...)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import inspect
from collections.abc import Iterator

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_dpsl.routing.moe_layer import DPSLMoELayer
from megatron_dpsl.routing.router import DPSLRouter


def require_te(use_transformer_engine: bool) -> None:
    """ImportError naming the fix when TE specs are asked for and Transformer Engine is missing."""
    if use_transformer_engine and importlib.util.find_spec("transformer_engine") is None:
        raise ImportError(
            "use_transformer_engine=True needs Transformer Engine (pip install megatron-dpsl[te]); "
            "pass use_transformer_engine=False for Megatron-Core's local spec"
        )


def _moe_submodules(node, seen=None) -> Iterator[MoESubmodules]:
    """Every ``MoESubmodules`` reachable from ``node``, once each.

    MoE layers are ``ModuleSpec(module=MoELayer, submodules=MoESubmodules(...))`` in megatron-core
    0.16 and ``partial(MoELayer, submodules=MoESubmodules(...))`` in 0.19; layer and block specs
    hold them in dataclass fields and lists.
    """
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, MoESubmodules):
        yield node
    elif isinstance(node, ModuleSpec):
        yield from _moe_submodules(node.submodules, seen)
    elif isinstance(node, functools.partial):
        for child in (*node.args, *node.keywords.values()):
            yield from _moe_submodules(child, seen)
    elif isinstance(node, (list, tuple)):
        for child in node:
            yield from _moe_submodules(child, seen)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            yield from _moe_submodules(getattr(node, f.name), seen)


def _swap(node, router, moe_layer, memo):
    """``node`` with ``router`` in every ``MoESubmodules`` below it and ``moe_layer`` for
    ``MoELayer``.

    Mutable nodes are changed in place; a ``functools.partial`` or tuple is rebuilt (``memo`` maps
    each visited node to its result, so a node shared by several layers is replaced once,
    consistently).
    """
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = node  # cycles: a node seen again while being processed stays as it is
    out = node
    if isinstance(node, MoESubmodules):
        node.router = router
    elif isinstance(node, functools.partial):
        func = moe_layer if moe_layer is not None and node.func is MoELayer else node.func
        args = tuple(_swap(a, router, moe_layer, memo) for a in node.args)
        keywords = {k: _swap(v, router, moe_layer, memo) for k, v in node.keywords.items()}
        out = functools.partial(func, *args, **keywords)
    elif isinstance(node, ModuleSpec):
        if moe_layer is not None and node.module is MoELayer:
            node.module = moe_layer
        node.submodules = _swap(node.submodules, router, moe_layer, memo)
    elif isinstance(node, list):
        node[:] = [_swap(x, router, moe_layer, memo) for x in node]
    elif isinstance(node, tuple) and not hasattr(node, "_fields"):
        out = tuple(_swap(x, router, moe_layer, memo) for x in node)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            old = getattr(node, f.name)
            new = _swap(old, router, moe_layer, memo)
            if new is not old:
                object.__setattr__(node, f.name, new)
    memo[id(node)] = out
    return out


def with_plugin_modules(spec, router=DPSLRouter, moe_layer=DPSLMoELayer):
    """A deep copy of ``spec`` (ModuleSpec / partial / TransformerBlockSubmodules / list) with
    ``router``
    in every MoE layer and ``moe_layer`` in place of ``MoELayer`` (``None``: keep ``MoELayer``)."""
    spec = copy.deepcopy(spec)
    return _swap(spec, router, moe_layer, {})


def with_router(spec, router=DPSLRouter):
    """A deep copy of ``spec`` with ``router`` in every MoE layer (the MoE layer class
    unchanged)."""
    return with_plugin_modules(spec, router, moe_layer=None)


def router_for(config):
    """The router class for ``config``'s MoE layers: ``ACRouter`` (bound to a fresh
    ``ACRoutingState``, one per
    call, i.e. per model chunk) when ``config.moe_ac_layers`` is set, else ``DPSLRouter``."""
    if not getattr(config, "moe_ac_enabled", False):
        return DPSLRouter
    from megatron_dpsl.routing.ac.router import ACRouter
    from megatron_dpsl.routing.ac.state import ACRoutingState

    return functools.partial(ACRouter, ac_state=ACRoutingState())


def moe_submodules(spec) -> list[MoESubmodules]:
    """The ``MoESubmodules`` of every MoE layer in ``spec`` (shared ones once), in spec order."""
    return list(_moe_submodules(spec))


def count_routers(spec, router=DPSLRouter) -> int:
    """How many MoE layers reachable from ``spec`` build ``router``."""
    return sum(moe.router is router for moe in _moe_submodules(spec))


def get_dpsl_layer_spec(config, use_transformer_engine: bool = False, **kwargs) -> ModuleSpec:
    """Megatron's GPT layer spec (local or TE) for ``config``'s MoE layer, with ``DPSLRouter`` and
    ``DPSLMoELayer``.

    Args:
        config: ``DPSLTransformerConfig`` (``num_moe_experts`` set).
        use_transformer_engine: TE spec (``get_gpt_layer_with_transformer_engine_spec``) or the
            local one (``get_gpt_layer_local_spec``).
        **kwargs: forwarded to the Megatron spec function (override the values taken from config).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if not config.num_moe_experts:
        raise ValueError(
            "get_dpsl_layer_spec: config.num_moe_experts must be set (an MoE layer spec)"
        )
    require_te(use_transformer_engine)
    make = (
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
        if use_transformer_engine
        else gpt_layer_specs.get_gpt_layer_local_spec
    )
    args = dict(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=config.multi_latent_attention,
    )
    # megatron-core 0.19 removed the legacy grouped GEMM (config field and spec parameter)
    if "moe_use_legacy_grouped_gemm" in inspect.signature(make).parameters:
        args["moe_use_legacy_grouped_gemm"] = getattr(config, "moe_use_legacy_grouped_gemm", False)
    args.update(kwargs)
    return with_plugin_modules(make(**args), router_for(config))


def get_dpsl_decoder_block_spec(config, use_transformer_engine: bool = False, **kwargs):
    """``get_gpt_decoder_block_spec(config, use_transformer_engine, **kwargs)``, the plugin's
    modules in its MoE layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    require_te(use_transformer_engine)
    return with_plugin_modules(
        get_gpt_decoder_block_spec(config, use_transformer_engine, **kwargs), router_for(config)
    )
