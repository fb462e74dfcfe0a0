"""HF Llama / Qwen2 input: tiny random models built locally with transformers (nothing downloaded);
converted Megatron GPTModel logits must match the HF model's, dense and after exact upcycling."""

import sys

import pytest
import torch
from support.common import child_env
from support.upcycle import build_gpt, gpt_logits, load_megatron_lm

transformers = pytest.importorskip("transformers")

# fp32 on CPU, two attention implementations (HF eager vs Megatron's local core attention) and two
# RMSNorm/RoPE implementations: measured ~1e-6 on logits of magnitude ~0.5; 1e-5 keeps a 10x margin
# while a mis-ordered head, gate/up swap or RoPE convention error moves logits by >1e-2.
HF_ATOL = 1e-5


@pytest.fixture(scope="module")
def megatron():
    from support.megatron_cpu import init_single_process

    init_single_process()


def _tiny_hf(kind, path):
    torch.manual_seed({"llama": 0, "qwen2": 1}[kind])
    common = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        initializer_range=0.15,
    )  # large enough that any mapping error shows
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
        for (
            name,
            p,
        ) in model.named_parameters():  # random q/k/v biases (HF initialises them to zero)
            if name.endswith("proj.bias"):
                torch.nn.init.normal_(p, std=0.1)
    model.eval()
    model.save_pretrained(path)
    return model


TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_dense_round_trip_and_exact_upcycling(megatron, tmp_path, kind):
    from megatron_dpsl.upcycle import convert_dense, upcycle

    hf = _tiny_hf(kind, tmp_path / "hf")
    with torch.no_grad():
        ref = hf(TOKENS).logits.float()
    convert_dense(tmp_path / "hf", tmp_path / "dense", progress=False)
    args = torch.load(tmp_path / "dense" / "release" / "common.pt", weights_only=False)["args"]
    dense = build_gpt(args)
    load_megatron_lm(dense, str(tmp_path / "dense"))
    d_dense = (gpt_logits(dense, TOKENS) - ref).abs().max().item()

    upcycle(
        tmp_path / "hf",
        tmp_path / "moe",
        num_experts=8,
        granularity=2,
        moe_router_topk=4,
        weight_scaling="exact",
        progress=False,
    )
    margs = torch.load(tmp_path / "moe" / "release" / "common.pt", weights_only=False)["args"]
    moe = build_gpt(margs)
    load_megatron_lm(moe, str(tmp_path / "moe"))
    d_moe = (gpt_logits(moe, TOKENS) - ref).abs().max().item()
    print(
        f"{kind}: dense round trip {d_dense:.3e}, exact G=2 upcycle {d_moe:.3e} (|logits| max "
        f"{ref.abs().max():.2f})"
    )
    assert d_dense <= HF_ATOL and d_moe <= HF_ATOL


def test_hf_errors(tmp_path):
    import json

    from megatron_dpsl.upcycle import UpcycleError, upcycle

    _tiny_hf("llama", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["hidden_act"] = "relu"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UpcycleError, match="unknown activation"):
        upcycle(tmp_path / "hf", tmp_path / "o", num_experts=4, progress=False)
    cfg["hidden_act"], cfg["model_type"] = "silu", "mixtral"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UpcycleError, match="model_type 'mixtral'"):
        upcycle(tmp_path / "hf", tmp_path / "o", num_experts=4, progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_cpu_loading_recipe_of_the_docs(tmp_path, kind):
    """docs/upcycling.md's CPU recipe as a user runs it: the CLI, then examples/load_upcycled_cpu.py
    (megatron-core builds the MoE from the checkpoint's args, loads it strictly, compares with
    HF)."""
    import re
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    _tiny_hf(kind, tmp_path / "hf")
    env = child_env()

    def run(*cmd):
        return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)

    from megatron_dpsl.upcycle.cli import main

    assert (
        main(
            [
                "--source",
                str(tmp_path / "hf"),
                "--output",
                str(tmp_path / "moe"),
                "--num-experts",
                "8",
                "--granularity",
                "2",
                "--moe-router-topk",
                "4",
                "--weight-scaling",
                "exact",
                "--no-progress",
            ]
        )
        == 0
    )
    load = run(
        str(repo / "examples" / "load_upcycled_cpu.py"),
        "--load",
        str(tmp_path / "moe"),
        "--compare-hf",
        str(tmp_path / "hf"),
    )
    assert load.returncode == 0, load.stderr[-3000:]
    print(load.stdout)
    assert re.search(
        r"\(strict\): \d+ parameters, 8 experts, top-4; logits \[2, 16, 96\], finite: True",
        load.stdout,
    )
    diff = float(re.search(r"max \|logit diff\| vs .*: (\S+)", load.stdout).group(1))
    assert diff <= HF_ATOL
