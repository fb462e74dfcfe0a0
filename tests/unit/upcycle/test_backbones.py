"""The paper's three backbones (Qwen2-1.5B, Phi-3-mini, Llama-3.2-1B; seed Sec. 3) upcycle exactly.

Each family as a tiny random ``transformers`` model (every dimension distinct, head_dim != hidden /
heads, RMSNorm weights != 1, O(1) logits), converted by the CLI with ``--weight-scaling exact`` at
2in4 (E4 G1 k2) and 8in16 (E16 G4 k8), loaded into a stock Megatron-Core ``GPTModel`` built from the
checkpoint's args through ``dist_checkpointing``: logits equal HF's fp32 ones. Llama runs a
sequence past the llama3 rule's knee (2048 positions = original_max_position_embeddings /
high_freq_factor: dimensions of longer wavelength are rescaled), where the rescaled dimensions
turn by radians; Phi-3 runs exactly its sliding window (the longest sequence on which Megatron,
which attends to the whole context, computes what HF computes). Negative controls:
``--weight-scaling none``, and for Llama Megatron without the rope scaling or with Megatron-LM's
default factor 8 (what a stock Megatron-LM run builds, gpt_builders passing no factor).
"""

from __future__ import annotations

import pytest
import torch
from support.upcycle import build_gpt, gpt_logits, load_megatron_lm

transformers = pytest.importorskip("transformers")

SEQ = {"llama": 2112, "qwen2": 384, "phi3": 320}  # llama: past the llama3 knee at 2048
# fp32 on CPU, HF's SDPA attention vs Megatron's local softmax attention over up to 2112 keys and
# two RMSNorm/RoPE implementations: measured <= 9e-6 (|logits| <= 5.4); a wrong head order, gate/up
# swap, RoPE factor or missing scale moves logits by > 1e-2.
ATOL = 1e-4
COMMON = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    initializer_range=0.15,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
FAMILIES = {
    # Llama-3.2-1B: tied embeddings, llama3 RoPE (factor 32), theta 500000
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **COMMON,
            rope_scaling=LLAMA3,
            rope_theta=500000.0,
            max_position_embeddings=131072,
            tie_word_embeddings=True,
        )
    ),
    # Qwen2-1.5B: tied embeddings, q/k/v biases, theta 1e6
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            **COMMON, rope_theta=1e6, max_position_embeddings=131072, tie_word_embeddings=True
        )
    ),
    # Phi-3-mini-4k: fused qkv_proj and gate_up_proj, untied, a sliding window the sequence fits in
    "phi3": lambda: transformers.Phi3ForCausalLM(
        transformers.Phi3Config(
            **COMMON,
            max_position_embeddings=4096,
            sliding_window=SEQ["phi3"],
            pad_token_id=100,
            eos_token_id=99,
            bos_token_id=1,
        )
    ),
}
SHAPES = {"2in4": ("4", "1", "2"), "8in16": ("16", "4", "8")}


@pytest.fixture(scope="module")
def megatron():
    from support.megatron_cpu import init_single_process

    init_single_process()


def _tiny_hf(family: str, path):
    torch.manual_seed(sum(map(ord, family)))
    model = FAMILIES[family]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # norms != 1, so a missing or swapped norm shows
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("proj.bias"):  # HF initialises Qwen2's q/k/v biases to zero
                p.normal_(std=0.3)
    model.eval()
    model.save_pretrained(path)
    return model


def _convert(src, dst, shape: str, scaling: str, *extra: str) -> int:
    from megatron_dpsl.upcycle.cli import main

    E, G, k = SHAPES[shape]
    argv = [
        "--source",
        str(src),
        "--output",
        str(dst),
        "--num-experts",
        E,
        "--granularity",
        G,
        "--moe-router-topk",
        k,
        "--weight-scaling",
        scaling,
        "--no-progress",
        *extra,
    ]
    return main(argv)


def _megatron_logits(ckpt, tokens, **rope):
    args = torch.load(ckpt / "release" / "common.pt", weights_only=False)["args"]
    for name, value in rope.items():
        setattr(args, name, value)
    model = build_gpt(args)
    load_megatron_lm(model, str(ckpt))
    return gpt_logits(model, tokens), args


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_backbone_upcycles_exactly(megatron, tmp_path, family):
    hf = _tiny_hf(family, tmp_path / "hf")
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, COMMON["vocab_size"], (1, SEQ[family]), generator=gen)
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    report = {}
    for shape in SHAPES:
        assert _convert(tmp_path / "hf", tmp_path / shape, shape, "exact") == 0
        logits, args = _megatron_logits(tmp_path / shape, tokens)
        report[shape] = (logits - ref).abs().max().item()
    assert _convert(tmp_path / "hf", tmp_path / "none", "8in16", "none") == 0
    report["none"] = (_megatron_logits(tmp_path / "none", tokens)[0] - ref).abs().max().item()
    assert args.seq_length == (SEQ["phi3"] if family == "phi3" else 131072)
    if family == "phi3":  # one token past the window: Megatron would attend to a key HF masks
        too_long = str(SEQ["phi3"] + 1)
        assert (
            _convert(tmp_path / "hf", tmp_path / "long", "2in4", "exact", "--seq-length", too_long)
            == 2
        )
    if family == "llama":  # the scaling matters at this length: without it, or with factor 8
        assert args.use_rope_scaling and args.rope_scaling_factor == 32.0
        for name, rope in {
            "unscaled": dict(use_rope_scaling=False),
            "factor 8": dict(rope_scaling_factor=8.0),
        }.items():
            report[name] = (
                (_megatron_logits(tmp_path / "2in4", tokens, **rope)[0] - ref).abs().max().item()
            )
    print(
        f"{family}: |logits| <= {ref.abs().max():.2f}; max |dlogit| "
        + ", ".join(f"{k} {v:.2e}" for k, v in report.items())
    )
    assert report["2in4"] <= ATOL and report["8in16"] <= ATOL
    assert all(v > 100 * ATOL for k, v in report.items() if k not in SHAPES)
