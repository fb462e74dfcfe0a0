"""Apply ``patches/`` to a Megatron-LM checkout, refusing any file that differs from a pinned
release.

``patches/`` holds one patch set per supported Megatron-LM tag (``patches/core_v0.16.1/``,
``patches/core_v0.19.0/``), each with its ``upstream.lock`` (JSON): the tag and commit the patches
were written against and, per patched file, the sha256 of the original and of the patched result.
``apply`` picks the set whose files the checkout has (original or already patched), hashes every
target first (the original hash means "apply", the patched hash "already applied", anything else is
drift and stops the run before any file is touched), then dry-runs every patch (``patch
--dry-run``) and only then applies them.

    # or scripts/apply_megatron_patches.sh
    python -m megatron_dpsl.megatron_lm.patching apply /path/to/Megatron-LM
    python -m megatron_dpsl.megatron_lm.patching status /path/to/Megatron-LM
    python -m megatron_dpsl.megatron_lm.patching export-originals --tag core_v0.19.0 \\
        --git-dir DIR OUT
    # rewrite its upstream.lock
    python -m megatron_dpsl.megatron_lm.patching lock --tag core_v0.19.0 --git-dir DIR

``--git-dir`` (default ``$MEGATRON_LM_GIT_DIR``) is a local clone or mirror of Megatron-LM; nothing
is downloaded.
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

# The patch sets of a clone of megatron-dpsl: patches/<tag>/ (an installed wheel has none; pass
# --patches-dir).
DEFAULT_PATCHES_DIR = Path(__file__).resolve().parents[2] / "patches"
LOCK_NAME = "upstream.lock"
GIT_DIR_ENV = "MEGATRON_LM_GIT_DIR"
REPOSITORY = "https://github.com/NVIDIA/Megatron-LM"


class PatchError(RuntimeError):
    """A patch cannot be applied: drift from the pinned release, a failed dry run, a missing
    file."""


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
    def load(cls, patches_dir: Path) -> Lock:
        """The lock of one patch set (``patches/<tag>``)."""
        path = Path(patches_dir) / LOCK_NAME
        if not path.is_file():
            raise PatchError(
                f"{path}: no lock file (run from a clone of megatron-dpsl, or pass --patches-dir)"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            repository=data["repository"],
            tag=data["tag"],
            commit=data["commit"],
            files=tuple(PatchedFile(**f) for f in data["files"]),
        )

    def dump(self, patches_dir: Path) -> None:
        data = dataclasses.asdict(self)
        data["files"] = [dataclasses.asdict(f) for f in self.files]
        (Path(patches_dir) / LOCK_NAME).write_text(
            json.dumps(data, indent=2) + "\n", encoding="utf-8"
        )


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
    cmd = [
        "patch",
        "-p1",
        "--forward",
        "--batch",
        "--no-backup-if-mismatch",
        "-r",
        "-",
        "-d",
        str(root),
        "-i",
        str(patch_file),
    ]
    if dry_run:
        cmd.insert(1, "--dry-run")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PatchError(
            f"{patch_file.name}: patch "
            f"{'--dry-run ' if dry_run else ''}failed:\n{proc.stdout}{proc.stderr}"
        )


def patch_sets(patches_dir: Path = DEFAULT_PATCHES_DIR) -> list[Path]:
    """The patch sets under ``patches_dir`` (itself, if it holds an ``upstream.lock``), by tag."""
    patches_dir = Path(patches_dir)
    if (patches_dir / LOCK_NAME).is_file():
        return [patches_dir]
    sets = sorted(p.parent for p in patches_dir.glob(f"*/{LOCK_NAME}"))
    if not sets:
        raise PatchError(
            f"{patches_dir}: no patch set (a directory with {LOCK_NAME}); pass --patches-dir"
        )
    return sets


def select_patch_set(root: Path, patches_dir: Path = DEFAULT_PATCHES_DIR) -> tuple[Path, Lock]:
    """The patch set (directory, lock) for the Megatron-LM tree at ``root``.

    The set whose every target file is its original or its patched result; ``PatchError`` naming,
    for each set, the files that differ when none fits (drift from every pinned release).
    """
    reports = []
    for set_dir in patch_sets(patches_dir):
        lock = Lock.load(set_dir)
        states = file_states(root, lock)
        bad = {p: s for p, s in states.items() if s in ("drift", "missing")}
        if not bad:
            return set_dir, lock
        expected = {f.path: f.sha256 for f in lock.files}
        lines = [
            f"    {p}: {s}"
            + (
                f" (sha256 {sha256_of(Path(root) / p)}, expected {expected[p]})"
                if s == "drift"
                else ""
            )
            for p, s in bad.items()
        ]
        reports.append(
            (len(bad), f"  {lock.tag} ({lock.commit[:12]}, {set_dir.name}/):\n" + "\n".join(lines))
        )
    reports.sort(key=lambda r: r[0])  # the closest release first
    raise PatchError(
        f"Megatron-LM at {root} is none of the releases the patches were written for; these "
        "files differ:\n"
        + "\n".join(text for _, text in reports)
        + "\nCheck out one of these tags (git checkout <commit>) or port the patches "
        "(patches/README.md)."
    )


def apply_patches(
    root: Path, patches_dir: Path = DEFAULT_PATCHES_DIR, check_only: bool = False
) -> dict[str, str]:
    """Apply the matching patch set to the Megatron-LM tree at ``root``; returns ``{path: what
    happened}``.

    ``patches_dir``: ``patches/`` (the set is picked by the tree's file hashes) or one set
    (``patches/core_v0.19.0``). Raises ``PatchError`` naming every drifted or missing file before
    touching anything.
    """
    root = Path(root)
    patches_dir, lock = select_patch_set(root, patches_dir)
    states = file_states(root, lock)
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
            raise PatchError(
                f"{f.path}: patched file's sha256 differs from {LOCK_NAME}; the patch and lock "
                "disagree"
            )
        result[f.path] = "applied"
    return result


# ---------------------------------------------------------------------------------------------
# Originals from a local git directory (tests, lock generation); nothing is downloaded.


def default_git_dir() -> str | None:
    """``$MEGATRON_LM_GIT_DIR`` (a local Megatron-LM clone or mirror), or None when unset."""
    return os.environ.get(GIT_DIR_ENV) or None


def git_show(git_dir: str, commit: str, path: str) -> bytes:
    proc = subprocess.run(
        ["git", "--git-dir", str(git_dir), "show", f"{commit}:{path}"], capture_output=True
    )
    if proc.returncode != 0:
        raise PatchError(
            f"git --git-dir {git_dir} show {commit}:{path} failed: {proc.stderr.decode().strip()}"
        )
    return proc.stdout


def export_originals(
    git_dir: str, out: Path, lock: Lock, extra_paths: tuple[str, ...] = ()
) -> Path:
    """Write the pinned commit's originals of the patched files (and ``extra_paths``, files or
    directories) under ``out``, checking each patched file against the lock."""
    out = Path(out)
    for f in lock.files:
        data = git_show(git_dir, lock.commit, f.path)
        digest = hashlib.sha256(data).hexdigest()
        if digest != f.sha256:
            raise PatchError(
                f"{f.path}: sha256 at {lock.commit[:12]} in {git_dir} is {digest}, lock says "
                f"{f.sha256}"
            )
        (out / f.path).parent.mkdir(parents=True, exist_ok=True)
        (out / f.path).write_bytes(data)
    if extra_paths:
        archive = subprocess.run(
            ["git", "--git-dir", str(git_dir), "archive", lock.commit, *extra_paths],
            capture_output=True,
        )
        if archive.returncode != 0:
            raise PatchError(
                f"git archive {lock.commit} {' '.join(extra_paths)}: "
                f"{archive.stderr.decode().strip()}"
            )
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def patched_path(patch_file: Path) -> str:
    """The Megatron-LM file a patch changes (its ``--- a/PATH`` line)."""
    for line in Path(patch_file).read_text(encoding="utf-8").splitlines():
        if line.startswith("--- a/"):
            return line[len("--- a/") :].split("\t")[0]
    raise PatchError(f"{patch_file}: no '--- a/PATH' line")


def write_lock(git_dir: str, patches_dir: Path, tag: str | None = None) -> Lock:
    """(Re)write ``patches_dir/upstream.lock`` from ``git_dir`` at ``tag`` (default: the lock's
    tag).

    The files are those the set's ``*.patch`` change, in patch order; each is taken from git,
    patched in a temporary directory and hashed before and after.
    """
    patches_dir = Path(patches_dir)
    if tag is None:
        tag = Lock.load(patches_dir).tag
    commit = subprocess.run(
        ["git", "--git-dir", str(git_dir), "rev-parse", f"{tag}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        for patch_file in sorted(patches_dir.glob("*.patch")):
            path = patched_path(patch_file)
            data = git_show(git_dir, commit, path)
            (Path(tmp) / path).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / path).write_bytes(data)
            _run_patch(Path(tmp), patch_file, dry_run=False)
            files.append(
                PatchedFile(
                    path,
                    patch_file.name,
                    hashlib.sha256(data).hexdigest(),
                    sha256_of(Path(tmp) / path),
                )
            )
    lock = Lock(REPOSITORY, tag, commit, tuple(files))
    lock.dump(patches_dir)
    return lock


def _set_dir(patches_dir: Path, tag: str | None) -> Path:
    """One set: ``patches_dir/<tag>``, or ``patches_dir`` itself when it is a set."""
    if tag is not None and not (Path(patches_dir) / LOCK_NAME).is_file():
        return Path(patches_dir) / tag
    return Path(patches_dir)


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``apply``, ``status``, ``export-originals`` and ``lock``."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dpsl.megatron_lm.patching",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--patches-dir",
        type=Path,
        default=DEFAULT_PATCHES_DIR,
        help="patches/ (sets per tag) or one set (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_apply = sub.add_parser(
        "apply", help="pick the set, check hashes, dry-run, then apply the patches"
    )
    p_apply.add_argument("megatron_lm", type=Path, help="root of the Megatron-LM checkout")
    p_apply.add_argument(
        "--check", action="store_true", help="only check (hashes and dry run), change nothing"
    )
    p_status = sub.add_parser(
        "status", help="the matching set, and original / patched per target file"
    )
    p_status.add_argument("megatron_lm", type=Path)
    git_help = f"local Megatron-LM git directory (default ${GIT_DIR_ENV})"
    p_export = sub.add_parser(
        "export-originals", help="write a set's pinned originals from a local git dir"
    )
    p_export.add_argument("out", type=Path)
    p_export.add_argument("--tag", required=True, help="the set, e.g. core_v0.19.0")
    p_export.add_argument("--git-dir", default=default_git_dir(), help=git_help)
    p_lock = sub.add_parser("lock", help="(re)write a set's upstream.lock from a local git dir")
    p_lock.add_argument(
        "--tag", required=True, help="the set and the Megatron-LM tag, e.g. core_v0.19.0"
    )
    p_lock.add_argument("--git-dir", default=default_git_dir(), help=git_help)
    return parser


def _run(args: argparse.Namespace) -> None:
    """Run one parsed command, printing what it did (raises ``PatchError``)."""
    if args.command == "apply":
        for path, what in apply_patches(
            args.megatron_lm, args.patches_dir, check_only=args.check
        ).items():
            print(f"{what:>16}  {path}")
    elif args.command == "status":
        set_dir, lock = select_patch_set(args.megatron_lm, args.patches_dir)
        print(f"{lock.tag} ({set_dir})")
        for path, state in file_states(args.megatron_lm, lock).items():
            print(f"{state:>8}  {path}")
    elif args.command == "export-originals":
        export_originals(args.git_dir, args.out, Lock.load(_set_dir(args.patches_dir, args.tag)))
        print(args.out)
    elif args.command == "lock":
        set_dir = _set_dir(args.patches_dir, args.tag)
        lock = write_lock(args.git_dir, set_dir, args.tag)
        print(f"{set_dir / LOCK_NAME}: {lock.tag} {lock.commit}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("export-originals", "lock") and not args.git_dir:
        parser.error(f"--git-dir: give a local Megatron-LM git directory (or set ${GIT_DIR_ENV})")
    try:
        _run(args)
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
