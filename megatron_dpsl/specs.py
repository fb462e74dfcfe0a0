"""Megatron's GPT layer/block specs with ``DPSLRouter`` in ``MoESubmodules.router`` (no patching).

With ``config.moe_ac_layers`` set, the router is ``ACRouter`` bound to one ``ACRoutingState`` per spec
call: build one spec per model chunk (Megatron-LM's ``model_provider`` does), so that the routers of a
chunk share it and different chunks do not (megatron_dpsl/ac_state.py).

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

from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_dpsl.router import DPSLRouter


def _require_te(use_transformer_engine: bool) -> None:
    if use_transformer_engine and importlib.util.find_spec("transformer_engine") is None:
        raise ImportError(
            "use_transformer_engine=True needs Transformer Engine (pip install megatron-dpsl[te]); "
            "pass use_transformer_engine=False for Megatron-Core's local spec"
        )


def _swap(node, router, seen) -> int:
    """Replace the router of every ``MoESubmodules`` reachable from ``node``; returns how many."""
    if id(node) in seen:
        return 0
    seen.add(id(node))
    if isinstance(node, MoESubmodules):
        node.router = router
        return 1
    count = 0
    if isinstance(node, ModuleSpec):
        return _swap(node.submodules, router, seen)
    if isinstance(node, functools.partial):  # megatron-core 0.19: partial(MoELayer, submodules=...)
        return sum(_swap(x, router, seen) for x in (*node.args, *node.keywords.values()))
    if isinstance(node, (list, tuple)):
        return sum(_swap(x, router, seen) for x in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            count += _swap(getattr(node, f.name), router, seen)
    return count


def with_router(spec, router=DPSLRouter):
    """A deep copy of ``spec`` (ModuleSpec / TransformerBlockSubmodules / list) with ``router`` in every MoE layer."""
    spec = copy.deepcopy(spec)
    _swap(spec, router, set())
    return spec


def router_for(config):
    """The router class for ``config``'s MoE layers: ``ACRouter`` (bound to a fresh ``ACRoutingState``, one per
    call, i.e. per model chunk) when ``config.moe_ac_layers`` is set, else ``DPSLRouter``."""
    if not getattr(config, "moe_ac_enabled", False):
        return DPSLRouter
    from megatron_dpsl.ac_router import ACRouter
    from megatron_dpsl.ac_state import ACRoutingState

    return functools.partial(ACRouter, ac_state=ACRoutingState())


def get_dpsl_layer_spec(config, use_transformer_engine: bool = False, **kwargs) -> ModuleSpec:
    """Megatron's GPT layer spec (local or TE) for ``config``'s MoE layer, with ``DPSLRouter``.

    Args:
        config: ``DPSLTransformerConfig`` (``num_moe_experts`` set).
        use_transformer_engine: TE spec (``get_gpt_layer_with_transformer_engine_spec``) or the
            local one (``get_gpt_layer_local_spec``).
        **kwargs: forwarded to the Megatron spec function (override the values taken from config).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if not config.num_moe_experts:
        raise ValueError("get_dpsl_layer_spec: config.num_moe_experts must be set (an MoE layer spec)")
    _require_te(use_transformer_engine)
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
    return with_router(make(**args), router_for(config))


def get_dpsl_decoder_block_spec(config, use_transformer_engine: bool = False, **kwargs):
    """``get_gpt_decoder_block_spec(config, use_transformer_engine, **kwargs)``, ``DPSLRouter`` in its MoE layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    _require_te(use_transformer_engine)
    return with_router(get_gpt_decoder_block_spec(config, use_transformer_engine, **kwargs), router_for(config))
