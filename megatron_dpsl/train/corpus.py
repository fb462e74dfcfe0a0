"""A small byte-level, two-modality corpus built from text that ships with the machine.

Group 0 ("code"): Python standard-library sources (``sysconfig.get_paths()["stdlib"]/**/*.py``).
Group 1 ("prose"): English licence / copyright / documentation text: Debian's
``/usr/share/common-licenses/*`` and ``/usr/share/doc/*/copyright``, Python's ``LICENSE.txt``, the
licence files of installed packages (``site-packages/*.dist-info``); topped up, where those are
scarce (e.g. a non-Debian machine), with the docstrings of standard-library modules
(``ast.get_docstring``).

Every byte is one token (vocabulary 256, ``0`` separates documents, NUL never occurs in text) and
carries its document's group id, so the router can be shaped by a per-modality prior. The sample is
deterministic for a given machine and ``seed``: paths are sorted, shuffled with
    ``random.Random(seed)``,
split into train/valid by document, and taken until each group's byte budget is met.

On disk (``build_corpus(out_dir)``): ``{train,valid}_tokens.bin`` and ``{train,valid}_groups.bin``
(uint8, same length) and ``meta.json`` (sources, byte counts, group names).
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import json
import os
import random
import site
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

GROUP_NAMES = ("code", "prose")
EOD = 0
"""Document separator token (NUL never occurs in the text sources)."""
VOCAB_SIZE = 256


@dataclass(frozen=True)
class Document:
    source: str
    group: int
    data: bytes


def _read_text(path: str, max_bytes: int) -> bytes | None:
    """File bytes if they look like text (UTF-8, no NUL, mostly printable), else None."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes)
    except OSError:
        return None
    if not data or b"\x00" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in data[:4096])
    return data if printable >= 0.97 * min(len(data), 4096) else None


def code_paths() -> list[str]:
    """Standard-library ``*.py`` files (tests and vendored packages skipped), sorted."""
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = []
    for path in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, stdlib)
        if (
            rel.startswith(("site-packages", "test", "idlelib", "lib2to3/tests"))
            or "/tests/" in rel
        ):
            continue
        paths.append(path)
    return sorted(paths)


def prose_paths() -> list[str]:
    """English licence/copyright text files present on this machine, sorted."""
    stdlib = sysconfig.get_paths()["stdlib"]
    patterns = [
        "/usr/share/common-licenses/*",
        "/usr/share/doc/*/copyright",
        os.path.join(stdlib, "LICENSE*"),
    ]
    site_dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    site_dirs.append(sysconfig.get_paths()["purelib"])
    for d in sorted(set(site_dirs)):
        patterns += [
            os.path.join(d, "*.dist-info", "LICEN[CS]E*"),
            os.path.join(d, "*.dist-info", "licenses", "*"),
        ]
    paths = set()
    for pattern in patterns:
        paths.update(p for p in glob.glob(pattern) if os.path.isfile(p))
    return sorted(paths)


def _docstrings(paths: Iterable[str], max_bytes: int) -> Iterable[Document]:
    """Module docstrings of standard-library files: English prose on any OS (the fallback
    source)."""
    for path in paths:
        raw = _read_text(path, 1 << 20)
        if raw is None:
            continue
        try:
            doc = ast.get_docstring(ast.parse(raw))
        except (SyntaxError, ValueError):
            continue
        if doc and len(doc) > 400:
            yield Document(
                source=f"docstring:{path}", group=1, data=doc.encode("utf-8")[:max_bytes]
            )


def _take(docs: Iterable[Document], budget: int, seen: set) -> list[Document]:
    out, total = [], 0
    for doc in docs:
        digest = hashlib.sha1(doc.data).digest()
        if digest in seen:  # Debian ships many identical copyright files
            continue
        seen.add(digest)
        out.append(doc)
        total += len(doc.data) + 1
        if total >= budget:
            break
    return out


def collect_documents(
    bytes_per_group: int, seed: int = 1234, max_doc_bytes: int = 32768
) -> dict[int, list[Document]]:
    """Deterministic sample of ``~bytes_per_group`` bytes of documents for each group."""
    rng = random.Random(seed)
    code = code_paths()
    prose = prose_paths()
    rng.shuffle(code)
    rng.shuffle(prose)
    seen: set = set()

    def files(paths, group):
        for path in paths:
            data = _read_text(path, max_doc_bytes)
            if data is not None and len(data) >= 256:
                yield Document(source=path, group=group, data=data)

    code_docs = _take(files(code, 0), bytes_per_group, seen)
    prose_docs = _take(files(prose, 1), bytes_per_group, seen)
    short = bytes_per_group - sum(len(d.data) + 1 for d in prose_docs)
    if short > 0:
        prose_docs += _take(_docstrings(code, max_doc_bytes), short, seen)
    if not code_docs or not prose_docs:
        raise RuntimeError(
            f"corpus: found {len(code_docs)} code and {len(prose_docs)} prose documents on "
            "this machine; "
            f"need both (stdlib at {sysconfig.get_paths()['stdlib']!r})"
        )
    return {0: code_docs, 1: prose_docs}


def _pack(docs: Sequence[Document]):
    tokens, groups = [], []
    for doc in docs:
        arr = np.frombuffer(doc.data, dtype=np.uint8)
        tokens += [arr, np.array([EOD], dtype=np.uint8)]
        groups += [np.full(len(arr) + 1, doc.group, dtype=np.uint8)]
    return np.concatenate(tokens), np.concatenate(groups)


def build_corpus(
    out_dir: str, bytes_per_group: int = 1_000_000, valid_fraction: float = 0.1, seed: int = 1234
) -> dict:
    """Write the corpus to ``out_dir`` (see module docstring) and return its ``meta.json``
    content."""
    docs = collect_documents(bytes_per_group, seed=seed)
    rng = random.Random(seed + 1)
    splits: dict[str, list[Document]] = {"train": [], "valid": []}
    for group_docs in docs.values():
        # valid takes whole documents until it holds valid_fraction of the group's bytes
        budget, n_valid = valid_fraction * sum(len(d.data) for d in group_docs), 0
        while (
            n_valid < len(group_docs) - 1
            and sum(len(d.data) for d in group_docs[:n_valid]) < budget
        ):
            n_valid += 1
        n_valid = max(1, n_valid)
        splits["valid"] += group_docs[:n_valid]
        splits["train"] += group_docs[n_valid:] or group_docs[:1]
    os.makedirs(out_dir, exist_ok=True)
    meta = {
        "vocab_size": VOCAB_SIZE,
        "eod": EOD,
        "group_names": list(GROUP_NAMES),
        "seed": seed,
        "splits": {},
    }
    for split, split_docs in splits.items():
        rng.shuffle(split_docs)  # interleave modalities so any window may mix them
        tokens, groups = _pack(split_docs)
        tokens.tofile(os.path.join(out_dir, f"{split}_tokens.bin"))
        groups.tofile(os.path.join(out_dir, f"{split}_groups.bin"))
        meta["splits"][split] = {
            "num_tokens": int(tokens.size),
            "tokens_per_group": [int((groups == g).sum()) for g in range(len(GROUP_NAMES))],
            "num_documents": len(split_docs),
            "sources": sorted({d.source for d in split_docs})[:50],
        }
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--bytes-per-group", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    meta = build_corpus(a.out, a.bytes_per_group, seed=a.seed)
    for split, m in meta["splits"].items():
        print(
            f"{split}: {m['num_tokens']} tokens, per group "
            f"{dict(zip(GROUP_NAMES, m['tokens_per_group']))}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
