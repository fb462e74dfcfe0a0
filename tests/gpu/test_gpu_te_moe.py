"""DPSLRouter inside Transformer Engine MoE layers on one GPU: bf16, FP8, alltoall/allgather/flex.

One GPU means EP=1 here; the multi-rank paths are covered by the CPU torchrun tests.
Run: ``pytest -m gpu tests/gpu`` (on the device: ``bash scripts/run_gpu_tests.sh``).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from support.gpu import (
    BATCH,
    HIDDEN,
    SEQ,
    build_moe_layer,
    clear_tracker,
    dpsl_tracker_value,
    flex_dispatcher_skip_reason,
    fp8_context,
    init_megatron_cuda,
    make_config,
    record_dpsl_inputs,
    reference_dpsl,
    require_fp8,
    require_te,
    tracker_values,
)

pytestmark = pytest.mark.gpu

DISPATCHERS = ["alltoall", "allgather", "flex"]


@pytest.fixture(scope="module")
def megatron_cuda():
    init_megatron_cuda()
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _dispatcher_overrides(dispatcher: str) -> dict:
    if dispatcher != "flex":
        return {}
    reason = flex_dispatcher_skip_reason()
    if reason:
        pytest.skip(reason)
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    names = {f.name for f in dataclasses.fields(DPSLTransformerConfig)}
    # megatron-core 0.16 selects DeepEP with moe_enable_deepep; newer ones with a backend name
    if "moe_flex_dispatcher_backend" in names:
        return {"moe_flex_dispatcher_backend": "deepep"}
    return {"moe_enable_deepep": True}


def _step(layer, x, config, main_loss_weight: float = 1.0):
    """One forward+backward; returns (main loss, dpsl from the tracker, router weight grad)."""
    layer.zero_grad(set_to_none=True)
    clear_tracker()
    x = x.detach().requires_grad_()
    with fp8_context(config):
        out, _ = layer(x)
    loss = out.float().square().mean() * main_loss_weight
    loss.backward()
    torch.cuda.synchronize()
    return loss.detach(), dpsl_tracker_value(), layer.router.weight.grad.detach().float().clone()


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_te_moe_layer_bf16_forward_backward(megatron_cuda, dispatcher):
    require_te()
    config = make_config(dispatcher, **_dispatcher_overrides(dispatcher))
    layer = build_moe_layer(config, use_te=True)
    assert type(layer.router).__name__ == "DPSLRouter"
    x = torch.randn(SEQ, BATCH, HIDDEN, device="cuda", dtype=torch.bfloat16)

    loss, dpsl, grad = _step(layer, x, config)

    assert torch.isfinite(loss)
    assert dpsl is not None, "router did not record dpsl_loss in Megatron's aux-loss tracker"
    assert torch.isfinite(dpsl) and dpsl > 0
    # the tracker holds λ·Eq. 4 on the fp32 softmax of all experts; the reference recomputes the
    # router GEMM in float64: the router's fp32-accumulated logits differ by ~1e-6 relative
    torch.testing.assert_close(dpsl.float(), reference_dpsl(layer, x).float(), rtol=1e-4, atol=1e-7)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_te_gpt_model_bf16_forward_backward(megatron_cuda, dispatcher):
    require_te()
    from megatron.core.models.gpt import GPTModel

    from megatron_dpsl.models.specs import get_dpsl_layer_spec

    config = make_config(dispatcher, num_layers=2)
    vocab = 256
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_dpsl_layer_spec(config, use_transformer_engine=True),
        vocab_size=vocab,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    ).cuda()
    tokens = torch.randint(0, vocab, (BATCH, SEQ), device="cuda")
    position_ids = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)
    clear_tracker()
    per_token = model(tokens, position_ids, attention_mask=None, labels=torch.roll(tokens, -1, 1))
    loss = per_token.float().mean()
    loss.backward()

    assert torch.isfinite(loss)
    values = tracker_values("dpsl_loss")
    assert values is not None, "router did not record dpsl_loss in Megatron's aux-loss tracker"
    assert values.numel() >= 2 and torch.isfinite(values[:2]).all() and (values[:2] > 0).all()
    routers = [m for m in model.modules() if type(m).__name__ == "DPSLRouter"]
    assert len(routers) == 2
    for r in routers:
        assert (
            r.weight.grad is not None
            and torch.isfinite(r.weight.grad).all()
            and r.weight.grad.abs().sum() > 0
        )


@pytest.mark.parametrize(
    "recipe", ["delayed", "tensorwise"]
)  # TE DelayedScaling / Float8CurrentScaling
def test_te_moe_layer_fp8_matches_bf16(megatron_cuda, recipe, monkeypatch):
    require_fp8()
    dpsl_inputs = record_dpsl_inputs(monkeypatch)
    # moe_router_padding_for_fp8 is refused with the allgather dispatcher: alltoall here
    bf16_cfg = make_config("alltoall")
    fp8_cfg = make_config("alltoall", fp8_recipe=recipe)
    bf16_layer = build_moe_layer(bf16_cfg, use_te=True)
    fp8_layer = build_moe_layer(fp8_cfg, use_te=True)
    missing, unexpected = fp8_layer.load_state_dict(bf16_layer.state_dict(), strict=False)
    assert all(k.endswith("_extra_state") for k in missing + unexpected), (missing, unexpected)
    x = torch.randn(SEQ, BATCH, HIDDEN, device="cuda", dtype=torch.bfloat16)

    # 1) DPSL alone (main loss weighted 0, the aux-loss scaler still injects DPSL's gradient): the
    # router GEMM and softmax are outside FP8, so value and router gradient must agree tightly.
    for _ in range(2):  # delayed scaling uses the previous step's amax: compare on the 2nd step too
        _, dpsl_ref, g_ref = _step(bf16_layer, x, bf16_cfg, main_loss_weight=0.0)
        _, dpsl_fp8, g_fp8 = _step(fp8_layer, x, fp8_cfg, main_loss_weight=0.0)
        assert dpsl_fp8 is not None and torch.isfinite(dpsl_fp8)
        # under FP8 the loss still sees fp32 probabilities, a full softmax over all experts (rows
        # sum to 1 to fp32 rounding over 8 terms), one row per token: not top-k, not padded
        probs_fp8 = dpsl_inputs[-1]
        assert probs_fp8.dtype == torch.float32 and probs_fp8.shape == (
            SEQ * BATCH,
            fp8_cfg.num_moe_experts,
        )
        torch.testing.assert_close(
            probs_fp8.sum(-1), torch.ones(SEQ * BATCH, device="cuda"), rtol=0, atol=1e-6
        )
        # same fp32 logits and softmax in both runs; FP8 padding must not change the DPSL input
        torch.testing.assert_close(dpsl_fp8, dpsl_ref, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(
            dpsl_fp8.float(), reference_dpsl(fp8_layer, x).float(), rtol=1e-4, atol=1e-7
        )
        assert g_ref.abs().sum() > 0
        # identical router path; only reduction order in the gradient GEMM may differ
        torch.testing.assert_close(g_fp8, g_ref, rtol=1e-4, atol=1e-6)

    # 2) full step (task loss through FP8 expert GEMMs + DPSL): FP8 e4m3 forward / e5m2 backward
    # carry up to 2^-4 / 2^-3 relative error per element; averaged over >= 128-long dot products
    # the loss stays within a few percent and the router gradient's direction is preserved.
    loss_ref, _, g_ref = _step(bf16_layer, x, bf16_cfg)
    loss_fp8, _, g_fp8 = _step(fp8_layer, x, fp8_cfg)
    assert torch.isfinite(loss_fp8)
    torch.testing.assert_close(loss_fp8, loss_ref, rtol=5e-2, atol=0.0)
    rel = (g_fp8 - g_ref).norm() / g_ref.norm()
    assert rel < 0.15, f"router grad relative L2 difference FP8 vs bf16: {rel:.3g}"


def test_dpsl_router_adds_no_host_sync(megatron_cuda):
    """DPSL in the router costs no device-to-host synchronisation (issue 3: no host round trip;
    issue 4: no extra syncs): a training forward+backward of DPSLRouter with λ > 0 triggers exactly
    the synchronising CUDA calls the same router makes with DPSL off (λ = 0), counted by
    ``torch.cuda.set_sync_debug_mode``. Needs no Transformer Engine."""
    from megatron_dpsl.routing.router import DPSLRouter

    def sync_warnings(coeff: float) -> list[str]:
        config = make_config("alltoall", moe_dpsl_coeff=coeff, moe_dpsl_log_interval=0)
        router = DPSLRouter(config=config).cuda()
        router.set_layer_number(1)
        x = torch.randn(SEQ, BATCH, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2):  # warm-up: the CDF table is built (on the host) once per prior
            probs, _ = router(x)
            probs.float().sum().backward()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                probs, _ = router(x)
                probs.float().sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # torch's per-sync warning ("called a synchronizing CUDA operation"), not its one-time
        # notice "Synchronization debug mode is a prototype feature ..." from the process's first
        # switch to "warn"
        messages = [str(w.message) for w in caught]
        return [m for m in messages if "synchroniz" in m.lower() and "prototype feature" not in m]

    without, with_dpsl = sync_warnings(0.0), sync_warnings(0.01)
    assert len(with_dpsl) == len(without), f"DPSL adds host syncs:\n{with_dpsl[len(without) :]}"
