"""The orthogonality and variance losses on one GPU with Transformer Engine's grouped experts.

What the CPU tests cannot reach: ``TEGroupedMLP`` (probs applied in its fused bias-activation and
bias path), TE's fused permute (``moe_permute_fusion``; the slots rely on its row order being
Megatron's ``permute`` order), bf16 activations. One GPU means EP=1; the multi-rank paths are
covered by tests/distributed/test_regularizers_distributed.py on CPU.
Run: ``pytest -m gpu tests/gpu`` (on the device: ``bash scripts/run_gpu_tests.sh``).
"""

from __future__ import annotations

import pytest
import torch
from support.gpu import (
    BATCH,
    HIDDEN,
    NUM_EXPERTS,
    SEQ,
    clear_tracker,
    init_megatron_cuda,
    make_config,
    require_te,
    tracker_values,
)

pytestmark = pytest.mark.gpu

BETA, GAMMA = 1e-2, 1e-3


@pytest.fixture(scope="module")
def megatron_cuda():
    init_megatron_cuda()
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _config(dispatcher, fusion, orthogonality=True):
    types, coeffs = (
        (["variance", "orthogonality"], [GAMMA, BETA]) if orthogonality else (["variance"], [GAMMA])
    )
    try:
        return make_config(
            dispatcher,
            moe_router_load_balancing_type=types,
            moe_aux_loss_coeff=coeffs,
            moe_permute_fusion=fusion,
        )
    except (AssertionError, ValueError) as e:  # e.g. a TE too old for the fused permute
        pytest.skip(f"config refused: {e}")


def _build(config):
    """The MoE layer of the plugin's TE layer spec (0.16 ModuleSpec or 0.19 partial), on the GPU."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_dpsl.models.specs import get_dpsl_layer_spec

    mlp = get_dpsl_layer_spec(config, use_transformer_engine=True).submodules.mlp
    torch.manual_seed(0)
    layer = build_module(mlp, config=config) if isinstance(mlp, ModuleSpec) else mlp(config=config)
    layer.set_layer_number(1)
    return layer.cuda()


def _reference_orthogonality(layer, x):
    """β·L_o from every token run through every expert at once (no dispatcher, no permute)."""
    from megatron_dpsl import orthogonality_loss

    with torch.no_grad():
        _, routing_map = layer.router(x)  # no grad: no loss, the same deterministic routing
        tokens = x.reshape(-1, HIDDEN)
        n = tokens.shape[0]
        every = tokens.repeat(NUM_EXPERTS, 1)  # expert-major: each expert sees every token
        split = torch.full((NUM_EXPERTS,), n, dtype=torch.long)
        unit = torch.ones(NUM_EXPERTS * n, device=x.device, dtype=torch.float32)
        out, _ = layer.experts(every, split, unit)
        out = out.view(NUM_EXPERTS, n, HIDDEN)
        slots = torch.stack(
            [out[routing_map[t].nonzero().flatten(), t] for t in range(n)]
        )  # [n, k, H]
    return BETA * orthogonality_loss(slots.float())


@pytest.mark.parametrize("fusion", [False, True], ids=["unfused_permute", "fused_permute"])
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_te_grouped_experts_orthogonality_matches_reference(megatron_cuda, dispatcher, fusion):
    require_te()
    on, off = _config(dispatcher, fusion), _config(dispatcher, fusion, orthogonality=False)
    layer, plain = _build(on), _build(off)
    plain.load_state_dict(layer.state_dict())
    assert type(layer.experts).__name__ == "TEGroupedMLP"
    x = torch.randn(SEQ, BATCH, HIDDEN, device="cuda", dtype=torch.bfloat16)
    clear_tracker()
    out, _ = layer(x)
    logged = tracker_values("orthogonality_loss")
    assert logged is not None and torch.isfinite(logged[0]) and logged[0] > 0
    # bf16 expert GEMMs over different row groupings (grouped GEMM splits vs all tokens per expert):
    # a few bf16 ulps per output; a wrong slot order pairs unrelated rows and misses by far more
    torch.testing.assert_close(
        logged[0].float(), _reference_orthogonality(layer, x).float(), rtol=3e-2, atol=0
    )
    with torch.no_grad():
        ref_out, _ = plain(x)  # MoELayer's own path: probs applied inside the experts
    # weights applied after fc2 instead of before it: bf16 rounding of the output
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)
    out.float().square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert tracker_values("variance_loss")[0] < 0
