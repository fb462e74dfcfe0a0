"""Megatron's GPT layer/block specs with ``DPSLRouter`` in ``MoESubmodules.router`` (no patching).

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
from typing import Iterator

from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_dpsl.router import DPSLRouter


def _require_te(use_transformer_engine: bool) -> None:
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


def with_router(spec, router=DPSLRouter):
    """A deep copy of ``spec`` (ModuleSpec / TransformerBlockSubmodules / list) with ``router`` in every MoE layer."""
    spec = copy.deepcopy(spec)
    for moe in _moe_submodules(spec):
        moe.router = router
    return spec


def moe_submodules(spec) -> list[MoESubmodules]:
    """The ``MoESubmodules`` of every MoE layer in ``spec`` (shared ones once), in spec order."""
    return list(_moe_submodules(spec))


def count_routers(spec, router=DPSLRouter) -> int:
    """How many MoE layers reachable from ``spec`` build ``router``."""
    return sum(moe.router is router for moe in _moe_submodules(spec))


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
    spec = with_router(make(**args))
    if not count_routers(spec):
        raise RuntimeError(
            f"get_dpsl_layer_spec: no MoE layer found in {make.__name__}'s spec; this megatron-core lays out "
            "its MoE spec in a way megatron_dpsl.specs does not know"
        )
    return spec


def get_dpsl_decoder_block_spec(config, use_transformer_engine: bool = False, **kwargs):
    """``get_gpt_decoder_block_spec(config, use_transformer_engine, **kwargs)``, ``DPSLRouter`` in its MoE layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    _require_te(use_transformer_engine)
    return with_router(get_gpt_decoder_block_spec(config, use_transformer_engine, **kwargs))
