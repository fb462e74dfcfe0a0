"""The quickstart's ``--out``: what an earlier launch wrote is replaced, nothing a user had is."""

from __future__ import annotations

import json
import os

import pytest

from megatron_dpsl.train import out_dir
from megatron_dpsl.train import quickstart as qs

OUTPUTS = ["plan.json", "corpus", "dense", "runs/aux_loss", "summary.json"]


def _tree(root):
    """Every file under ``root`` -> its content (what a user would lose)."""
    found = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            found[os.path.relpath(path, root)] = open(path, "rb").read()
    return found


def _write(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_new_directory_is_claimed_and_recorded(tmp_path):
    out = tmp_path / "new"
    out_dir.claim(str(out), OUTPUTS)
    marker = json.loads((out / out_dir.MARKER).read_text())
    assert marker["written"] == sorted(OUTPUTS)


def test_foreign_non_empty_directory_is_refused_untouched(tmp_path):
    _write(tmp_path / "runs" / "mine" / "events.out.tfevents.1", "my logs")
    _write(tmp_path / "dense" / "notes.txt", "mine too")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"^--out .*not empty and not written by the quickstart"):
        out_dir.claim(str(tmp_path), OUTPUTS)
    assert _tree(tmp_path) == before


def test_force_writes_beside_foreign_files_but_never_replaces_them(tmp_path):
    _write(tmp_path / "runs" / "mine" / "events.out.tfevents.1", "my logs")
    _write(tmp_path / "summary.json", "my summary")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"^--out .*summary\.json exists and was not written"):
        out_dir.claim(str(tmp_path), OUTPUTS, force=True)
    assert _tree(tmp_path) == before
    os.remove(tmp_path / "summary.json")
    out_dir.claim(str(tmp_path), OUTPUTS, force=True)
    assert (tmp_path / "runs" / "mine" / "events.out.tfevents.1").read_text() == "my logs"


def test_rerun_replaces_only_what_was_recorded(tmp_path):
    out_dir.claim(str(tmp_path), OUTPUTS)
    _write(tmp_path / "dense" / "checkpoint" / "model.pt", "old run")
    _write(tmp_path / "runs" / "aux_loss" / "result.json", "old run")
    _write(tmp_path / "runs" / "my_tb" / "events.out.tfevents.1", "my logs")
    _write(tmp_path / "my_notes.md", "keep")
    out_dir.claim(str(tmp_path), OUTPUTS)
    left = _tree(tmp_path)
    assert left.pop(out_dir.MARKER)
    assert left == {
        os.path.join("runs", "my_tb", "events.out.tfevents.1"): b"my logs",
        "my_notes.md": b"keep",
    }


def test_symlinks_are_not_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    _write(outside / "aux_loss" / "precious.txt", "keep")
    out = tmp_path / "out"
    out_dir.claim(str(out), OUTPUTS)
    os.symlink(outside, out / "runs")
    with pytest.raises(ValueError, match="runs is a symbolic link"):
        out_dir.claim(str(out), OUTPUTS)
    assert (outside / "aux_loss" / "precious.txt").read_text() == "keep"


def test_unreadable_marker_and_file_out_are_refused(tmp_path):
    (tmp_path / out_dir.MARKER).write_text("{not json")
    _write(tmp_path / "dense" / "x", "keep")
    with pytest.raises(ValueError, match="marker .* is unreadable"):
        out_dir.claim(str(tmp_path), OUTPUTS)
    assert (tmp_path / "dense" / "x").read_text() == "keep"
    with pytest.raises(ValueError, match="is not a directory"):
        out_dir.claim(str(tmp_path / "dense" / "x"), OUTPUTS)


def test_quickstart_plan_lists_every_path_it_writes(tmp_path):
    a = qs.build_parser().parse_args(["--out", str(tmp_path)])
    plan = qs.build_plan(a)
    outputs = set(plan["outputs"]) | set(qs.REPORT_FILES)
    for stage in plan["stages"]:
        rel = os.path.relpath(stage["dir"], plan["out"])
        assert rel in outputs, rel
    for rel in ("plan.json", "moe_init.done", "moe_init.failed", "summary.json", "table.md"):
        assert rel in outputs
    assert "runs" not in outputs  # only its runs/<name> children: a user's runs/ stays
