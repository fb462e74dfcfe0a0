"""Command-line errors in one line: range checks for numeric flags (a ``ValueError`` naming the
flag and the range) and an ``ArgumentParser`` whose own errors are one line too.

Shared by the trainer's ``validate_args``, the quickstart's up-front checks and the CLIs' parsers.
NaN and infinities are never in range (argparse's ``float`` accepts ``nan`` and ``inf``).
"""

from __future__ import annotations

import argparse
import math


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a parse error is the one line ``PROG: error: MESSAGE`` (exit code 2, as
    argparse): the full usage of a parser with dozens of flags buries the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "finite"


def check_number(
    flag: str,
    value,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
    note: str = "",
) -> None:
    """``ValueError("{flag}: must be ... got value")`` unless ``value`` is a finite number in range.

    ``lo``/``hi`` are inclusive bounds unless ``lo_open``/``hi_open``; ``integer`` also requires an
    int; ``note`` (why the range) is appended to the message.
    """
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        kind = "an integer" if integer else "a finite number"
        rng = _range_text(lo, hi, lo_open, hi_open)
        what = kind if rng == "finite" else f"{kind} {rng}"
        raise ValueError(f"{flag}: must be {what}, got {value!r}" + (f" ({note})" if note else ""))
