"""Bad input to ``megatron-dpsl-upcycle``, as a careless or hostile user gives it (issue 24):
every case exits with status 2 and one line ``megatron-dpsl-upcycle: error: ...`` that names the
flag or file, and nothing is written (no output, no temporary directory).

Two tables: bad flags on a good source, and damaged sources (HF files, and a Megatron
``torch_dist`` checkpoint the converter itself wrote) with good flags.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from support.upcycle import write_tiny_hf_llama

from megatron_dpsl.upcycle.cli import main

GOOD = ["--num-experts", "4", "--moe-router-topk", "2", "--no-progress"]

BAD_FLAGS = {
    "router std inf": (["--router-init-std", "inf"], "--router-init-std"),
    "router std nan": (["--router-init-std", "nan"], "--router-init-std"),
    "router std negative": (["--router-init-std", "-0.1"], "--router-init-std"),
    "noise nan": (["--expert-noise-std", "nan"], "--expert-noise-std"),
    "noise inf": (["--expert-noise-std", "inf"], "--expert-noise-std"),
    "noise negative": (["--expert-noise-std", "-1"], "--expert-noise-std"),
    "drop nan": (["--drop-upcycling-ratio", "nan"], "--drop-upcycling-ratio"),
    "drop one": (["--drop-upcycling-ratio", "1"], "--drop-upcycling-ratio"),
    "experts zero": (["--num-experts", "0"], "--num-experts"),
    "experts huge": (["--num-experts", "1000000"], "--num-experts"),
    "granularity zero": (["--granularity", "0"], "--granularity"),
    "granularity not dividing": (["--granularity", "3"], "--granularity"),
    "granularity not dividing ffn": (
        ["--num-experts", "48", "--granularity", "48"],
        "--granularity",
    ),
    "topk zero": (["--moe-router-topk", "0"], "--moe-router-topk"),
    "topk above experts": (["--moe-router-topk", "5"], "--moe-router-topk"),
    "seed negative": (["--seed", "-1"], "--seed"),
    "seed huge": (["--seed", str(2**70)], "--seed"),
    "freq power tower": (["--moe-layer-freq", "[9**9**9]"], "--moe-layer-freq"),
    "freq huge list": (["--moe-layer-freq", "[1]*10**9"], "--moe-layer-freq"),
    "freq gigantic repeat": (["--moe-layer-freq", "[1]*999999"], "--moe-layer-freq"),
    "freq python": (["--moe-layer-freq", "__import__('os')"], "--moe-layer-freq"),
    "freq zero": (["--moe-layer-freq", "0"], "--moe-layer-freq"),
    "freq not binary": (["--moe-layer-freq", "[1,2]"], "--moe-layer-freq"),
    "freq wrong length": (["--moe-layer-freq", "[1,0,1]"], "--moe-layer-freq"),
    "seq length zero": (["--seq-length", "0"], "--seq-length"),
    "seq length past positions": (["--seq-length", "65"], "--seq-length"),
}


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _assert_refused(code: int, err: str, names: str, parent: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("megatron-dpsl-upcycle: error: "), err
    assert names in lines[0], lines[0]
    assert not (parent / "moe").exists()
    assert not [p for p in parent.iterdir() if ".upcycle-" in p.name]


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    return write_tiny_hf_llama(tmp_path_factory.mktemp("bad") / "hf")


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flag_is_one_line_naming_it(case, hf_source, tmp_path, capsys):
    extra, names = BAD_FLAGS[case]
    code, err = _run(
        ["--source", str(hf_source), "--output", str(tmp_path / "moe"), *GOOD, *extra], capsys
    )
    _assert_refused(code, err, names, tmp_path)


# -- damaged sources ------------------------------------------------------------------------------


def _edit_config(root: Path, **changes) -> None:
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(changes)
    (root / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(root: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(root / "model.safetensors")
    change(tensors)
    save_file(tensors, root / "model.safetensors")


def _split_into_shards(root: Path, missing: bool) -> None:
    """Two shards and an index; with ``missing`` the second shard is deleted."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(root / "model.safetensors")
    (root / "model.safetensors").unlink()
    names = sorted(tensors)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    for file, part in half.items():
        save_file({n: tensors[n] for n in part}, root / file)
    index = {"metadata": {}, "weight_map": {n: f for f, part in half.items() for n in part}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    if missing:
        (root / "model-00002-of-00002.safetensors").unlink()


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _nan_in(tensors: dict) -> None:
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")


def _config(**changes):
    return lambda root: _edit_config(root, **changes)


def _write(name: str, data: bytes):
    return lambda root: (root / name).write_bytes(data)


def _index_not_json(root: Path) -> None:
    _split_into_shards(root, missing=False)
    (root / "model.safetensors.index.json").write_text("{")


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}
OTHER_KNEE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
SHARD2 = "model-00002-of-00002.safetensors"
HF_DAMAGE = {
    "config not json": (_write("config.json", b"{'model_type': llama"), "config.json"),
    "config a list": (_write("config.json", b"[1, 2]"), "config.json"),
    "fewer layers declared": (_config(num_hidden_layers=1), "num_hidden_layers=1"),
    "more layers declared": (_config(num_hidden_layers=3), "num_hidden_layers=3"),
    "hidden size": (_config(hidden_size=48), "hidden_size=48"),
    "heads": (_config(num_attention_heads=8, num_key_value_heads=2), "num_attention_heads=8"),
    "kv groups": (_config(num_key_value_heads=4), "num_key_value_heads=4"),
    "ffn": (_config(intermediate_size=60), "intermediate_size=60"),
    "vocab": (_config(vocab_size=100), "vocab_size=100"),
    "layers nan": (_config(num_hidden_layers=float("nan")), "num_hidden_layers"),
    "layers fractional": (_config(num_hidden_layers=1.5), "num_hidden_layers"),
    "model type": (_config(model_type="gpt2"), "model_type 'gpt2'"),
    "activation": (_config(hidden_act="gelu"), "hidden_act='gelu'"),
    "longrope": (_config(rope_scaling=LONGROPE), "longrope"),
    "llama3 other knee": (_config(rope_scaling=OTHER_KNEE), "low_freq_factor"),
    "truncated safetensors": (lambda r: _truncate(r / "model.safetensors"), "model.safetensors"),
    "garbage safetensors": (
        _write("model.safetensors", struct.pack("<Q", 9) + b"{garbage}"),
        "model.safetensors",
    ),
    "index names a missing shard": (lambda r: _split_into_shards(r, missing=True), SHARD2),
    "index not json": (_index_not_json, "model.safetensors.index.json"),
    "nan tensor": (
        lambda r: _rewrite_tensors(r, _nan_in),
        "model.layers.1.mlp.down_proj.weight",
    ),
}


