"""Megatron-LM source trees for tests and for scripts/prepare_gpu_carry.sh: from a local git dir, or
from the committed snapshots of the training code.

Two sources, in this order:
1. ``$MEGATRON_LM_GIT_DIR`` (a clone or mirror of github.com/NVIDIA/Megatron-LM): ``git archive`` of
   the tag's ``megatron/`` (core included), ``pretrain_gpt.py``, ``gpt_builders.py``,
   ``model_provider.py``: exactly a checkout. scripts/prepare_gpu_carry.sh needs this one.
2. Otherwise ``tests/fixtures/megatron_lm/<tag>.tar.xz`` (``snapshots.json`` pins each archive's
   commit and sha256; ``python tests/support/megatron_lm_tree.py snapshot TAG`` rewrites one from a
   git dir): the same files without ``megatron/core`` (+ Megatron-LM's LICENSE, BSD-3-Clause).
   ``megatron`` is a namespace package at both tags, so ``megatron.core`` then comes from the
   installed megatron-core wheel. Replaced leaf, named in every report: the tag's ``megatron/core``
   by the wheel's (0.16.1: the same Python files as core_v0.16.1; 0.19.2: the patch release GPU
   users install on top of core_v0.19.0). This is what CI runs: a clean clone has no Megatron-LM git
   dir and nothing is downloaded.

A test runs Megatron-LM in a child interpreter (megatron_lm_chain.py) with the tree first on
``sys.path``, exactly as ``python pretrain_gpt.py`` in a checkout does. The tag tested is the one of
the installed megatron-core (0.16 -> core_v0.16.1, 0.19 -> core_v0.19.0;
``tag_for_installed_core``).

    # what prepare_gpu_carry.sh runs (git dir)
    python tests/support/megatron_lm_tree.py export core_v0.19.0 OUT
    # rewrite the committed snapshot (git dir)
    python tests/support/megatron_lm_tree.py snapshot core_v0.19.0
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
from pathlib import Path

GIT_DIR_ENV = "MEGATRON_LM_GIT_DIR"
# megatron-core release (major, minor) -> the Megatron-LM tag whose training code goes with it
TAGS = {(0, 16): "core_v0.16.1", (0, 19): "core_v0.19.0"}
# What pretrain_gpt.py and pretrain_vlm.py need from a checkout (megatron/ holds core, training,
# legacy, rl,
# post_training, ...)
TREE_PATHS = (
    "megatron",
    "pretrain_gpt.py",
    "gpt_builders.py",
    "model_provider.py",
    "pretrain_vlm.py",
)
# The committed snapshots: what a tree needs but megatron/core (the installed wheel supplies it)
SNAPSHOT_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "megatron_lm"
SNAPSHOT_MANIFEST = SNAPSHOT_DIR / "snapshots.json"
SNAPSHOT_PATHS = ("LICENSE", *TREE_PATHS)
SNAPSHOT_EXCLUDE = "megatron/core"
# Megatron-LM's module names that a child interpreter must not take from an earlier tree
_TOP_MODULES = ("pretrain_gpt", "gpt_builders", "model_provider", "pretrain_vlm")


def git_dir() -> str | None:
    """``$MEGATRON_LM_GIT_DIR`` when it names a git directory, else None."""
    value = os.environ.get(GIT_DIR_ENV)
    return value if value and Path(value).is_dir() else None


def git_dir_or_skip() -> str:
    """``$MEGATRON_LM_GIT_DIR``, or pytest.skip (for tests that need git itself, e.g. re-locking
    patches)."""
    import pytest

    value = git_dir()
    if value is None:
        pytest.skip(
            f"${GIT_DIR_ENV} is "
            f"{'unset' if not os.environ.get(GIT_DIR_ENV) else 'not a directory'}: set it to a "
            "clone or mirror of https://github.com/NVIDIA/Megatron-LM (with tags core_v0.16.1 "
            "and core_v0.19.0) "
            "to run this test"
        )
    return value


def snapshots() -> dict:
    """``{tag: {"commit", "sha256", "paths", "exclude"}}`` of the committed snapshots ({} if
    none)."""
    return json.loads(SNAPSHOT_MANIFEST.read_text()) if SNAPSHOT_MANIFEST.is_file() else {}


def source_or_skip(tag: str) -> str | None:
    """Where ``tag``'s tree comes from: the git dir (returned), else the committed snapshot (None),
    else
    pytest.skip saying what to set."""
    import pytest

    value = git_dir()
    if value is not None or tag in snapshots():
        return value
    pytest.skip(
        f"no snapshot of {tag} in {SNAPSHOT_DIR} and ${GIT_DIR_ENV} is unset: set it to a "
        "clone or mirror "
        "of https://github.com/NVIDIA/Megatron-LM to run the Megatron-LM tests"
    )


def installed_core_version() -> tuple[int, int]:
    """(major, minor) of the installed megatron-core distribution, without importing it."""
    major, minor = importlib.metadata.version("megatron-core").split(".")[:2]
    return int(major), int(minor)


def tag_for_installed_core() -> str:
    """The Megatron-LM tag matching the installed megatron-core; pytest.skip if none is
    supported."""
    import pytest

    version = installed_core_version()
    if version not in TAGS:
        pytest.skip(
            f"megatron-core {version[0]}.{version[1]}: no Megatron-LM tag is tested with it "
            f"({TAGS})"
        )
    return TAGS[version]


def commit_of(tag: str, git_dir_: str) -> str:
    proc = subprocess.run(
        ["git", "--git-dir", git_dir_, "rev-parse", f"{tag}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{git_dir_}: no tag {tag} ({proc.stderr.strip()})")
    return proc.stdout.strip()


def export_tree(
    tag: str,
    out: Path,
    git_dir_: str | None = None,
    paths: tuple[str, ...] = TREE_PATHS,
    snapshot: bool = False,
) -> Path:
    """Write ``paths`` of Megatron-LM at ``tag`` under ``out``; returns ``out``. From ``git_dir_``
    or ``$MEGATRON_LM_GIT_DIR`` (``git archive | tar -x``), else (or with ``snapshot``) from the
    committed snapshot (module docstring: without ``megatron/core``, which then comes from the
        installed wheel).

    Paths the tag lacks are skipped (core_v0.19.0 has no ``megatron/legacy``). A finished export
    leaves ``out/.megatron-lm-export`` naming the source; a second call with the same tag and paths
    reuses it.
    """
    git_dir_ = None if snapshot else git_dir_ or git_dir()
    if git_dir_ is None:
        entry = snapshots().get(tag)
        if entry is None:
            raise RuntimeError(
                f"no snapshot of {tag} in {SNAPSHOT_DIR}: set ${GIT_DIR_ENV} to a Megatron-LM "
                "git dir"
            )
        want = f"{tag} {entry['commit']} snapshot {' '.join(paths)}\n"
    else:
        want = f"{tag} {commit_of(tag, git_dir_)} {' '.join(paths)}\n"
    out = Path(out)
    stamp = out / ".megatron-lm-export"
    if stamp.is_file() and stamp.read_text() == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    if git_dir_ is None:
        _extract_snapshot(tag, entry, out, paths)
    else:
        _extract_git(tag, git_dir_, out, paths)
    stamp.write_text(want)
    return out


def _extract_git(tag: str, git_dir_: str, out: Path, paths: tuple[str, ...]) -> None:
    present = subprocess.run(
        ["git", "--git-dir", git_dir_, "ls-tree", "--name-only", tag, *paths],
        capture_output=True,
        text=True,
    ).stdout.split()
    archive = subprocess.run(
        ["git", "--git-dir", git_dir_, "archive", tag, *present], capture_output=True
    )
    if archive.returncode != 0:
        raise RuntimeError(
            f"git archive {tag} {' '.join(present)}: {archive.stderr.decode().strip()}"
        )
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)


def _extract_snapshot(tag: str, entry: dict, out: Path, paths: tuple[str, ...]) -> None:
    """Check the snapshot against its manifest, then extract its members under ``paths``."""
    data = (SNAPSHOT_DIR / f"{tag}.tar.xz").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise RuntimeError(
            f"{SNAPSHOT_DIR / (tag + '.tar.xz')}: sha256 {digest}, {SNAPSHOT_MANIFEST.name} says "
            f"{entry['sha256']}; rewrite it with: python tests/support/megatron_lm_tree.py "
            f"snapshot {tag}"
        )
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        members = [
            m
            for m in tar.getmembers()
            if any(m.name == p or m.name.startswith(p + "/") for p in paths)
        ]
        tar.extractall(out, members=members, filter="data")


def write_snapshot(tag: str, git_dir_: str | None = None) -> dict:
    """Rewrite ``tests/fixtures/megatron_lm/<tag>.tar.xz`` from the git dir (deterministic: ``git
    archive``
    sets every mtime to the commit's) and its entry in ``snapshots.json``; returns the entry."""
    git_dir_ = git_dir_ or git_dir()
    if git_dir_ is None:
        raise RuntimeError(f"set ${GIT_DIR_ENV} to a Megatron-LM git directory")
    commit = commit_of(tag, git_dir_)
    archive = subprocess.run(
        [
            "git",
            "--git-dir",
            git_dir_,
            "archive",
            "--format=tar",
            commit,
            *SNAPSHOT_PATHS,
            f":(exclude){SNAPSHOT_EXCLUDE}",
        ],
        capture_output=True,
        check=True,
    ).stdout
    data = lzma.compress(archive, preset=9 | lzma.PRESET_EXTREME)
    SNAPSHOT_DIR.mkdir(parents=True, exist_ok=True)
    (SNAPSHOT_DIR / f"{tag}.tar.xz").write_bytes(data)
    manifest = snapshots()
    manifest[tag] = {
        "commit": commit,
        "sha256": hashlib.sha256(data).hexdigest(),
        "paths": list(SNAPSHOT_PATHS),
        "exclude": SNAPSHOT_EXCLUDE,
    }
    SNAPSHOT_MANIFEST.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    return manifest[tag]


# --------------------------------------------------------------------------- inside the child


def use_tree(root: str) -> None:
    """Put the Megatron-LM tree ``root`` first on ``sys.path`` (call before anything imports
    megatron).

    On Python 3.11, Megatron-LM core_v0.19's training package does ``from typing import override``
    (3.12+): replaced leaf, ``typing.override`` is aliased to ``typing_extensions.override`` (the
    same decorator, backported).
    """
    import typing

    if any(name == "megatron" or name.startswith("megatron.") for name in sys.modules):
        raise RuntimeError("use_tree: megatron is imported already; call it first")
    for name in _TOP_MODULES:
        sys.modules.pop(name, None)
    sys.path.insert(0, os.path.abspath(root))
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Megatron-LM trees for the tests, from $MEGATRON_LM_GIT_DIR"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help=f"write {', '.join(TREE_PATHS)} of TAG under OUT")
    p.add_argument("tag")
    p.add_argument("out", type=Path)
    p.add_argument("--git-dir", default=None, help=f"default ${GIT_DIR_ENV}")
    p = sub.add_parser(
        "snapshot", help=f"rewrite {SNAPSHOT_DIR.name}/TAG.tar.xz and {SNAPSHOT_MANIFEST.name}"
    )
    p.add_argument("tag")
    p.add_argument("--git-dir", default=None, help=f"default ${GIT_DIR_ENV}")
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        print(json.dumps(write_snapshot(args.tag, args.git_dir)))
    else:
        if (args.git_dir or git_dir()) is None:
            parser.error(
                f"export needs a Megatron-LM git dir (--git-dir or ${GIT_DIR_ENV}): "
                "the snapshots lack megatron/core"
            )
        print(export_tree(args.tag, args.out, args.git_dir))
    return 0


def import_training(root: str):
    """Import the exported tree's training package next to the installed megatron-core; returns
    its ``arguments``, ``checkpointing`` and ``global_vars`` modules (call in a child process)."""
    import types
    import typing

    if not hasattr(typing, "override"):  # replaced leaf: typing.override is Python >= 3.12
        import typing_extensions

        typing.override = typing_extensions.override
    sys.path[:0] = [root]
    # namespace package: megatron.core from the wheel, megatron/training from ``root``
    import megatron

    # replaced leaf: megatron/training/__init__.py (imports initialize.py -> Triton/GPU stack) is
    # not run; the package is registered bare and the names its submodules import from it are bound.
    pkg = types.ModuleType("megatron.training")
    pkg.__path__ = [os.path.join(root, "megatron", "training")]
    sys.modules["megatron.training"] = megatron.training = pkg
    from megatron.training import global_vars

    for name in (
        "get_args",
        "get_timers",
        "get_adlr_autoresume",
        "get_tokenizer",
        "get_tensorboard_writer",
        "get_wandb_writer",
        "get_one_logger",
        "get_signal_handler",
    ):
        setattr(pkg, name, getattr(global_vars, name))
    from megatron.training import utils

    pkg.print_rank_0 = utils.print_rank_0
    from megatron.training import arguments, checkpointing

    return arguments, checkpointing, global_vars


if __name__ == "__main__":
    sys.exit(main())
