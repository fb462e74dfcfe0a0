"""Parameter counts and the closing table."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Counts:
    """Running parameter counts (elements, not bytes)."""

    dense_params: int = 0
    moe_params: int = 0
    inactive_params: int = (
        0  # routed-expert params a token does not use: (E-k)/E of each MoE layer's experts
    )
    moe_layers: int = 0
    dense_layers: int = 0
    expert_params: int = 0  # one expert of one layer
    bytes_written: int = 0
    bytes_planned: int = 0  # the tensors to write (the output's size on disk, before DCP metadata)
    peak_bytes: int = 0  # working memory of the write above the interpreter (plan.peak_memory)

    @property
    def active_params(self) -> int:
        return self.moe_params - self.inactive_params


def _fmt(n: int) -> str:
    """``1.236 B (1,235,814,400)``: rounded, then exact."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f} {unit} ({n:,})"
    return str(n)


def format_bytes(n: int) -> str:
    """``3.80 GiB``, ``412.5 MiB``, ``20.1 KiB``: the largest binary unit that keeps a digit before
    the point."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"


def summary_rows(info, opts, counts: Counts) -> list[tuple[str, str]]:
    F, G = info.ffn_hidden_size, opts.granularity
    rows = [
        ("source", f"{info.source_kind}: {info.path}"),
        ("layers", f"{info.num_layers} ({counts.moe_layers} MoE, {counts.dense_layers} dense)"),
        (
            "experts",
            f"{opts.num_experts} per MoE layer, top-{opts.moe_router_topk}, granularity {G} "
            f"({opts.num_experts // G} copies of the dense FFN)",
        ),
        (
            "expert size",
            f"ffn hidden {F // G} (dense {F}), {_fmt(counts.expert_params)} params each",
        ),
        ("shared expert", f"ffn hidden {F}" if opts.shared_expert else "none"),
        ("router init", opts.router_init),
        ("weight scaling", opts.weight_scaling),
        ("noise std / drop ratio", f"{opts.expert_noise_std} / {opts.drop_upcycling_ratio}"),
        ("params dense", _fmt(counts.dense_params)),
        ("params MoE (total)", _fmt(counts.moe_params)),
        ("params MoE (active/token)", _fmt(counts.active_params)),
    ]
    if counts.bytes_planned:
        rows.append(("output tensors (disk)", format_bytes(counts.bytes_planned)))
    if counts.peak_bytes:
        rows.append(
            (
                "memory to convert",
                f"about {format_bytes(counts.peak_bytes)} above the "
                "interpreter (one source layer + 4x the largest write unit)",
            )
        )
    if counts.bytes_written:
        rows.append(("written", format_bytes(counts.bytes_written)))
    return rows


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(width)} | {v}" for k, v in rows), line])