@pytest.mark.parametrize("case", sorted(HF_DAMAGE))
def test_damaged_hf_source_is_one_line_naming_it(case, hf_source, tmp_path, capsys):
    src = tmp_path / "hf"
    shutil.copytree(hf_source, src)
    damage, names = HF_DAMAGE[case]
    damage(src)
    code, err = _run(["--source", str(src), "--output", str(tmp_path / "moe"), *GOOD], capsys)
    _assert_refused(code, err, names, tmp_path)


@pytest.fixture(scope="module")
def megatron_source(hf_source, tmp_path_factory):
    from megatron_dpsl.upcycle import convert_dense

    out = tmp_path_factory.mktemp("bad_megatron") / "dense"
    convert_dense(hf_source, out, progress=False)
    return out


def _distcp(root: Path) -> Path:
    return next((root / "release").glob("*.distcp"))


MEGATRON_DAMAGE = {
    "common.pt garbage": (
        lambda r: (r / "release" / "common.pt").write_bytes(b"not a pickle"),
        "common.pt",
    ),
    "common.pt truncated": (lambda r: _truncate(r / "release" / "common.pt"), "common.pt"),
    ".metadata truncated": (lambda r: _truncate(r / "release" / ".metadata"), ".metadata"),
    ".distcp truncated": (lambda r: _truncate(_distcp(r)), ".distcp"),
    ".distcp overwritten": (
        lambda r: _distcp(r).write_bytes(b"\0" * _distcp(r).stat().st_size),
        ".distcp",
    ),
    "metadata.json not json": (
        lambda r: (r / "release" / "metadata.json").write_text("{"),
        "metadata.json",
    ),
    "tracker garbage": (
        lambda r: (r / "latest_checkpointed_iteration.txt").write_text("soon"),
        "latest_checkpointed_iteration.txt",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(MEGATRON_DAMAGE))
def test_damaged_megatron_source_is_one_line_naming_it(case, megatron_source, tmp_path, capsys):
    src = tmp_path / "dense"
    shutil.copytree(megatron_source, src)
    damage, names = MEGATRON_DAMAGE[case]
    damage(src)
    code, err = _run(["--source", str(src), "--output", str(tmp_path / "moe"), *GOOD], capsys)
    _assert_refused(code, err, names, tmp_path)


def test_a_nan_in_a_megatron_source_is_named(tmp_path, capsys):
    """Damaged values inside a readable file: the finiteness check names the tensor."""
    from support.megatron_cpu import init_single_process
    from support.upcycle import build_gpt, dense_args, save_megatron_lm

    init_single_process()
    args = dense_args()
    model = build_gpt(args)
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.weight[3, 5] = float("nan")
    save_megatron_lm(model, str(tmp_path / "dense"), args)
    argv = ["--source", str(tmp_path / "dense"), "--output", str(tmp_path / "moe"), *GOOD]
    code, err = _run(argv, capsys)
    _assert_refused(code, err, "decoder.layers.1.mlp.linear_fc2.weight", tmp_path)
