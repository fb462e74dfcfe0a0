"""The paper's three backbones at their published shapes, without weights: the converter's dry run
reports the exact parameter counts of 2in4 and 8in16 and the memory the conversion needs, and
those counts equal a Megatron-Core ``GPTModel`` built on the meta device from the Megatron-LM
flags the dry run prints, parsed by Megatron-LM's own ``parse_args`` + ``validate_args`` and
turned into a config by its ``core_transformer_config_from_args`` (the tag matching the installed
megatron-core).

The configs below are the published ``config.json`` files (Hugging Face, Nov 2026), written here
as JSON; nothing is downloaded. The safetensors files are sparse: a real header naming every
tensor with its shape and bf16 dtype, and a data section of zeros the filesystem does not store
(the dry run reads shapes only). The dense counts equal the models' published sizes.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support.common import child_env
from support.megatron_lm_tree import (
    export_tree,
    import_training,
    source_or_skip,
    tag_for_installed_core,
)

PUBLISHED = {
    "Qwen2-1.5B": """{"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536,
        "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 131072,
        "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 12,
        "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": true,
        "use_sliding_window": false, "vocab_size": 151936}""",
    "Phi-3-mini-4k": """{"architectures": ["Phi3ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000,
        "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
        "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "phi3",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0,
        "sliding_window": 2047, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.2", "use_cache": true, "vocab_size": 32064}""",
    "Llama-3.2-1B": """{"architectures": ["LlamaForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": false,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0,
        "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256}""",
}
# The models' published parameter counts (their model cards; embeddings counted once when tied)
DENSE = {"Qwen2-1.5B": 1_543_714_304, "Phi-3-mini-4k": 3_821_079_552, "Llama-3.2-1B": 1_235_814_400}
SHAPES = {
    "2in4": ["--num-experts", "4", "--moe-router-topk", "2"],
    "8in16": ["--num-experts", "16", "--granularity", "4", "--moe-router-topk", "8"],
}
TREES = ("megatron/training", "megatron/legacy", "megatron/rl")


def _sparse_checkpoint(name: str, root: Path) -> Path:
    """config.json + one sparse bf16 safetensors file holding every tensor the config implies."""
    from megatron_dpsl.upcycle.hf import layer_tensor_shapes
    from megatron_dpsl.upcycle.hf_config import parse_text_config

    cfg = json.loads(PUBLISHED[name])
    c = parse_text_config(cfg)
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tied:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        shapes.update({f"model.layers.{i}.{n}": s for n, s in layer_tensor_shapes(c).items()})
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch_numel(shape))
        header[key] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(cfg))
    with open(root / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        handle.truncate(8 + len(blob) + offset)  # sparse: zeros, not stored
    return root


def torch_numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _number(table: str, row: str) -> int:
    return int(
        re.search(rf"{re.escape(row)}\s*\| .*?\(([\d,]+)\)", table).group(1).replace(",", "")
    )


def _embedding_numel(text: str) -> int:
    rows, cols = re.search(r"embedding.word_embeddings.weight  \[(\d+), (\d+)\]", text).groups()
    return int(rows) * int(cols)


@pytest.fixture(scope="module")
def dry_runs():
    """{model: {shape: {"counts": {...}, "flags": [...]}}} from the CLI's dry run."""
    from megatron_dpsl.upcycle.cli import main

    out = {}
    with tempfile.TemporaryDirectory(prefix="dpsl-test-backbone-shapes-") as d:
        for name in PUBLISHED:
            src = _sparse_checkpoint(name, Path(d) / name)
            out[name] = {}
            for shape, flags in SHAPES.items():
                text = io.StringIO()
                with contextlib.redirect_stdout(text):
                    assert main(["--source", str(src), "--dry-run", *flags]) == 0
                text = text.getvalue()
                flags_line = text.split("Megatron-LM flags of this model:\n", 1)[1].splitlines()[0]
                out[name][shape] = {
                    "dense": _number(text, "params dense"),
                    "moe": _number(text, "params MoE (total)"),
                    "active": _number(text, "params MoE (active/token)"),
                    "dense_embedding": _embedding_numel(text),
                    "flags": flags_line.split(),
                    "table": text,
                }
    return out


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_dense_counts_are_the_published_sizes(dry_runs, name):
    assert {s: r["dense"] for s, r in dry_runs[name].items()} == {s: DENSE[name] for s in SHAPES}


@pytest.fixture(scope="module")
def megatron_counts(dry_runs):
    """Parameters of GPTModels built on the meta device from the printed flags (Megatron-LM's
    parser and config builder, in a child process)."""
    tag = tag_for_installed_core()
    git_dir = source_or_skip(tag)
    pytest.importorskip("six", reason="Megatron-LM's megatron/training imports six")
    with tempfile.TemporaryDirectory(prefix="dpsl-test-backbone-meta-") as d:
        root = export_tree(tag, Path(d) / "Megatron-LM", git_dir, paths=TREES)
        flags = {f"{n}/{s}": r["flags"] for n, runs in dry_runs.items() for s, r in runs.items()}
        (Path(d) / "flags.json").write_text(json.dumps(flags))
        proc = subprocess.run(
            [sys.executable, __file__, str(root), d],
            capture_output=True,
            text=True,
            env=child_env(PYTHONWARNINGS="ignore"),
            timeout=600,
        )
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return json.loads((Path(d) / "counts.json").read_text())


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_moe_counts_equal_megatron_models_from_the_printed_flags(
    dry_runs, megatron_counts, name, shape
):
    run = dry_runs[name][shape]
    print(f"{name} {shape}: MoE {run['moe']:,} params, active {run['active']:,}")
    assert megatron_counts[f"{name}/{shape}"] == run["moe"]
    assert run["moe"] > run["dense"] > run["active"] // 2  # a real expansion, not a copy
    memory = re.search(r"memory to convert\s*\| about ([\d.]+) (MiB|GiB)", run["table"])
    needed = float(memory.group(1)) * 2 ** {"MiB": 20, "GiB": 30}[memory.group(2)]
    embedding = 2 * run["dense_embedding"]  # bf16 bytes of the largest single tensor
    assert 4 * embedding < needed < 2 * run["dense"]  # above 4 copies of it, below the model


def test_the_printed_flags_carry_each_family(dry_runs):
    llama, phi3, qwen = (
        dry_runs[n]["2in4"]["flags"] for n in ("Llama-3.2-1B", "Phi-3-mini-4k", "Qwen2-1.5B")
    )
    assert " ".join(llama).count("--use-rope-scaling --rope-scaling-factor 32") == 1
    assert "--untie-embeddings-and-output-weights" not in llama + qwen
    assert "--untie-embeddings-and-output-weights" in phi3 and "--add-qkv-bias" in qwen
    assert phi3[phi3.index("--seq-length") + 1] == "2047"  # Phi-3's sliding window


# ------------------------------------------------------------------------------------------- child


def _child(root: str, work: Path) -> dict:
    """Megatron-LM's parse_args + validate_args + core_transformer_config_from_args on each flag
    set, and a GPTModel (local spec) built from it on the meta device."""
    import torch

    arguments, _, _ = import_training(root)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from support.megatron_cpu import init_single_process

    init_single_process()
    counts = {}
    for case, flags in json.loads((work / "flags.json").read_text()).items():
        divisor = int(flags[flags.index("--make-vocab-size-divisible-by") + 1])
        sys.argv = [
            "pretrain_gpt.py",
            *flags,
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "8",
            "--lr",
            "1e-4",
            "--train-iters",
            "1",
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "1",
            "--transformer-impl",
            "local",
            "--no-persist-layer-norm",
            "--use-cpu-initialization",
            "--no-gradient-accumulation-fusion",
            "--no-rope-fusion",
            "--no-masked-softmax-fusion",
            "--no-bias-swiglu-fusion",
        ]
        args = arguments.parse_args()
        with contextlib.redirect_stdout(io.StringIO()):
            arguments.validate_args(args)
        config = arguments.core_transformer_config_from_args(args)
        config.perform_initialization = False
        # the embedding rows the checkpoint holds, a multiple of the printed divisor (what the
        # tokenizer build pads a vocabulary of that size to)
        vocab = json.loads(PUBLISHED[case.split("/")[0]])["vocab_size"]
        assert vocab % divisor == 0
        with torch.device("meta"):
            model = GPTModel(
                config=config,
                transformer_layer_spec=get_gpt_decoder_block_spec(
                    config, use_transformer_engine=False, normalization=args.normalization
                ),
                vocab_size=vocab,
                max_sequence_length=args.max_position_embeddings,
                share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                position_embedding_type=args.position_embedding_type,
                rotary_base=args.rotary_base,
                rope_scaling=args.use_rope_scaling,
                rope_scaling_factor=args.rope_scaling_factor,
            )
        counts[case] = sum(p.numel() for p in model.parameters())
    return counts


if __name__ == "__main__":
    megatron_lm_root, work_dir = sys.argv[1], Path(sys.argv[2])
    (work_dir / "counts.json").write_text(json.dumps(_child(megatron_lm_root, work_dir)))
