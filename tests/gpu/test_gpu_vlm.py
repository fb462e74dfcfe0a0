"""``build_llava_model`` on one GPU: the modality ids on CUDA tensors equal ``LLaVAModel``'s own
splice, and the tracked ``dpsl_loss`` equals λ·DPSL of the captured router logits with those ids and
padding.

The CPU tests (tests/unit/models/test_vlm.py) check the same on CPU tensors; here the hook's layout
arithmetic, the router's sharding and the padding OR run on the device (no host copies assumed).
Transformer Engine is not needed (local specs; ``llava_construction`` gives CLIP a norm it can
build). Run: ``pytest -m gpu tests/gpu`` (on the device: ``bash scripts/run_gpu_tests.sh``).
"""

from __future__ import annotations

import pytest
import torch
from support.common import moe_tracked
from support.gpu import init_megatron_cuda
from support.megatron_cpu import llava_construction

pytestmark = pytest.mark.gpu

IMG, IMG_SIZE, PATCH, MARK = -200, 32, 8, 1000.0  # 16 image rows per tile (class token dropped)


@pytest.fixture(scope="module")
def megatron_cuda():
    init_megatron_cuda()
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _model():
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig
    from megatron_dpsl.models.vlm import build_llava_model, clip_vision_config

    lm = DPSLTransformerConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_router_load_balancing_type="dpsl",
        moe_aux_loss_coeff=0.0,
        moe_dpsl_coeff=1.0,
        moe_dpsl_alpha_base=0.75,
        moe_dpsl_alpha_shift=0.5,
        moe_dpsl_num_groups=2,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    vision = clip_vision_config(
        lm, hf_num_layers=3, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64
    )
    with llava_construction():
        model = build_llava_model(
            lm, vision, vocab_size=64, max_sequence_length=128, img_h=IMG_SIZE, img_w=IMG_SIZE,
            patch_dim=PATCH, language_position_embedding_type="rope",
        )  # fmt: skip
    return lm, model.cuda()


def test_ids_and_dpsl_on_cuda(megatron_cuda, fresh_moe_losses):
    from megatron_dpsl.losses.dpsl import dpsl_loss
    from megatron_dpsl.parallel.token_groups import get_dpsl_token_groups
    from megatron_dpsl.routing.router import DPSLRouter

    torch.manual_seed(0)
    lm, model = _model()
    dev = torch.device("cuda")
    input_ids = torch.tensor([[5, IMG, 6, IMG, 7], [8, 9, 10, 11, 12], [IMG, 13, 14, 15, 16]])
    tiles = torch.tensor([2, 1, 1], dtype=torch.int, device=dev)
    images = torch.randn(4, 3, IMG_SIZE, IMG_SIZE, device=dev)
    seen, logits = {}, []

    def lm_pre(module, args, kwargs):
        seen["rows"] = kwargs["decoder_input"].detach().transpose(0, 1)  # [b, S, H]
        seen["groups"] = get_dpsl_token_groups()

    model.language_model.register_forward_pre_hook(lm_pre, with_kwargs=True)
    model.vision_projection.register_forward_hook(lambda m, i, o: torch.full_like(o, MARK))
    for router in [m for m in model.modules() if isinstance(m, DPSLRouter)]:
        gating = router.gating
        router.gating = lambda x, g=gating: logits.append(g(x)) or logits[-1]
    length = 5 + 3 * model.img_seq_len - 2
    mask = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool, device=dev), 1)
    output, _ = model(images, input_ids.to(dev), None, mask, num_image_tiles=tiles)
    output.float().sum().backward()
    is_image = (seen["rows"] == MARK).all(-1)
    is_pad = (seen["rows"] == 0).all(-1)
    groups = seen["groups"]
    assert groups.group_ids.is_cuda and is_image.any() and is_pad.any()
    assert torch.equal(groups.group_ids, torch.where(is_image, 0, 1))
    assert torch.equal(groups.padding_mask, is_pad)
    ids, pad = groups.group_ids.T.reshape(-1), is_pad.T.reshape(-1)
    for layer, layer_logits in enumerate(logits):
        probs = torch.softmax(layer_logits.detach().reshape(-1, 4).float(), dim=-1)
        ref = lm.moe_dpsl_coeff * dpsl_loss(probs, lm.dpsl_alpha(), group_ids=ids, padding_mask=pad)
        # fp32 on both sides, the same per-token terms (the device Beta CDF on both): a few ulps
        torch.testing.assert_close(
            moe_tracked("dpsl_loss")[layer].cuda(), ref, rtol=1e-5, atol=1e-6
        )
    assert get_dpsl_token_groups() is None
