"""Megatron-LM source trees for tests and for scripts/prepare_gpu_carry.sh, exported from a local git dir.

Megatron-LM's code is never stored in this repository. Tests export the files they need at test time
from ``$MEGATRON_LM_GIT_DIR`` (a clone or mirror of github.com/NVIDIA/Megatron-LM) with ``git
archive`` and skip, saying why, when it is unset. Nothing is downloaded.

A test runs Megatron-LM in a child interpreter (megatron_lm_chain.py) with the tree first on ``sys.path``,
exactly as ``python pretrain_gpt.py`` in a checkout does: the tree's own ``megatron/core`` is used
(the installed megatron-core wheel only supplies its dependencies). The tag tested is the one of the
installed megatron-core (0.16 -> core_v0.16.1, 0.19 -> core_v0.19.0; ``tag_for_installed_core``).

    python tests/megatron_lm_tree.py export core_v0.19.0 OUT     # what prepare_gpu_carry.sh runs
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

GIT_DIR_ENV = "MEGATRON_LM_GIT_DIR"
# megatron-core release (major, minor) -> the Megatron-LM tag whose training code goes with it
TAGS = {(0, 16): "core_v0.16.1", (0, 19): "core_v0.19.0"}
# What pretrain_gpt.py needs from a checkout (megatron/ holds core, training, legacy, rl, post_training, ...)
TREE_PATHS = ("megatron", "pretrain_gpt.py", "gpt_builders.py", "model_provider.py")
# Megatron-LM's module names that a child interpreter must not take from an earlier tree
_TOP_MODULES = ("pretrain_gpt", "gpt_builders", "model_provider")


def git_dir() -> Optional[str]:
    """``$MEGATRON_LM_GIT_DIR`` when it names a git directory, else None."""
    value = os.environ.get(GIT_DIR_ENV)
    return value if value and Path(value).is_dir() else None


def git_dir_or_skip() -> str:
    import pytest

    value = git_dir()
    if value is None:
        pytest.skip(
            f"${GIT_DIR_ENV} is {'unset' if not os.environ.get(GIT_DIR_ENV) else 'not a directory'}: set it to a "
            "clone or mirror of https://github.com/NVIDIA/Megatron-LM (with tags core_v0.16.1 and core_v0.19.0) "
            "to run the Megatron-LM tests"
        )
    return value


def installed_core_version() -> tuple[int, int]:
    """(major, minor) of the installed megatron-core distribution, without importing it."""
    major, minor = importlib.metadata.version("megatron-core").split(".")[:2]
    return int(major), int(minor)


def tag_for_installed_core() -> str:
    """The Megatron-LM tag matching the installed megatron-core; pytest.skip if none is supported."""
    import pytest

    version = installed_core_version()
    if version not in TAGS:
        pytest.skip(f"megatron-core {version[0]}.{version[1]}: no Megatron-LM tag is tested with it ({TAGS})")
    return TAGS[version]


def commit_of(tag: str, git_dir_: str) -> str:
    proc = subprocess.run(["git", "--git-dir", git_dir_, "rev-parse", f"{tag}^{{commit}}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{git_dir_}: no tag {tag} ({proc.stderr.strip()})")
    return proc.stdout.strip()


def export_tree(tag: str, out: Path, git_dir_: Optional[str] = None, paths: tuple[str, ...] = TREE_PATHS) -> Path:
    """Write ``paths`` of Megatron-LM at ``tag`` under ``out`` (``git archive | tar -x``); returns ``out``.

    A finished export leaves ``out/.megatron-lm-export`` naming the commit; a second call with the
    same tag and paths reuses it.
    """
    git_dir_ = git_dir_ or git_dir()
    if git_dir_ is None:
        raise RuntimeError(f"set ${GIT_DIR_ENV} to a Megatron-LM git directory")
    out = Path(out)
    stamp = out / ".megatron-lm-export"
    want = f"{tag} {commit_of(tag, git_dir_)} {' '.join(paths)}\n"
    if stamp.is_file() and stamp.read_text() == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "--git-dir", git_dir_, "archive", tag, *paths], capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {tag} {' '.join(paths)}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    stamp.write_text(want)
    return out


# --------------------------------------------------------------------------- inside the child


def use_tree(root: str) -> None:
    """Put the Megatron-LM tree ``root`` first on ``sys.path`` (call before anything imports megatron).

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
    parser = argparse.ArgumentParser(description="Export a Megatron-LM tree from $MEGATRON_LM_GIT_DIR")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help=f"write {', '.join(TREE_PATHS)} of TAG under OUT")
    p.add_argument("tag")
    p.add_argument("out", type=Path)
    p.add_argument("--git-dir", default=None, help=f"default ${GIT_DIR_ENV}")
    args = parser.parse_args(argv)
    print(export_tree(args.tag, args.out, args.git_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
