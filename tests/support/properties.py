"""Hypothesis settings of the property-based bad-input tests (issue 24): bounded, deterministic,
no example database on disk, no per-example deadline (the first call of a shape builds a table)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def bounded(max_examples: int):
    """``@bounded(n)``: at most ``n`` examples, the same ones every run (CI stays reproducible)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
