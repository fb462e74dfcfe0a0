"""Shared set-up for the GPU tests (``tests/gpu``): skip reasons, Megatron on one CUDA rank, small
models.

Nothing here imports Megatron or Transformer Engine at import time, so collection works on a CPU
machine without either (the tests are then skipped by ``tests/conftest.py``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

HIDDEN = 128  # multiple of 16: FP8 GEMMs need 16-aligned dims
FFN = 256
NUM_EXPERTS = 8
TOPK = 2
SEQ, BATCH = 64, 4  # 256 tokens: enough for a non-trivial empirical CDF per expert


def require_te():
    """Import ``transformer_engine.pytorch`` or skip with the reason."""
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.skip(
            "Transformer Engine is not installed (bash scripts/install_gpu.sh installs it; "
            "docs/gpu.md)"
        )
    try:
        import transformer_engine.pytorch as te
    except Exception as e:  # a broken TE build must read as a skip reason, not a collection error
        pytest.skip(f"transformer_engine.pytorch does not import: {type(e).__name__}: {e}")
    return te


def require_fp8():
    """Skip unless this GPU and TE can run FP8 (compute capability >= 8.9: Ada, Hopper,
    Blackwell)."""
    te = require_te()
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        pytest.skip(f"FP8 needs compute capability >= 8.9; this GPU is {cap[0]}.{cap[1]}")
    check = getattr(te, "is_fp8_available", None)
    if check is not None:
        ok, reason = check(return_reason=True)
    else:
        from transformer_engine.pytorch.fp8 import check_fp8_support

        ok, reason = check_fp8_support()
    if not ok:
        pytest.skip(f"Transformer Engine reports no FP8 on this GPU: {reason}")
    return te


def flex_dispatcher_skip_reason() -> str | None:
    """Why the ``flex`` token dispatcher cannot run here, or None if its dependency imports."""
    if importlib.util.find_spec("deep_ep") is None:
        return (
            "flex dispatcher needs DeepEP (`deep_ep`), which is not installed (no wheel on PyPI; "
            "see docs/gpu.md)"
        )
    try:
        import deep_ep  # noqa: F401
    except Exception as e:
        return f"deep_ep does not import: {type(e).__name__}: {e}"
    return None


def init_megatron_cuda(seed: int = 1234) -> None:
    """One-rank NCCL process group + Megatron's model-parallel state and CUDA RNG tracker
    (EP=TP=1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 1000))
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def make_config(dispatcher: str = "alltoall", fp8_recipe: str | None = None, **overrides):
    """A small bf16 ``DPSLTransformerConfig`` with DPSL as the only balancing loss.

    ``fp8_recipe``: None (bf16), or Megatron's name of an FP8 recipe: ``"delayed"`` (TE
    ``DelayedScaling``) or ``"tensorwise"`` (TE ``Float8CurrentScaling``, i.e. current scaling);
    with FP8 the router pads routing maps for FP8 GEMMs (``moe_router_padding_for_fp8``).
    """
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    kw = dict(
        num_layers=1,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN,
        num_attention_heads=4,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK,
        moe_token_dispatcher_type=dispatcher,
        moe_router_load_balancing_type="dpsl",
        moe_aux_loss_coeff=0.0,
        moe_dpsl_coeff=0.01,
        moe_dpsl_alpha=1.0,
        moe_router_dtype="fp32",  # router GEMM in fp32: the reference below recomputes it exactly
        moe_grouped_gemm=True,
        add_bias_linear=False,
        bf16=True,
        params_dtype=torch.bfloat16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    if fp8_recipe is not None:
        names = _field_names(DPSLTransformerConfig)
        # megatron-core <= 0.16 spells it moe_router_padding_for_fp8 (an alias there); newer
        # releases keep only moe_router_padding_for_quantization
        pad = (
            "moe_router_padding_for_fp8"
            if "moe_router_padding_for_fp8" in names
            else "moe_router_padding_for_quantization"
        )
        kw.update(fp8="hybrid", fp8_recipe=fp8_recipe, **{pad: True})
    kw.update(overrides)
    return DPSLTransformerConfig(**kw)


def build_moe_layer(config, use_te: bool = True):
    """``MoELayer`` from the DPSL layer spec (TE or local), on the current CUDA device."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_dpsl.models.specs import get_dpsl_layer_spec

    spec = get_dpsl_layer_spec(config, use_transformer_engine=use_te)
    layer = MoELayer(config, spec.submodules.mlp.submodules, layer_number=1)
    # a TransformerLayer does this for its MLP; without a layer number the tracker records nothing
    layer.set_layer_number(1)
    return layer.cuda()


def fp8_context(config):
    """Megatron's FP8 autocast for ``config`` (a null context for bf16 configs)."""
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config)


def tracker_values(name: str = "dpsl_loss") -> torch.Tensor | None:
    """Per-layer values ``[num_layers]`` Megatron's aux-loss tracker holds under ``name`` (None if
    absent).

    megatron-core >= 0.16 keeps them in ``get_moe_metrics_tracker()`` (0.19 deprecates the older
    ``get_moe_layer_wise_logging_tracker`` dict view); 0.16.1 has only the dict.
    """
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        entry = get_moe_layer_wise_logging_tracker().get(name)
        return None if entry is None else entry["values"].detach().clone()
    entry = get_moe_metrics_tracker().metrics.get(name)
    return None if entry is None else entry.values.detach().clone()


def dpsl_tracker_value(layer_number: int = 1) -> torch.Tensor | None:
    """The ``dpsl_loss`` value Megatron's aux-loss tracker holds for one layer (None if absent)."""
    values = tracker_values("dpsl_loss")
    return None if values is None else values[layer_number - 1]


def clear_tracker() -> None:
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        return
    get_moe_metrics_tracker().clear()


def reference_dpsl(layer, hidden_states: torch.Tensor) -> torch.Tensor:
    """λ · Eq. 4 recomputed outside the router, as the router logs it (``dpsl_loss`` = λ·DPSL, see
    megatron_dpsl/routing/router.py): fp32 softmax over all experts of the logits, which are
        computed here
    in float64 from the same bf16 input and weight (the router: bf16 x bf16 -> fp32 GEMM)."""
    from megatron_dpsl import dpsl_loss

    cfg = layer.config
    with torch.no_grad():
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).double()
        logits = (x @ layer.router.weight.double().t()).float()  # [num_tokens, num_experts]
        probs = torch.softmax(logits, dim=-1)
        return cfg.moe_dpsl_coeff * dpsl_loss(
            probs, cfg.dpsl_alpha()
        )  # prior from the config, on the CPU


def record_dpsl_inputs(monkeypatch) -> list:
    """Wrap (not replace) the ``dpsl_loss`` the router calls; returns a list that fills with the
    ``probs`` tensors it receives (detached), so a test can check dtype and that rows are a full
    softmax."""
    import megatron_dpsl.routing.router as router_mod

    seen = []
    real = router_mod.dpsl_loss

    def recording(probs, *args, **kwargs):
        seen.append(probs.detach().clone())
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(router_mod, "dpsl_loss", recording)
    return seen
