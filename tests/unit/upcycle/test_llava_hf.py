"""Hugging Face LLaVA input: a tiny random ``LlavaForConditionalGeneration`` built locally with
transformers (nothing downloaded), CLIP tower + projector + Llama or Qwen2 language model, converted
with ``--weight-scaling exact`` and loaded into a stock Megatron-Core ``LLaVAModel``: logits for
prompts with an image equal HF's, the vision tensors are HF's bit for bit, and without the exact
scaling the logits move (negative control)."""

import os

import pytest
import torch
from support.llava import IMAGE_TOKEN, build_llava, build_plugin_llava, llava_logits
from support.upcycle import load_megatron_lm

transformers = pytest.importorskip("transformers")

# fp32 on CPU, HF eager attention vs Megatron's local core attention, two LayerNorm/RMSNorm/RoPE
# implementations; VLM_NOTES §7 measured 4.4e-6 on logits of magnitude ~4 for this mapping, so
# 1e-4 (the bar) leaves a 20x margin while a wrong head order, CLS row or activation moves
# logits by >1e-2 (quick_gelu vs gelu alone: ~4e-2).
HF_ATOL = 1e-4
HF_IMAGE_TOKEN = 95  # the last id of the 96-token vocabulary
PATCHES = 4  # 16x16 images in 8x8 patches
ROWS = {"default": PATCHES, "full": PATCHES + 1}  # image rows per image: class token dropped/kept
TEXT = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
LLAMA3 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)  # fmt: skip
# the paper's language models (seed Sec. 3): Llama (LLaVA-1.5's Vicuna), Qwen2 (tied, q/k/v biases),
# Llama-3.2 (tied, llama3 RoPE factor 32), Phi-3 (fused qkv_proj / gate_up_proj)
LANGUAGE_MODELS = {
    "llama": lambda: transformers.LlamaConfig(**TEXT, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**TEXT, tie_word_embeddings=True),
    "llama3.2": lambda: transformers.LlamaConfig(
        **{**TEXT, "max_position_embeddings": 131072},
        rope_scaling=LLAMA3,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),  # fmt: skip
    "phi3": lambda: transformers.Phi3Config(
        **TEXT, tie_word_embeddings=False, pad_token_id=90, eos_token_id=91, bos_token_id=92
    ),
}


def _tiny_hf_llava(kind, path, strategy="default"):
    torch.manual_seed(sum(map(ord, kind)))
    text_cfg = LANGUAGE_MODELS[kind]()
    vision = transformers.CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    cfg = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text_cfg,
        image_token_index=HF_IMAGE_TOKEN,
        image_seq_length=ROWS[strategy],
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=text_cfg.tie_word_embeddings,
    )
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with (
        torch.no_grad()
    ):  # O(1) random weights and biases, norms around one: any mapping error shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _prompts(rows=PATCHES):
    """Megatron's input (one -200 per image) and HF's (the image token repeated per patch row)."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 90, (2, 10), generator=g)
    tokens[0, 3] = IMAGE_TOKEN
    tokens[1, 0] = IMAGE_TOKEN
    rows = [
        torch.cat(
            [torch.full((rows,), HF_IMAGE_TOKEN) if t == IMAGE_TOKEN else t.view(1) for t in row]
        )
        for row in tokens
    ]
    return torch.randn(2, 3, 16, 16, generator=g), tokens, torch.stack(rows)


@pytest.fixture(scope="module")
def megatron():
    from support.megatron_cpu import init_single_process

    init_single_process()


def _load(path):
    args = torch.load(os.path.join(path, "release", "common.pt"), weights_only=False)["args"]
    model = build_llava(args)
    load_megatron_lm(model, str(path))
    return model


def _expected_vision(hf) -> dict[str, torch.Tensor]:
    """The Megatron ViT and projector tensors the mapping must produce, from HF's modules."""
    tower, proj = hf.model.vision_tower, hf.model.multi_modal_projector
    tower = getattr(tower, "vision_model", tower)  # transformers < 5 nests the CLIP transformer
    emb = tower.embeddings
    out = {
        "vision_model.class_token": emb.class_embedding.view(1, 1, -1),
        "vision_model.conv1.weight": emb.patch_embedding.weight,
        "vision_model.position_embeddings.weight": emb.position_embedding.weight,
        "vision_model.ln_pre.weight": tower.pre_layrnorm.weight,
        "vision_model.ln_pre.bias": tower.pre_layrnorm.bias,
    }
    for i, layer in enumerate(tower.encoder.layers[:2]):  # vision_feature_layer -2 of 3 layers
        p, a = f"vision_model.decoder.layers.{i}.", layer.self_attn
        for kind in ("weight", "bias"):
            q, k, v = (getattr(getattr(a, f"{n}_proj"), kind).view(4, 6, -1) for n in "qkv")
            out[p + f"self_attention.linear_qkv.{kind}"] = (
                torch.cat([q, k, v], 1).reshape(72, -1).squeeze(-1)
            )
            out[p + f"self_attention.linear_proj.{kind}"] = getattr(a.out_proj, kind)
            out[p + f"input_layernorm.{kind}"] = getattr(layer.layer_norm1, kind)
            out[p + f"pre_mlp_layernorm.{kind}"] = getattr(layer.layer_norm2, kind)
            out[p + f"mlp.linear_fc1.{kind}"] = getattr(layer.mlp.fc1, kind)
            out[p + f"mlp.linear_fc2.{kind}"] = getattr(layer.mlp.fc2, kind)
            out[f"vision_projection.encoder.linear_fc1.{kind}"] = getattr(proj.linear_1, kind)
            out[f"vision_projection.encoder.linear_fc2.{kind}"] = getattr(proj.linear_2, kind)
    return out


