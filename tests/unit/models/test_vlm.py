"""``megatron_dpsl.models.vlm``: a real Megatron-Core ``LLaVAModel`` with a DPSL language model, on
CPU.

The modality ids are checked against an independent per-position reference: the projector's output
is forced to a marker value, and the ``decoder_input`` ``LLaVAModel`` hands its language model (its
own splice, padding and truncation) is read by a pre-hook on ``language_model``: marker rows are
image rows, all-zero rows are padding.
"""

from __future__ import annotations

import pytest
import torch
from support.common import moe_tracked, reset_moe_tracker
from support.configs import gpt_config
from support.megatron_cpu import clip_cuda_noop, init_single_process

IMG = -200
MARK = 1000.0  # projector output: far from any embedding value (init std 0.02)
IMG_SIZE, PATCH = 16, 8  # 4 patches per tile


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    init_single_process()
    yield


@pytest.fixture(autouse=True)
def no_token_groups_left():
    """The hook sets the ids for its forward only (a recompute replays what the forward recorded):
    none may be left for the next test."""
    from megatron_dpsl.parallel.token_groups import get_dpsl_token_groups, set_dpsl_token_groups

    yield
    left = get_dpsl_token_groups()
    set_dpsl_token_groups(None)
    assert left is None, "the modality hook left token groups set after the forward"


def _lm_config(**over):
    fields = dict(
        moe_dpsl_coeff=1.0,
        moe_dpsl_alpha_base=0.75,
        moe_dpsl_alpha_shift=0.5,
        moe_dpsl_num_groups=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return gpt_config(**{**fields, **over})


def _build(lm=None, max_len=64, **kw):
    from megatron_dpsl.models.vlm import build_llava_model, clip_vision_config

    lm = lm or _lm_config()
    vision = clip_vision_config(
        lm, hf_num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16
    )
    kw.setdefault("language_position_embedding_type", "rope")
    # only the CUDA-only call is replaced: CLIP's norms without TE are build_llava_model's own fix
    with clip_cuda_noop():
        return build_llava_model(
            lm,
            vision,
            vocab_size=50,
            max_sequence_length=max_len,
            img_h=IMG_SIZE,
            img_w=IMG_SIZE,
            patch_dim=PATCH,
            **kw,
        )


def _inputs():
    """Uneven images: two (2 and 1 tiles) mid-row, none (text only), one at the start."""
    input_ids = torch.tensor([[5, IMG, 6, IMG, 7], [8, 9, 10, 11, 12], [IMG, 13, 14, 15, 16]])
    tiles = torch.tensor([2, 1, 1], dtype=torch.int)
    images = torch.randn(int(tiles.sum()), 3, IMG_SIZE, IMG_SIZE)
    return images, input_ids, tiles


class _Probe:
    """Forces the projector output to ``MARK`` and records what the language model receives."""

    def __init__(self, model, mark=True):
        from megatron_dpsl.parallel.token_groups import get_dpsl_token_groups

        self.seen = {}

        def lm_pre(module, args, kwargs):
            self.seen["decoder_input"] = kwargs["decoder_input"].detach().clone()  # [S, b, H]
            self.seen["groups"] = get_dpsl_token_groups()

        self.handles = [model.language_model.register_forward_pre_hook(lm_pre, with_kwargs=True)]
        if mark:
            self.handles.append(
                model.vision_projection.register_forward_hook(
                    lambda m, i, o: torch.full_like(o, MARK)
                )
            )

    def reference(self):
        """``([b, S] image rows, [b, S] pad rows)`` read off the decoder input."""
        rows = self.seen["decoder_input"].transpose(0, 1)  # [b, S, H]
        return (rows == MARK).all(-1), (rows == 0).all(-1)


def _causal(length):
    return torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), 1)


def _forward(model, images, input_ids, tiles, length, **kw):
    return model(images, input_ids, None, _causal(length), num_image_tiles=tiles, **kw)


