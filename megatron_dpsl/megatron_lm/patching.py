"""Apply ``patches/`` to a Megatron-LM checkout, refusing any file that differs from the pinned release.

``patches/upstream.lock`` (JSON) records the Megatron-LM tag and commit the patches were written
against and, per patched file, the sha256 of the original and of the patched result. ``apply``
first hashes every target: the original hash means "apply", the patched hash means "already
applied", anything else is drift and stops the run before any file is touched. Then every patch is
dry-run (``patch --dry-run``) and only then applied.

    python -m megatron_dpsl.megatron_lm.patching apply /path/to/Megatron-LM      # or scripts/apply_megatron_patches.sh
    python -m megatron_dpsl.megatron_lm.patching status /path/to/Megatron-LM
    python -m megatron_dpsl.megatron_lm.patching export-originals --git-dir DIR OUT   # originals, from git
    python -m megatron_dpsl.megatron_lm.patching lock --git-dir DIR                   # rewrite upstream.lock
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

DEFAULT_PATCHES_DIR = Path(__file__).resolve().parents[2] / "patches"
LOCK_NAME = "upstream.lock"
# Where the search tool's `fetch` leaves the Megatron-LM mirror on the project's machines.
DEFAULT_MIRROR_GIT_DIR = "/work/.mirror/NVIDIA+Megatron-LM/repo"


class PatchError(RuntimeError):
    """A patch cannot be applied: drift from the pinned release, a failed dry run, a missing file."""


@dataclasses.dataclass(frozen=True)
class PatchedFile:
    path: str  # relative to the Megatron-LM root, e.g. "megatron/training/arguments.py"
    patch: str  # file name in patches/
    sha256: str  # the original at the pinned commit
    patched_sha256: str  # the result of applying the patch to it


@dataclasses.dataclass(frozen=True)
class Lock:
    repository: str
    tag: str
    commit: str
    files: tuple[PatchedFile, ...]

    @classmethod
    def load(cls, patches_dir: Path = DEFAULT_PATCHES_DIR) -> "Lock":
        path = Path(patches_dir) / LOCK_NAME
        if not path.is_file():
            raise PatchError(f"{path}: no lock file (run from a clone of megatron-dpsl, or pass --patches-dir)")
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            repository=data["repository"],
            tag=data["tag"],
            commit=data["commit"],
            files=tuple(PatchedFile(**f) for f in data["files"]),
        )

    def dump(self, patches_dir: Path = DEFAULT_PATCHES_DIR) -> None:
        data = dataclasses.asdict(self)
        data["files"] = [dataclasses.asdict(f) for f in self.files]
        (Path(patches_dir) / LOCK_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_states(root: Path, lock: Lock) -> dict[str, str]:
    """``{path: "original" | "patched" | "missing" | "drift"}`` for every file the patches touch."""
    states = {}
    for f in lock.files:
        target = Path(root) / f.path
        if not target.is_file():
            states[f.path] = "missing"
            continue
        digest = sha256_of(target)
        states[f.path] = {f.sha256: "original", f.patched_sha256: "patched"}.get(digest, "drift")
    return states


def _run_patch(root: Path, patch_file: Path, dry_run: bool) -> None:
    if shutil.which("patch") is None:
        raise PatchError("GNU patch is not installed (apt-get install patch)")
    cmd = ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-r", "-", "-d", str(root), "-i", str(patch_file)]
    if dry_run:
        cmd.insert(1, "--dry-run")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PatchError(f"{patch_file.name}: patch {'--dry-run ' if dry_run else ''}failed:\n{proc.stdout}{proc.stderr}")


def apply_patches(root: Path, patches_dir: Path = DEFAULT_PATCHES_DIR, check_only: bool = False) -> dict[str, str]:
    """Apply the patches to the Megatron-LM tree at ``root``; returns ``{path: what happened}``.

    Raises ``PatchError`` naming every drifted or missing file before touching anything.
    """
    root, patches_dir = Path(root), Path(patches_dir)
    lock = Lock.load(patches_dir)
    states = file_states(root, lock)
    bad = {p: s for p, s in states.items() if s in ("drift", "missing")}
    if bad:
        expected = {f.path: f.sha256 for f in lock.files}
        lines = [
            f"  {p}: {s}" + (f" (sha256 {sha256_of(root / p)}, expected {expected[p]})" if s == "drift" else "")
            for p, s in bad.items()
        ]
        raise PatchError(
            f"Megatron-LM at {root} is not {lock.tag} ({lock.commit[:12]}); these files differ from the release the "
            f"patches were written for:\n" + "\n".join(lines) + f"\nCheck out {lock.tag} (git checkout {lock.commit}) "
            "or port the patches (patches/README.md)."
        )
    todo = [f for f in lock.files if states[f.path] == "original"]
    for f in todo:
        _run_patch(root, patches_dir / f.patch, dry_run=True)
    result = {f.path: "already applied" for f in lock.files if states[f.path] == "patched"}
    for f in todo:
        if check_only:
            result[f.path] = "would apply"
            continue
        _run_patch(root, patches_dir / f.patch, dry_run=False)
        if sha256_of(root / f.path) != f.patched_sha256:
            raise PatchError(f"{f.path}: patched file's sha256 differs from {LOCK_NAME}; the patch and lock disagree")
        result[f.path] = "applied"
    return result


# ---------------------------------------------------------------------------------------------
# Originals from a local git directory (tests, lock generation); nothing is downloaded.


def default_git_dir() -> str:
    return os.environ.get("MEGATRON_LM_GIT_DIR", DEFAULT_MIRROR_GIT_DIR)


def git_show(git_dir: str, commit: str, path: str) -> bytes:
    proc = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{commit}:{path}"], capture_output=True)
    if proc.returncode != 0:
        raise PatchError(f"git --git-dir {git_dir} show {commit}:{path} failed: {proc.stderr.decode().strip()}")
    return proc.stdout


def export_originals(git_dir: str, out: Path, lock: Lock, extra_paths: tuple[str, ...] = ()) -> Path:
    """Write the pinned commit's originals of the patched files (and ``extra_paths``, files or
    directories) under ``out``, checking each patched file against the lock."""
    out = Path(out)
    for f in lock.files:
        data = git_show(git_dir, lock.commit, f.path)
        digest = hashlib.sha256(data).hexdigest()
        if digest != f.sha256:
            raise PatchError(f"{f.path}: sha256 at {lock.commit[:12]} in {git_dir} is {digest}, lock says {f.sha256}")
        (out / f.path).parent.mkdir(parents=True, exist_ok=True)
        (out / f.path).write_bytes(data)
    if extra_paths:
        archive = subprocess.run(
            ["git", "--git-dir", str(git_dir), "archive", lock.commit, *extra_paths], capture_output=True
        )
        if archive.returncode != 0:
            raise PatchError(f"git archive {lock.commit} {' '.join(extra_paths)}: {archive.stderr.decode().strip()}")
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def write_lock(git_dir: str, patches_dir: Path = DEFAULT_PATCHES_DIR, tag: Optional[str] = None) -> Lock:
    """Recompute ``upstream.lock`` from ``git_dir`` at ``tag`` (default: the lock's tag)."""
    old = Lock.load(patches_dir)
    tag = tag or old.tag
    commit = subprocess.run(
        ["git", "--git-dir", str(git_dir), "rev-parse", f"{tag}^{{commit}}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in old.files:
            data = git_show(git_dir, commit, f.path)
            (Path(tmp) / f.path).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / f.path).write_bytes(data)
            _run_patch(Path(tmp), Path(patches_dir) / f.patch, dry_run=False)
            files.append(
                PatchedFile(f.path, f.patch, hashlib.sha256(data).hexdigest(), sha256_of(Path(tmp) / f.path))
            )
    lock = Lock(old.repository, tag, commit, tuple(files))
    lock.dump(patches_dir)
    return lock


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_dpsl.megatron_lm.patching", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches-dir", type=Path, default=DEFAULT_PATCHES_DIR)
    sub = parser.add_subparsers(dest="command", required=True)
    p_apply = sub.add_parser("apply", help="check hashes, dry-run, then apply the patches")
    p_apply.add_argument("megatron_lm", type=Path, help="root of the Megatron-LM checkout")
    p_apply.add_argument("--check", action="store_true", help="only check (hashes and dry run), change nothing")
    p_status = sub.add_parser("status", help="original / patched / drift for each target file")
    p_status.add_argument("megatron_lm", type=Path)
    p_export = sub.add_parser("export-originals", help="write the pinned originals from a local git dir")
    p_export.add_argument("out", type=Path)
    p_export.add_argument("--git-dir", default=default_git_dir())
    p_lock = sub.add_parser("lock", help="recompute upstream.lock from a local git dir")
    p_lock.add_argument("--git-dir", default=default_git_dir())
    p_lock.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "apply":
            for path, what in apply_patches(args.megatron_lm, args.patches_dir, check_only=args.check).items():
                print(f"{what:>16}  {path}")
        elif args.command == "status":
            for path, state in file_states(args.megatron_lm, Lock.load(args.patches_dir)).items():
                print(f"{state:>8}  {path}")
        elif args.command == "export-originals":
            export_originals(args.git_dir, args.out, Lock.load(args.patches_dir))
            print(args.out)
        elif args.command == "lock":
            lock = write_lock(args.git_dir, args.patches_dir, args.tag)
            print(f"{args.patches_dir / LOCK_NAME}: {lock.tag} {lock.commit}")
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