@pytest.mark.parametrize(
    "kind,strategy",
    [("llama", "default"), ("qwen2", "default"), ("llama3.2", "default"), ("phi3", "default"),
     ("llama", "full")],
)  # fmt: skip
def test_hf_llava_exact_upcycling_matches_hf_logits(megatron, tmp_path, kind, strategy):
    """``strategy``: HF's vision_feature_select_strategy; ``full`` keeps the class token's row."""
    from megatron_dpsl.upcycle import upcycle

    hf = _tiny_hf_llava(kind, tmp_path / "hf", strategy)
    images, tokens, hf_ids = _prompts(ROWS[strategy])
    with torch.no_grad():
        ref = hf(input_ids=hf_ids, pixel_values=images).logits.float()
    assert ref.abs().max() > 1  # O(1) logits: a mapping error cannot hide under the tolerance
    upcycle(
        tmp_path / "hf",
        tmp_path / "moe",
        num_experts=8,
        granularity=2,
        moe_router_topk=4,
        weight_scaling="exact",
        progress=False,
    )
    moe = _load(tmp_path / "moe")
    assert type(moe.language_model.decoder.layers[0].mlp).__name__ == "MoELayer"
    assert (llava_logits(moe, images, tokens) - ref).abs().max().item() <= HF_ATOL
    args = torch.load(tmp_path / "moe" / "release" / "common.pt", weights_only=False)["args"]
    plugin = build_plugin_llava(args)  # the plugin's builder (DPSLRouter) reads the output too
    load_megatron_lm(plugin, str(tmp_path / "moe"))
    assert (llava_logits(plugin, images, tokens) - ref).abs().max().item() <= HF_ATOL
    state = moe.state_dict()
    for key, want in _expected_vision(hf).items():
        assert torch.equal(state[key], want), key

    upcycle(
        tmp_path / "hf",
        tmp_path / "off",
        num_experts=8,
        granularity=2,
        moe_router_topk=4,
        progress=False,
    )
    assert (llava_logits(_load(tmp_path / "off"), images, tokens) - ref).abs().max().item() > 1e-2


def _edit(src, dst, config=None, drop=(), rename=()):
    """A copy of the HF directory ``src`` with ``config`` merged into config.json, the tensors
    whose names start with one of ``drop`` removed, and ``rename``'s ``(old, new)`` name prefixes
    replaced."""
    import json

    from safetensors.torch import load_file, save_file

    def renamed(name):
        for old, new in rename:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(src / "model.safetensors")
    kept = {renamed(k): v for k, v in tensors.items() if not k.startswith(drop)}
    save_file(kept, dst / "model.safetensors")
    return dst