@pytest.mark.parametrize(
    "drop_cls,max_len",
    [(True, 64), (False, 64), (True, 10)],
    ids=["cls-dropped", "cls-kept", "truncated"],
)
def test_ids_match_llava_splice_on_marker_embeddings(drop_cls, max_len):
    model = _build(max_len=max_len, drop_vision_class_token=drop_cls)
    assert model.img_seq_len == (4 if drop_cls else 5)
    images, input_ids, tiles = _inputs()
    probe = _Probe(model)
    combined = min(
        max_len, 5 + 3 * model.img_seq_len - 2
    )  # row 0: 5 tokens, 3 tiles, 2 image tokens
    _forward(model, images, input_ids, tiles, combined)
    is_image, is_pad = probe.reference()
    groups = probe.seen["groups"]
    assert is_image.shape == (3, combined) and groups.group_ids.shape == (3, combined)
    assert is_image.sum() > 0 and is_pad.sum() > 0  # both roles occur: the comparison can fail
    assert torch.equal(groups.padding_mask, is_pad)
    expected = torch.where(is_image, 0, 1)
    assert torch.equal(groups.group_ids, expected)


def _capture_logits(model):
    """Each router's ``[s, b, E]`` logits of the next forward, in layer order."""
    from megatron_dpsl.routing.router import DPSLRouter

    logits = []
    for router in [m for m in model.modules() if isinstance(m, DPSLRouter)]:
        gating = router.gating

        def capture(x, gating=gating):
            out = gating(x)
            logits.append(out.detach().clone())
            return out

        router.gating = capture
    return logits


def test_tracked_losses_equal_references_on_non_pad_rows(fresh_moe_losses):
    """DPSL (group prior by modality) and Megatron's z-loss both leave LLaVA's padding rows out."""
    from megatron_dpsl.losses.dpsl import dpsl_loss

    lm = _lm_config(moe_z_loss_coeff=1e-3)
    model = _build(lm)
    images, input_ids, tiles = _inputs()
    probe = _Probe(model)
    logits = _capture_logits(model)
    _forward(model, images, input_ids, tiles, 15)
    is_image, is_pad = probe.reference()
    ids, pad = (
        torch.where(is_image, 0, 1).T.reshape(-1),
        is_pad.T.reshape(-1),
    )  # s-major, as the router
    alpha = lm.dpsl_alpha()
    for layer, layer_logits in enumerate(logits):
        flat = layer_logits.reshape(-1, 4).float()
        probs = torch.softmax(flat, dim=-1)
        ref = lm.moe_dpsl_coeff * dpsl_loss(probs, alpha, group_ids=ids, padding_mask=pad)
        with_pad = lm.moe_dpsl_coeff * dpsl_loss(probs, alpha, group_ids=ids)
        # fp32 on both sides, the same per-token terms: a few ulps
        torch.testing.assert_close(moe_tracked("dpsl_loss")[layer], ref, rtol=1e-5, atol=1e-7)
        assert abs(float(with_pad - ref)) > 1e-4  # the pad rows would have changed it
        z_ref = torch.logsumexp(flat, -1).square()[~pad].mean()
        torch.testing.assert_close(moe_tracked("z_loss")[layer], z_ref, rtol=1e-5, atol=1e-7)


def test_hook_equals_explicit_token_groups(fresh_moe_losses):
    """The automatic ids give the same output, losses and gradients as a hand-written context."""
    from megatron_dpsl import dpsl_token_groups
    from megatron_dpsl.parallel.token_groups import get_dpsl_token_groups

    torch.manual_seed(0)
    auto = _build()
    torch.manual_seed(0)
    manual = _build(token_groups=None)
    images, input_ids, tiles = _inputs()
    probe = _Probe(auto, mark=False)
    out_auto, _ = _forward(auto, images, input_ids, tiles, 15)
    assert get_dpsl_token_groups() is None  # set for the forward only
    loss_auto = moe_tracked("dpsl_loss").clone()
    out_auto.float().sum().backward()
    reset_moe_tracker()
    groups = probe.seen["groups"]
    with dpsl_token_groups(groups.group_ids, padding_mask=groups.padding_mask):
        out_manual, _ = _forward(manual, images, input_ids, tiles, 15)
        out_manual.float().sum().backward()
    assert torch.equal(out_auto, out_manual)
    assert torch.equal(moe_tracked("dpsl_loss"), loss_auto) and loss_auto.min() > 0
    grads = [
        (a.grad, b.grad)
        for a, b in zip(auto.parameters(), manual.parameters())
        if a.grad is not None
    ]
    assert grads and all(torch.equal(a, b) for a, b in grads)


