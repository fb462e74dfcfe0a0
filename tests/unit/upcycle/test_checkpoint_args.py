"""Upcycled checkpoints against Megatron-LM's own argument checks, on CPU, without ``--finetune``.

Megatron-LM compares a checkpoint's ``args`` with the run's flags on every ``--load`` that lacks
``--finetune`` (``check_checkpoint_args``) and copies them under ``--use-checkpoint-args``
(``load_args_from_checkpoint``), both in ``megatron/training/checkpointing.py``. This test runs
those functions of the Megatron-LM tag that matches the installed megatron-core (core_v0.16.1
with 0.16, core_v0.19.0 with 0.19; CI runs a leg for each), exported from ``$MEGATRON_LM_GIT_DIR``
or from the committed snapshot (``megatron_lm_tree.py``), against namespaces that the tag's own
``parse_args`` + ``validate_args`` make
from a Llama-style MoE command line (the flags of Megatron-LM's Mixtral example:
``--position-embedding-type rope --no-position-embedding --normalization RMSNorm --swiglu
--untie-embeddings-and-output-weights --disable-bias-linear --group-query-attention ...``), for
four conversions: Hugging Face Llama (untied, GQA), Hugging Face Qwen2 (tied, q/k/v bias), a
``torch_dist`` checkpoint saved with args from Megatron-LM's own parser, and a ``torch_dist``
checkpoint whose args lack most fields (as tools other than Megatron-LM write them).

Replaced leaves, each in the child below: ``megatron/training/__init__.py`` is not run (it imports
``initialize.py``, which needs the GPU-only Triton stack); the few names its submodules import
from it are bound from ``global_vars``/``utils``. On Python < 3.12, ``typing.override`` (which
core_v0.19.0's training package imports) is aliased from ``typing_extensions``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from support.common import child_env
from support.megatron_lm_tree import (
    export_tree,
    import_training,
    source_or_skip,
    tag_for_installed_core,
)

# Megatron-LM's training package and what it imports at each tag (core_v0.19.0 has no
# megatron/legacy); megatron.core is the installed wheel's. Each tree imports only against its own
# series (0.19.0's training needs megatron.core.tokenizers.utils, 0.16.1's the 0.16 datasets
# package), so a venv tests one tag (megatron_lm_tree.tag_for_installed_core): the default CI leg
# 0.16.1, the second leg 0.19.0.
TREES = ("megatron/training", "megatron/legacy", "megatron/rl")

VOCAB = 96  # HF models below and the dense GPT: NullTokenizer --vocab-size 95 (+1 eod) padded by 32
MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--ffn-hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--group-query-attention",
    "--num-query-groups",
    "2",
    "--seq-length",
    "64",
    "--max-position-embeddings",
    "64",
    "--position-embedding-type",
    "rope",
    "--no-position-embedding",
    "--rotary-base",
    "10000",
    "--normalization",
    "RMSNorm",
    "--norm-epsilon",
    "1e-6",
    "--swiglu",
    "--disable-bias-linear",
    "--attention-dropout",
    "0.0",
    "--hidden-dropout",
    "0.0",
]
UNTIED = ["--untie-embeddings-and-output-weights"]
# Llama 3.x's RoPE scaling: Megatron-LM flags, and the HF rope_scaling of the same rule
ROPE32 = ["--use-rope-scaling", "--rope-scaling-factor", "32"]
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
QKV_BIAS = ["--add-qkv-bias"]
MOE = [
    "--num-experts",
    "8",
    "--moe-ffn-hidden-size",
    "32",
    "--moe-router-topk",
    "4",
    "--moe-router-load-balancing-type",
    "aux_loss",
    "--moe-aux-loss-coeff",
    "1e-2",
    "--moe-token-dispatcher-type",
    "alltoall",
]
RUN = [
    "--micro-batch-size",
    "1",
    "--global-batch-size",
    "8",
    "--lr",
    "1e-4",
    "--train-iters",
    "10",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    str(VOCAB - 1),
    "--make-vocab-size-divisible-by",
    "32",
    "--transformer-impl",
    "local",
    "--no-persist-layer-norm",
]
# What shapes the model: after --use-checkpoint-args these must equal the full command line's.
SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "group_query_attention",
    "kv_channels",
    "max_position_embeddings",
    "position_embedding_type",
    "add_position_embedding",
    "rotary_base",
    "rotary_percent",
    "rotary_interleaved",
    "add_bias_linear",
    "add_qkv_bias",
    "swiglu",
    "squared_relu",
    "untie_embeddings_and_output_weights",
    "normalization",
    "layernorm_zero_centered_gamma",
    "num_experts",
    "moe_ffn_hidden_size",
    "moe_router_topk",
    "moe_layer_freq",
    "moe_router_pre_softmax",
    "moe_router_score_function",
    "moe_shared_expert_intermediate_size",
    "use_rope_scaling",
    "rope_scaling_factor",
    "layernorm_epsilon",
)
UPCYCLE = dict(num_experts=8, granularity=2, moe_router_topk=4, progress=False)
# case (the source directory of the same name) -> the flags of its dense model
CASES = {
    "hf_llama": MODEL + UNTIED,
    "hf_qwen2": MODEL + QKV_BIAS,
    "hf_llama32": MODEL + ROPE32,  # tied, llama3 RoPE
    "hf_phi3": MODEL + UNTIED,  # fused qkv_proj / gate_up_proj
    "megatron_lm_args": MODEL + UNTIED,
    # its args record support.upcycle.dense_args' norm_epsilon 1e-5 (a later flag wins)
    "partial_args": MODEL + UNTIED + ["--norm-epsilon", "1e-5"],
}


def _tiny_hf(kind: str, path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )
    if kind == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, tie_word_embeddings=False)
        )
    elif kind == "llama32":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_scaling=LLAMA3)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "phi3":
        ids = dict(pad_token_id=VOCAB - 1, eos_token_id=VOCAB - 2, bos_token_id=1)
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, **ids))
    else:
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**common, tie_word_embeddings=True)
        )
    model.save_pretrained(path)


def fields_read_by(source: str, function: str, reader: str) -> set[str]:
    """The field names ``function`` of checkpointing.py passes to its helper ``reader``
    (``_compare``
    or ``_set_arg``), read from the tag's source with ``ast``."""
    tree = ast.parse(source)
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == reader and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
    return names


