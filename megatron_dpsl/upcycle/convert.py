"""``upcycle(src, dst, **options)``: dense checkpoint -> Megatron-LM-layout MoE ``torch_dist``
checkpoint."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.flags import megatron_lm_flags, not_restored
from megatron_dpsl.upcycle.hf import HFDenseSource, is_hf_checkpoint
from megatron_dpsl.upcycle.llava import check_vision_options
from megatron_dpsl.upcycle.megatron_args import FRESH_START, complete_args, moe_fields
from megatron_dpsl.upcycle.options import UpcycleOptions
from megatron_dpsl.upcycle.ownership import Leftover, sweep
from megatron_dpsl.upcycle.pieces import describe
from megatron_dpsl.upcycle.plan import LayerCache, conversion_shape, pieces_for, plan_conversion
from megatron_dpsl.upcycle.source import DenseModelInfo
from megatron_dpsl.upcycle.summary import Counts, format_table, summary_rows
from megatron_dpsl.upcycle.writer import atomic_directory, write_torch_dist

CONFIG_JSON = "upcycle_config.json"
# Megatron-LM loads a 'release' checkpoint from iteration 0 without optimizer/RNG state
STEP = "release"


@dataclasses.dataclass
class UpcycleResult:
    """What ``upcycle`` did: the output path (None for a dry run), counts, the JSON record."""

    output: Path | None
    counts: Counts
    record: dict
    table: str
    pieces: list[str] = dataclasses.field(default_factory=list)
    leftovers: list[Leftover] = dataclasses.field(default_factory=list)
    """Temporary directories of the same output from earlier runs: removed if provably dead, else
    reported."""
    flags: list[str] = dataclasses.field(default_factory=list)
    """Megatron-LM flags that build the output's model (flags.py)."""

    def flags_text(self) -> str:
        """The flags as the CLI prints them, and those ``--use-checkpoint-args`` does not
        restore."""
        text = "Megatron-LM flags of this model:\n  " + shlex.join(self.flags)
        kept = not_restored(self.flags)
        if kept:
            text += "\nwith --use-checkpoint-args, still pass:\n  " + shlex.join(kept)
        return text


def open_source(src: Path, activation: str | None = None):
    """A Megatron ``torch_dist`` or HF checkpoint, picked by what the directory holds."""
    src = Path(src)
    if src.is_dir() and is_hf_checkpoint(src):
        from megatron_dpsl.upcycle.llava_hf import open_hf_llava

        llava = open_hf_llava(src)
        if llava is not None:
            return llava
        if activation not in (None, "silu"):
            raise UpcycleError(f"--activation {activation!r} conflicts with the HF config (silu)")
        return HFDenseSource(src)
    from megatron_dpsl.upcycle.llava_megatron import open_megatron

    return open_megatron(src, activation=activation)


def source_shapes(source) -> dict[str, tuple[int, ...]]:
    """Global shapes of the source's non-layer tensors and of layer 0's (under ``layer.``), from
    metadata."""
    shapes = {
        p.key: tuple(p.data.shape) for p in source.global_pieces(meta=True) if not p.is_object
    }
    layer = source.read_layer(0, meta=True)
    shapes.update({f"layer.{k}": tuple(t.shape) for k, t in layer.other.items()})
    shapes.update({f"layer.mlp.{k}": tuple(t.shape) for k, t in layer.mlp.items()})
    return shapes


def output_args(source, opts: UpcycleOptions, dense: bool = False) -> tuple[object, dict]:
    """The Megatron-LM args written into ``common.pt`` (megatron_args.py), and the fields filled in
    because the source's args lacked them."""
    info: DenseModelInfo = source.info
    args, filled = complete_args(
        info.args,
        source_shapes(source),
        num_layers=info.num_layers,
        activation=info.activation,
        dtype=info.dtype,
    )
    if opts.seq_length is not None:
        args.seq_length = opts.seq_length
    if dense:
        return args, filled
    freq = opts.moe_layer_freq
    if isinstance(freq, list) and all(freq):
        freq = 1  # an all-ones list would switch Megatron to the per-layer key layout
    updates = moe_fields(
        num_experts=opts.num_experts,
        moe_ffn_hidden_size=info.ffn_hidden_size // opts.granularity,
        moe_router_topk=opts.moe_router_topk,
        moe_layer_freq=freq,
        moe_shared_expert_intermediate_size=info.ffn_hidden_size if opts.shared_expert else None,
        moe_router_pre_softmax=opts.moe_router_pre_softmax,
        moe_router_score_function=opts.moe_router_score_function,
        granularity=opts.granularity,
    )
    for k, v in {**updates, **FRESH_START}.items():
        setattr(args, k, v)
    return args, filled


def _record(info, opts, src_hash, counts, filled) -> dict:
    return {
        "tool": "megatron-dpsl-upcycle",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "kind": info.source_kind,
            "path": str(info.path),
            "sha256": src_hash,
            "iteration": info.iteration,
        },
        "options": dataclasses.asdict(opts),
        "dense": {
            "num_layers": info.num_layers,
            "hidden_size": info.hidden_size,
            "ffn_hidden_size": info.ffn_hidden_size,
            "gated_linear_unit": info.gated_linear_unit,
            "activation": info.activation,
            "dtype": str(info.dtype).replace("torch.", ""),
        },
        "counts": dataclasses.asdict(counts) | {"active_params": counts.active_params},
        # Megatron-LM args the source lacked, filled from the tensors or Megatron-LM's defaults
        "args_filled_in": {
            k: str(v) if isinstance(v, torch.dtype) else v for k, v in filled.items()
        },
    }


