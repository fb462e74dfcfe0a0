"""The quickstart's ``--out``: it replaces what an earlier quickstart wrote there, nothing else.

Before writing anything, a launch records the paths it is about to write (relative to ``--out``) in
the marker file :data:`MARKER`. A later launch may replace a path only if the marker lists it: a
user's own files beside the outputs (``runs/my-experiment`` with TensorBoard logs, notes, another
tool's checkpoint) are never removed or overwritten. A non-empty directory without the marker is
refused unless ``--force``; even then an output path that already exists and is not listed is
refused by name instead of replaced (``--force`` only lets the quickstart write next to foreign
files). Paths are never followed through a symbolic link (a link named like an output is refused).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable

MARKER = ".megatron-dpsl-quickstart.json"


def _read_marker(out: str) -> list[str] | None:
    """The paths the marker of ``out`` lists, or None when there is no marker."""
    path = os.path.join(out, MARKER)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            written = json.load(f)["written"]
        if not isinstance(written, list) or not all(isinstance(p, str) for p in written):
            raise ValueError("'written' is not a list of paths")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"--out {out}: its marker {MARKER} is unreadable ({err}); remove the marker only if "
            "everything in the directory may be replaced, or choose another --out"
        ) from None
    return written


def _through_link(out: str, rel: str) -> str | None:
    """The first component of ``out/rel`` (below ``out``) that is a symbolic link, or None."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if os.path.islink(os.path.join(out, sub)):
            return sub
    return None


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def claim(out: str, paths: Iterable[str], *, force: bool = False) -> None:
    """Make ``out`` ready for a launch that writes ``paths`` (relative, ``/``-separated).

    Removes those of ``paths`` that an earlier launch recorded, records ``paths`` in the marker and
    creates ``out``. ``ValueError`` starting with ``--out`` (and nothing removed) when ``out`` is a
    file, is non-empty without the marker and ``force`` is off, or holds one of ``paths`` that no
    launch recorded (or reaches it through a symbolic link).
    """
    paths = sorted(set(paths))
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")
    recorded = _read_marker(out) if os.path.isdir(out) else None
    if recorded is None and os.path.isdir(out) and os.listdir(out) and not force:
        raise ValueError(
            f"--out {out}: not empty and not written by the quickstart (no {MARKER}); choose a new "
            "or empty directory, or add --force to write beside its files (they are never replaced)"
        )
    owned = set(recorded or ())
    for rel in paths:
        link = _through_link(out, rel)
        if link is not None:
            raise ValueError(
                f"--out {out}: {link} is a symbolic link; the quickstart does not write through "
                "links"
            )
        if os.path.lexists(os.path.join(out, rel)) and rel not in owned:
            raise ValueError(
                f"--out {out}: {rel} exists and was not written by the quickstart; move it away or "
                "choose another --out (nothing was changed)"
            )
    os.makedirs(out, exist_ok=True)
    # the record comes first: a launch that dies half-way can still be replaced by the next one
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
        json.dump({"written": sorted(owned | set(paths))}, f, indent=1)
    for rel in paths:
        _remove(os.path.join(out, rel))