@pytest.fixture(scope="module")
def report():
    tag = tag_for_installed_core()
    git_dir = source_or_skip(tag)
    pytest.importorskip(
        "six", reason="Megatron-LM's megatron/training imports six: pip install -e '.[test]'"
    )
    # Our own directory, not tmp_path: concurrent pytest sessions of one user prune each other's
    # basetemp.
    with tempfile.TemporaryDirectory(prefix="dpsl-test-ckpt-args-") as d:
        work = Path(d)
        root = export_tree(tag, work / "Megatron-LM", git_dir, paths=TREES)
        _tiny_hf("llama", work / "hf_llama")
        _tiny_hf("qwen2", work / "hf_qwen2")
        _tiny_hf("llama32", work / "hf_llama32")
        _tiny_hf("phi3", work / "hf_phi3")
        # child_env: the child hosts its own one-rank store, not on the port an earlier test of this
        # pytest holds
        proc = subprocess.run(
            [sys.executable, __file__, str(root), str(work)],
            capture_output=True,
            text=True,
            env=child_env(PYTHONWARNINGS="ignore"),
            timeout=600,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
        result = json.loads((work / "report.json").read_text())
        result["tag"] = tag
        result["checkpointing_py"] = (root / "megatron/training/checkpointing.py").read_text()
        yield result


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_checkpoint_args_accepts_the_llama_command_line(report, case):
    """Megatron-LM's own check, run against the flags a user passes (no --finetune): no mismatch."""
    assert report["cases"][case]["check_checkpoint_args"] == "ok", (
        f"{report['tag']}: {report['cases'][case]}"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_use_checkpoint_args_rebuilds_the_model_flags(report, case):
    """--use-checkpoint-args with only run flags: load_args_from_checkpoint + validate_args give the
    shape of the full command line, and the check passes on that namespace too."""
    got = report["cases"][case]
    assert got["use_checkpoint_args"] == "ok", f"{report['tag']}: {got['use_checkpoint_args']}"
    expected, loaded = got["full_command_line"], got["from_checkpoint"]
    assert {k: loaded[k] for k in SHAPE_FIELDS} == {k: expected[k] for k in SHAPE_FIELDS}
    assert loaded["padded_vocab_size"] == VOCAB
    # the expert implementation stays the run's choice (one checkpoint serves all of them)
    assert loaded["moe_grouped_gemm"] is False and loaded["moe_token_dispatcher_type"] == "alltoall"


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_field_megatron_lm_reads_is_written(report, case):
    """Each name that check_checkpoint_args and load_args_from_checkpoint of the tag read (taken
    from
    its source, every branch) is in the output's args: no AttributeError, no silent default."""
    source = report["checkpointing_py"]
    compared = fields_read_by(source, "check_checkpoint_args", "_compare")
    copied = fields_read_by(source, "load_args_from_checkpoint", "_set_arg")
    assert {
        "add_position_embedding",
        "num_layers",
        "tokenizer_type",
    } <= compared  # the parse found them
    assert {"position_embedding_type", "num_experts", "moe_router_topk"} <= copied
    # the checkpoint version < 3.0 branch reads model_parallel_size; we write 3.0 checkpoints
    missing = (compared | copied) - set(report["cases"][case]["ckpt_fields"])
    assert not missing, f"{case}: {sorted(missing)} missing from args"


@pytest.mark.parametrize(
    "case", ["hf_llama", "hf_qwen2", "hf_llama32", "hf_phi3", "megatron_lm_args"]
)
def test_printed_flags_rebuild_the_model(report, case):
    """The flags the CLI prints, parsed by the tag's Megatron-LM, give the hand-written command
    line's model (rope scaling and norm epsilon included); check_checkpoint_args accepts them."""
    got = report["cases"][case]
    assert got["printed_flags"] == {k: got["full_command_line"][k] for k in SHAPE_FIELDS}
    assert got["printed_check"] == "ok"


def test_use_checkpoint_args_alone_loses_the_rope_scaling(report):
    """Why the CLI prints flags to pass with --use-checkpoint-args: load_args_from_checkpoint copies
    neither the RoPE scaling nor the norm epsilon, at either tag."""
    bare = report["cases"]["hf_llama32"]["without_still_pass_flags"]
    assert bare == {
        "use_rope_scaling": False,
        "rope_scaling_factor": 8.0,
        "layernorm_epsilon": 1e-5,
    }
    llama32 = report["cases"]["hf_llama32"]["ckpt"]
    assert llama32["use_rope_scaling"] is True and llama32["rope_scaling_factor"] == 32.0


def test_written_values_for_rope_models(report):
    llama, qwen = report["cases"]["hf_llama"]["ckpt"], report["cases"]["hf_qwen2"]["ckpt"]
    for ckpt in (llama, qwen):
        assert ckpt["position_embedding_type"] == "rope" and ckpt["add_position_embedding"] is False
        assert ckpt["rotary_base"] == 10000 and ckpt["rotary_interleaved"] is False
        assert (
            ckpt["num_query_groups"] == 2
            and ckpt["group_query_attention"] is True
            and ckpt["kv_channels"] == 8
        )
        assert ckpt["consumed_train_samples"] == 0 and ckpt["no_save_optim"] is True
    assert llama["untie_embeddings_and_output_weights"] is True and llama["add_qkv_bias"] is False
    assert qwen["untie_embeddings_and_output_weights"] is False and qwen["add_qkv_bias"] is True
    partial = report["cases"]["partial_args"]
    assert (
        partial["ckpt"]["add_position_embedding"] is False
        and partial["ckpt"]["make_vocab_size_divisible_by"] == 32
    )
    assert (
        "add_position_embedding" in partial["filled"]
        and "num_attention_heads" not in partial["filled"]
    )


def test_complete_args_reads_what_the_shapes_decide():
    """A GPT-2-like source (learned positions, LayerNorm, biases, tied, GELU) whose args give only
    the
    head count: the rest comes from the tensors; present values are kept, nothing is guessed."""
    import argparse

    from megatron_dpsl.upcycle.megatron_args import complete_args

    shapes = {
        "embedding.word_embeddings.weight": (50304, 32),
        "embedding.position_embeddings.weight": (1024, 32),
        "decoder.final_layernorm.weight": (32,),
        "decoder.final_layernorm.bias": (32,),
        "layer.self_attention.linear_qkv.weight": (96, 32),
        "layer.self_attention.linear_qkv.bias": (96,),
        "layer.self_attention.linear_proj.weight": (32, 32),
        "layer.self_attention.linear_proj.bias": (32,),
        "layer.mlp.linear_fc1.weight": (64, 32),
        "layer.mlp.linear_fc2.weight": (32, 64),
    }
    source = argparse.Namespace(num_attention_heads=4, seq_length=77)
    args, filled = complete_args(
        source, shapes, num_layers=3, activation="gelu", dtype=torch.bfloat16
    )
    assert not hasattr(source, "kv_channels")  # the source's namespace is not modified
    expected = dict(
        num_layers=3,
        hidden_size=32,
        ffn_hidden_size=64,
        kv_channels=8,
        num_query_groups=4,
        group_query_attention=False,
        position_embedding_type="learned_absolute",
        add_position_embedding=True,
        max_position_embeddings=1024,
        add_bias_linear=True,
        add_qkv_bias=True,
        swiglu=False,
        squared_relu=False,
        untie_embeddings_and_output_weights=False,
        normalization="LayerNorm",
        padded_vocab_size=50304,
        make_vocab_size_divisible_by=128,
        params_dtype=torch.bfloat16,
        bf16=True,
        seq_length=77,
    )
    assert {k: getattr(args, k) for k in expected} == expected
    assert (
        "seq_length" not in filled
        and "num_attention_heads" not in filled
        and filled["kv_channels"] == 8
    )
    rope, _ = complete_args(
        None,
        {k: v for k, v in shapes.items() if "position_embeddings" not in k},
        num_layers=3,
        activation="squared_relu",
        dtype=torch.float32,
    )
    assert (rope.position_embedding_type, rope.add_position_embedding, rope.rotary_base) == (
        "rope",
        False,
        10000,
    )
    assert (
        rope.squared_relu is True
        and not hasattr(rope, "num_attention_heads")
        and not hasattr(rope, "kv_channels")
    )


# ------------------------------------------------------------------------------------------- child


def _plain(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _child(root: str, work: Path) -> dict:
    import contextlib
    import io

    arguments, checkpointing, global_vars = import_training(root)
    from megatron.core import parallel_state
    from support.megatron_cpu import init_single_process
    from support.upcycle import build_gpt, dense_args, save_megatron_lm

    from megatron_dpsl.upcycle import upcycle
    from megatron_dpsl.upcycle.flags import not_restored

    def parse(argv):
        """Megatron-LM's parse_args + validate_args on ``argv`` (what pretrain_gpt.py does)."""
        sys.argv = ["pretrain_gpt.py", *argv]
        args = arguments.parse_args()
        with contextlib.redirect_stdout(io.StringIO()):
            arguments.validate_args(args)
        return args

    def parse_with_checkpoint_args(argv):
        """initialize_megatron's order (core_v0.16.1; parse_and_validate_args at core_v0.19.0):
        parse, load_args_from_checkpoint for --pretrained-checkpoint then --load, validate."""
        sys.argv = ["pretrain_gpt.py", *argv]
        args = arguments.parse_args()
        with contextlib.redirect_stdout(io.StringIO()):
            checkpointing.load_args_from_checkpoint(args, load_arg="pretrained_checkpoint")
            checkpointing.load_args_from_checkpoint(args)
            arguments.validate_args(args)
        return args

    def check(args, ckpt_args, version):
        global_vars.set_args(args)  # what initialize_megatron's set_global_variables does
        checkpointing.set_checkpoint_version(version)
        try:
            checkpointing.check_checkpoint_args(ckpt_args)
            return "ok"
        except AssertionError as exc:
            return f"AssertionError: {exc}"
        except AttributeError as exc:
            return f"AttributeError: {exc}"
        finally:
            global_vars.set_args(None)

    init_single_process()
    # The Megatron-LM-saved dense source: args from the tag's own parser, the model from them.
    dense_cli = parse(MODEL + UNTIED + RUN)
    dense_cli.padded_vocab_size = (
        VOCAB  # what the tag's tokenizer build sets (NullTokenizer 95 + eod, /32)
    )
    torch.manual_seed(0)
    save_megatron_lm(build_gpt(dense_cli), str(work / "megatron_lm_args"), dense_cli)
    partial = dense_args(
        hidden=32, ffn=64, heads=4, groups=2, vocab=VOCAB
    )  # no add_position_embedding etc.
    partial.max_position_embeddings = 64
    del (
        partial.group_query_attention,
        partial.num_query_groups,
        partial.kv_channels,
    )  # found from the shapes
    torch.manual_seed(0)
    save_megatron_lm(build_gpt(dense_args(vocab=VOCAB)), str(work / "partial_args"), partial)
    # Megatron-LM reads checkpoint args before it initialises torch.distributed
    # (initialize_megatron); read_metadata would otherwise all-reduce the iteration on a CUDA
    # tensor.
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()

    report = {"cases": {}}
    for case, flags in CASES.items():
        src, out = work / case, work / f"{case}-moe"
        result = upcycle(src, out, **UPCYCLE)
        common = torch.load(out / "release" / "common.pt", weights_only=False)
        ckpt_args = common["args"]
        full = parse(flags + MOE + RUN + ["--load", str(out)])
        entry = {
            "ckpt_fields": sorted(vars(ckpt_args)),
            "ckpt": {k: _plain(v) for k, v in vars(ckpt_args).items()},
            "filled": result.record.get("args_filled_in", {}),
            "check_checkpoint_args": check(full, ckpt_args, common["checkpoint_version"]),
            "full_command_line": {
                k: _plain(getattr(full, k, None)) for k in (*SHAPE_FIELDS, "padded_vocab_size")
            },
        }
        entry.update(_printed_flags(parse, check, result.flags, out, ckpt_args))
        bare = parse_with_checkpoint_args(
            RUN + MOE[-2:] + ["--use-checkpoint-args", "--load", str(out)]
        )
        entry["without_still_pass_flags"] = {
            k: _plain(getattr(bare, k, None))
            for k in ("use_rope_scaling", "rope_scaling_factor", "layernorm_epsilon")
        }
        try:
            # what the CLI prints to pass with --use-checkpoint-args (flags.NOT_RESTORED)
            loaded = parse_with_checkpoint_args(
                RUN
                + MOE[-2:]
                + not_restored(result.flags)
                + ["--use-checkpoint-args", "--load", str(out)]
            )
            entry["from_checkpoint"] = {
                k: _plain(getattr(loaded, k, None))
                for k in (
                    *SHAPE_FIELDS,
                    "padded_vocab_size",
                    "moe_grouped_gemm",
                    "moe_token_dispatcher_type",
                )
            }
            entry["use_checkpoint_args"] = check(loaded, ckpt_args, common["checkpoint_version"])
        except (AssertionError, AttributeError, TypeError, ValueError, RuntimeError) as exc:
            entry["use_checkpoint_args"] = f"{type(exc).__name__}: {exc}"
        report["cases"][case] = entry
    return report


def _printed_flags(parse, check, flags, out, ckpt_args) -> dict:
    """The flags the CLI printed, plus the run's own (MoE balancing and dispatcher, data, batch):
    the namespace Megatron-LM's parser makes of them, and its check against the checkpoint."""
    try:
        printed = parse(flags + MOE[6:] + RUN + ["--load", str(out)])
    except SystemExit as exc:  # argparse: e.g. no --num-attention-heads for a source without it
        return {"printed_flags": f"SystemExit {exc.code}"}
    return {
        "printed_flags": {k: _plain(getattr(printed, k, None)) for k in SHAPE_FIELDS},
        "printed_check": check(printed, ckpt_args, 3.0),
    }


if __name__ == "__main__":
    megatron_lm_root, work_dir = sys.argv[1], Path(sys.argv[2])
    (work_dir / "report.json").write_text(
        json.dumps(_child(megatron_lm_root, work_dir), default=str)
    )