def test_task_ids_split_text_and_leave_image_rows(fresh_moe_losses):
    from megatron_dpsl.models.llava_modality import ModalityGroups

    lm = _lm_config(
        moe_dpsl_alpha_base=None,
        moe_dpsl_alpha_shift=None,
        moe_dpsl_num_groups=None,
        moe_dpsl_group_alphas=[[1.25, 1.25, 0.75, 0.75], [0.75, 0.75, 1.25, 1.25], [1.0] * 4],
    )
    model = _build(lm, token_groups=ModalityGroups(vision=0, text=1, num_tasks=2))
    images, input_ids, tiles = _inputs()
    probe = _Probe(model)
    _forward(model, images, input_ids, tiles, 15, dpsl_task_ids=torch.tensor([1, 0, 1]))
    is_image, is_pad = probe.reference()
    expected = torch.tensor([2, 1, 2])[:, None].expand_as(is_image).clone()
    expected[is_image] = 0
    expected[is_pad] = 1
    assert torch.equal(probe.seen["groups"].group_ids, expected)


@pytest.mark.parametrize(
    "recompute",
    [
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        dict(recompute_granularity="selective", recompute_modules=["moe"]),
    ],
    ids=["full", "selective-moe"],
)
def test_recompute_gives_the_same_gradients(fresh_moe_losses, recompute):
    """The hook resets the ids after the forward; the replay in the backward reads what its
    checkpoint recorded (issue 21), so the DPSL gradient is the one without recompute."""
    from support.megatron_cpu import install_recompute_shims

    undo = install_recompute_shims()
    try:
        grads = {}
        for on in (False, True):
            torch.manual_seed(0)
            model = _build(_lm_config(**(recompute if on else {})))
            images, input_ids, tiles = _inputs()
            torch.manual_seed(1)
            images = torch.randn_like(images)
            out, _ = _forward(model, images, input_ids, tiles, 15)
            out.float().square().mean().backward()
            grads[on] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        # the same ops in the same order, replayed: bitwise equal up to fp32 reassociation in
        # autograd
        for a, b in zip(grads[False], grads[True], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    finally:
        undo()


@pytest.mark.parametrize(
    "tiles,num_tiles,match",
    [
        (
            [1, 1],
            2,
            r"input_ids hold 3 image tokens \(-200\) but 2 images are given",
        ),  # one missing
        ([2, 1, 1], 3, "images hold 3 tiles but num_image_tiles sums to 4"),
    ],
)
def test_image_count_that_does_not_match_image_tokens_is_refused(tiles, num_tiles, match):
    model = _build()
    _, input_ids, _ = _inputs()
    images = torch.randn(num_tiles, 3, IMG_SIZE, IMG_SIZE)
    with pytest.raises(ValueError, match=match):
        _forward(model, images, input_ids, torch.tensor(tiles, dtype=torch.int), 15)


def test_image_token_index_in_the_vocabulary_is_refused():
    with pytest.raises(
        ValueError, match=r"image_token_index=3 is a vocabulary id \(vocab_size=50\)"
    ):
        _build(image_token_index=3)
    model = _build()
    images, input_ids, tiles = _inputs()
    with pytest.raises(ValueError, match=r"image_token_index=7 is a vocabulary id"):
        _forward(model, images, input_ids, tiles, 15, image_token_index=7)


def test_modality_priors_without_a_vision_encoder_are_refused():
    from megatron_dpsl.models.vlm import build_llava_model

    with pytest.raises(
        ValueError, match="modality priors need a vision encoder: add_encoder=False"
    ):
        _build(add_encoder=False)
    with pytest.raises(ValueError, match="vision_config is None"):
        build_llava_model(_lm_config(), None, vocab_size=50, max_sequence_length=64)


def test_virtual_pipeline_chunks_are_refused():
    """Several model chunks (virtual pipeline stages): the ids follow one LLaVAModel per stage.
    Plain pipeline stages are tested against one stage in
    tests/distributed/test_llava_pipeline.py."""
    from megatron_dpsl.models.llava_token_groups import attach_llava_token_groups

    model = _build(token_groups=None)
    with pytest.raises(ValueError, match="one model chunk expected, got 2"):
        attach_llava_token_groups([model, model])


def test_te_specs_without_transformer_engine_name_the_fix():
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed: the TE specs build (tests/gpu)")
    with pytest.raises(ImportError, match="use_transformer_engine=True needs Transformer Engine"):
        _build(use_transformer_engine=True)


def test_group_count_and_dense_parts_are_checked():
    from megatron_dpsl.models.llava_modality import ModalityGroups
    from megatron_dpsl.models.vlm import build_llava_model, clip_vision_config

    with pytest.raises(
        ValueError, match="ModalityGroups give 3 groups but the language model's DPSL prior has 2"
    ):
        _build(token_groups=ModalityGroups(num_tasks=2))
    lm = _lm_config()
    vision = clip_vision_config(
        lm, hf_num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16
    )
    vision.num_moe_experts = 4
    with pytest.raises(ValueError, match="vision_config.num_moe_experts must be None"):
        build_llava_model(lm, vision, vocab_size=50, max_sequence_length=64)


def test_hook_finds_the_model_inside_ddp_and_task_ids_pass_through():
    """Megatron-LM calls the DDP-wrapped model (a one-chunk list); keywords reach the hook
    through it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dpsl.models.llava_modality import ModalityGroups
    from megatron_dpsl.models.llava_token_groups import attach_llava_token_groups

    lm = _lm_config(
        moe_dpsl_alpha_base=None,
        moe_dpsl_alpha_shift=None,
        moe_dpsl_num_groups=None,
        moe_dpsl_group_alphas=[[1.0] * 4] * 3,
    )
    llava = _build(lm, token_groups=None)
    ddp = DistributedDataParallel(lm, DistributedDataParallelConfig(), llava)
    handle = attach_llava_token_groups([ddp], ModalityGroups(num_tasks=2))
    probe = _Probe(llava)
    images, input_ids, tiles = _inputs()
    _forward(ddp, images, input_ids, tiles, 15, dpsl_task_ids=torch.tensor([0, 1, 0]))
    is_image, is_pad = probe.reference()
    ids = probe.seen["groups"].group_ids
    assert torch.equal(ids[1][~is_pad[1]], torch.full((5,), 2)) and torch.equal(
        ids[is_image], 0 * ids[is_image]
    )
    handle.remove()
    with pytest.raises(TypeError, match="dpsl_task_ids"):  # no hook: LLaVAModel itself refuses it
        _forward(ddp, images, input_ids, tiles, 15, dpsl_task_ids=torch.tensor([0, 1, 0]))


def test_text_padding_of_megatron_lm_get_batch_is_flagged():
    """pretrain_vlm's get_batch pads the text so the combined length divides the SP/CP factor and
    gives each sample's valid length in ``packed_seq_params`` (sbhd): those rows are padding."""
    from megatron.core.models.multimodal.context_parallel import get_packed_seq_params

    from megatron_dpsl.models.llava_token_groups import attach_llava_token_groups
    from megatron_dpsl.parallel.token_groups import get_dpsl_token_groups

    model = _build(token_groups=None)
    handle = attach_llava_token_groups(model)
    pad_text = 3  # what context_parallel.get_padding asked for, as zeros after the text
    input_ids = torch.tensor([[IMG, 5, 6, 7, 0, 0, 0], [IMG, 8, 9, 10, 0, 0, 0]])
    images = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    # get_batch's own call (img_seq_len there: image rows minus the image tokens)
    packed = get_packed_seq_params(input_ids, model.img_seq_len - 1, pad_text, cp_size=1)
    assert packed.qkv_format == "sbhd"
    handle.hook.before(model, (images, input_ids, None, None), {"packed_seq_params": packed})
    groups = get_dpsl_token_groups()
    handle.hook.after(model, None, None)
    combined = 7 + model.img_seq_len - 1
    expected_pad = torch.zeros(2, combined, dtype=torch.bool)
    expected_pad[:, combined - pad_text :] = True
    assert torch.equal(groups.padding_mask, expected_pad)
    expected_ids = torch.ones(2, combined, dtype=torch.long)
    expected_ids[:, : model.img_seq_len] = 0
    assert torch.equal(groups.group_ids, expected_ids)


def test_forwards_the_ids_cannot_describe_are_refused():
    from megatron.core.packed_seq_params import PackedSeqParams

    model = _build()
    images, input_ids, tiles = _inputs()
    with pytest.raises(ValueError, match="this forward got no input_ids"):
        model(images, None, None, None, num_image_tiles=tiles)
    model.context_parallel_lm = 2  # as a CP=2 model has it (building one needs TE)
    thd = PackedSeqParams(qkv_format="thd")
    with pytest.raises(ValueError, match="THD .* with context parallelism are not followed"):
        _forward(model, images, input_ids, tiles, 15, packed_seq_params=thd)


def _switch_loss(logits, topk=2):
    """Switch Transformer's load-balancing loss without its coefficient, ``[N, E]`` logits:
    E / (k N^2) * sum_e (sum_t p_te) * (tokens routed to e)."""
    probs = torch.softmax(logits, dim=-1)
    routed = torch.zeros_like(probs).scatter(1, probs.topk(topk, dim=-1).indices, 1.0)
    n, experts = probs.shape
    return experts / (topk * n * n) * (probs.sum(0) * routed.sum(0)).sum()


def test_megatron_load_balancing_loss_leaves_pad_rows_out(fresh_moe_losses):
    """Without DPSL the padding flags still reach Megatron's own aux loss (Switch balancing)."""
    lm = _lm_config(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2)
    model = _build(lm)
    images, input_ids, tiles = _inputs()
    probe = _Probe(model)
    logits = _capture_logits(model)
    _forward(model, images, input_ids, tiles, 15)
    _, is_pad = probe.reference()
    pad = is_pad.T.reshape(-1)  # s-major, as the router flattens
    for layer, layer_logits in enumerate(logits):
        flat = layer_logits.reshape(-1, 4).float()
        ref = _switch_loss(flat[~pad])
        tracked = moe_tracked("load_balancing_loss")[layer]
        # fp32 sums of the same terms in another order: a few ulps
        torch.testing.assert_close(tracked, ref, rtol=1e-5, atol=1e-7)
        assert abs(float(_switch_loss(flat) - ref)) > 1e-4  # the pad rows would have changed it


def test_llava15_choices_and_dense_vision_parts():
    """CLIP cut at its penultimate layer, bidirectional ViT attention, class token dropped, a
    norm-free two-layer GELU projector; DPSL routers in the language model only."""
    import torch.nn.functional as F
    from megatron.core.activations import quick_gelu
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.router import TopKRouter

    model = _build()  # clip_vision_config(hf_num_layers=2): HF's hidden_states[-2] is layer 1's
    vit = model.vision_model
    assert len(vit.decoder.layers) == 1 and vit.config.activation_func is quick_gelu
    assert vit.decoder.layers[0].self_attention.attn_mask_type == AttnMaskType.no_mask
    assert model.img_seq_len == (IMG_SIZE // PATCH) ** 2  # no class-token row
    projector = model.vision_projection.encoder
    assert type(projector) is MLP and projector.config.activation_func is F.gelu
    assert projector.linear_fc1.weight.shape == (16, 8) and projector.linear_fc2.weight.shape == (
        16,
        16,
    )
    assert not any("norm" in type(m).__name__.lower() for m in model.vision_projection.modules())
    routers = [type(m).__name__ for m in model.modules() if isinstance(m, TopKRouter)]
    lm_routers = [m for m in model.language_model.modules() if isinstance(m, TopKRouter)]
    assert routers == ["DPSLRouter", "DPSLRouter"] and len(lm_routers) == 2