def upcycle(src, dst=None, **options) -> UpcycleResult:
    """Convert the dense checkpoint at ``src`` into an MoE checkpoint at ``dst``.

    ``options`` are the fields of :class:`UpcycleOptions`. Output (Megatron-LM layout):
    ``dst/latest_checkpointed_iteration.txt`` ("release"), ``dst/release/`` (torch_dist: model
    tensors + ``common.pt`` with the updated ``args``), ``dst/upcycle_config.json``.
    Raises :class:`UpcycleError` for bad input; ``dst`` is created atomically.
    """
    opts = UpcycleOptions(**options)
    if dst is None and not opts.dry_run:
        raise UpcycleError("an output directory is required (or --dry-run)")
    _check_output_keeps_source(Path(src), None if dst is None else Path(dst))
    source = open_source(Path(src), activation=opts.activation)
    try:
        check_vision_options(source, opts)
        return _run(source, Path(dst) if dst is not None else None, opts)
    finally:
        source.close()


def convert_dense(src, dst, *, force: bool = False, progress: bool = True) -> UpcycleResult:
    """Write ``src`` (HF or Megatron) unchanged as a dense Megatron-LM-layout ``torch_dist``
    checkpoint.

    The G=1, no-expert path of the same reader/writer: checks the HF -> Megatron mapping on its own.
    """
    opts = UpcycleOptions(num_experts=1, moe_router_topk=1, force=force, progress=progress)
    _check_output_keeps_source(Path(src), Path(dst))
    source = open_source(Path(src))
    try:
        return _run(source, Path(dst), opts, dense=True)
    finally:
        source.close()


def _check_output_keeps_source(src: Path, dst: Path | None) -> None:
    """Refuse an output that is, or contains, the source: replacing it (``--force``) would delete
    the source."""
    if dst is None:
        return
    src_r, dst_r = src.resolve(), dst.resolve()
    if src_r == dst_r or dst_r in src_r.parents:
        raise UpcycleError(
            f"--output {dst} is or contains --source {src}: writing there would replace the "
            "source; "
            "choose another output directory"
        )


def _run(source, dst, opts: UpcycleOptions, dense: bool = False) -> UpcycleResult:
    """Plan (shapes only) -> check (options against the source, the output) -> write."""
    shape = conversion_shape(source.info, opts, dense)
    _check_output_free(dst, opts)  # before hashing and planning
    planned, counts = plan_conversion(source, shape)
    args, filled = output_args(source, opts, dense)
    # temporary directories of earlier runs of this output that were killed too hard to clean up
    leftovers = sweep(dst, remove=not opts.dry_run) if dst is not None else []
    for leftover in leftovers:  # now, not at the end: the conversion may take hours, or fail
        print(f"megatron-dpsl-upcycle: {leftover.message()}", file=sys.stderr)
    if opts.dry_run:
        return _dry_run_result(source.info, opts, counts, filled, planned, leftovers, dst, args)
    record = _write(source, shape, planned, counts, args, filled, dst)
    table = format_table(summary_rows(source.info, opts, counts))
    return UpcycleResult(
        dst, counts, record, table, leftovers=leftovers, flags=megatron_lm_flags(args)
    )


def _check_output_free(dst, opts: UpcycleOptions) -> None:
    if not opts.dry_run and os.path.lexists(dst) and not opts.force:
        raise UpcycleError(f"output {dst} exists; pass --force to overwrite it")


def _dry_run_result(info, opts, counts, filled, planned, leftovers, dst, args) -> UpcycleResult:
    if dst is not None and os.path.lexists(dst) and not opts.force:
        print(f"note: {dst} exists; a real run needs --force", file=sys.stderr)
    lines = _merge_lines([describe(p) for _, ps in planned for p in ps if not p.is_object])
    table = format_table(summary_rows(info, opts, counts))
    record = _record(info, opts, None, counts, filled)
    return UpcycleResult(None, counts, record, table, lines, leftovers, megatron_lm_flags(args))


def _write(source, shape, planned, counts, args, filled, dst) -> dict:
    """Write into a temporary directory renamed into place at the end (writer.atomic_directory)."""
    from tqdm import tqdm

    info, opts = source.info, shape.opts
    src_hash = source.content_hash()
    common = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 0,
        "num_floating_point_operations_so_far": 0,
    }
    cache = LayerCache(source)
    with atomic_directory(dst, force=opts.force) as tmp:
        bar = tqdm(
            total=info.num_layers,
            desc="upcycling layers",
            unit="layer",
            disable=not opts.progress,
            file=sys.stderr,
        )
        with bar:
            counts.bytes_written = write_torch_dist(
                tmp / STEP,
                planned,
                lambda g: pieces_for(source, shape, cache, g, meta=False),
                common,
                on_group=lambda g: (
                    bar.update(1) if isinstance(g[0], int) and g[1] == "base" else None
                ),
            )
        (tmp / "latest_checkpointed_iteration.txt").write_text(STEP)
        record = _record(info, opts, src_hash, counts, filled)
        (tmp / CONFIG_JSON).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def _merge_lines(lines: list[str]) -> list[str]:
    """Collapse the per-layer/per-expert chunks of one key into one line with its global shape."""
    seen: dict[str, str] = {}
    for line in lines:
        key = line.split("  ", 1)[0]
        seen[key] = line
    return list(seen.values())