# the key layouts a LLaVA directory may use besides transformers 5's save_pretrained
LAYOUTS = {
    # the Hub's llava-hf checkpoints (transformers 4.x): the CLIP transformer nested once more
    "hub": (("vision_tower.", "vision_tower.vision_model."),),
    # transformers 5's in-memory names
    "model.": (
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hf_llava_key_layouts(megatron, tmp_path, layout):
    """The same LLaVA under another key layout converts to the same checkpoint: HF's logits."""
    from megatron_dpsl.upcycle import upcycle

    hf = _tiny_hf_llava("llama", tmp_path / "hf")
    images, tokens, hf_ids = _prompts()
    with torch.no_grad():
        ref = hf(input_ids=hf_ids, pixel_values=images).logits.float()
    src = _edit(tmp_path / "hf", tmp_path / layout, rename=LAYOUTS[layout])
    upcycle(src, tmp_path / "moe", num_experts=4, moe_router_topk=2, weight_scaling="exact",
            progress=False)  # fmt: skip
    assert (
        llava_logits(_load(tmp_path / "moe"), images, tokens) - ref
    ).abs().max().item() <= HF_ATOL


def test_bad_hf_llavas_are_refused(tmp_path, capsys):
    """One-line errors naming the cause (and the flag); nothing written."""
    from megatron_dpsl.upcycle import UpcycleError, upcycle
    from megatron_dpsl.upcycle.cli import main

    _tiny_hf_llava("llama", tmp_path / "hf")
    hf = tmp_path / "hf"
    cases = [
        (
            _edit(hf, tmp_path / "no_tower", drop=("vision_tower.",)),
            {},
            "a LLaVA without a vision tower",
        ),
        (
            _edit(hf, tmp_path / "no_proj", drop=("multi_modal_projector.",)),
            {},
            "without a multi_modal_projector",
        ),
        (
            _edit(hf, tmp_path / "layers", {"vision_feature_layer": [-2, -1]}),
            {},
            "vision_feature_layer=\\[-2, -1\\]",
        ),
        (
            _edit(hf, tmp_path / "act", {"projector_hidden_act": "relu"}),
            {},
            "projector_hidden_act 'relu'",
        ),
        (hf, {"img_h": 32, "img_w": 32}, "--img-h 32 contradicts the checkpoint \\(img_h=16\\)"),
        (
            hf,
            {"disable_vision_class_token": False},
            "--disable-vision-class-token False contradicts",
        ),
        (
            hf,
            {"encoder_num_layers": 3},
            "--encoder-num-layers 3 contradicts the checkpoint \\(encoder_num_layers=2\\)",
        ),
    ]
    for src, flags, match in cases:
        with pytest.raises(UpcycleError, match=match):
            upcycle(src, tmp_path / "out", num_experts=4, progress=False, **flags)
        assert not (tmp_path / "out").exists()
    capsys.readouterr()  # transformers' save_pretrained progress bar
    assert (
        main(
            [
                "--source",
                str(tmp_path / "no_tower"),
                "--output",
                str(tmp_path / "out"),
                "--num-experts",
                "4",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "without a vision tower" in err and len(err.splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if "out" in p.name]


def test_megatron_lm_flags_of_a_llava():
    """The vision flags a LLaVA output's args give, all of them not restored by
    --use-checkpoint-args; --vision-model-type clip only for CLIP ViT-L/14's widths."""
    import argparse

    from megatron_dpsl.upcycle.flags import _vision_flags, not_restored

    vision = dict(encoder_num_layers=23, img_h=336, img_w=336, patch_dim=14,
                  disable_vision_class_token=True, vision_model_type="clip")  # fmt: skip
    clip_l = argparse.Namespace(**vision, vision_hidden_size=1024, vision_ffn_hidden_size=4096,
                                vision_num_attention_heads=16)  # fmt: skip
    flags = _vision_flags(clip_l)
    assert " ".join(flags) == (
        "--encoder-num-layers 23 --img-h 336 --img-w 336 --patch-dim 14 "
        "--disable-vision-class-token --vision-model-type clip"
    )
    assert not_restored(flags) == flags
    tiny = argparse.Namespace(**{**vars(clip_l), "vision_hidden_size": 24})
    assert "--vision-model-type" not in _vision_flags(tiny)
    # a GPT saved by Megatron-LM: its namespace has encoder_num_layers, img_h, patch_dim too
    gpt = argparse.Namespace(num_layers=2, encoder_num_layers=2, img_h=224, img_w=224, patch_dim=16)
    assert _vision_flags(gpt) == []
