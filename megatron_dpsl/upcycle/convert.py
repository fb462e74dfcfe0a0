"""``upcycle(src, dst, **options)``: dense checkpoint -> Megatron-LM-layout MoE ``torch_dist``
checkpoint."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import torch

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.hf import HFDenseSource, is_hf_checkpoint
from megatron_dpsl.upcycle.layers import LayerPlan, layer_parts, layer_pieces
from megatron_dpsl.upcycle.llava import check_vision_options
from megatron_dpsl.upcycle.megatron_args import FRESH_START, complete_args, moe_fields
from megatron_dpsl.upcycle.options import UpcycleOptions
from megatron_dpsl.upcycle.ownership import Leftover, sweep
from megatron_dpsl.upcycle.pieces import Piece, describe
from megatron_dpsl.upcycle.source import DenseModelInfo
from megatron_dpsl.upcycle.summary import Counts, format_table, summary_rows
from megatron_dpsl.upcycle.transforms import weight_scales
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


def open_source(src: Path, activation: str | None = None):
    """A Megatron ``torch_dist`` or HF checkpoint, picked by what the directory holds."""
    src = Path(src)
    if src.is_dir() and is_hf_checkpoint(src):
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
    from tqdm import tqdm

    info: DenseModelInfo = source.info
    opts.check_source(info)
    if not opts.dry_run and os.path.lexists(dst) and not opts.force:  # fail before hashing/planning
        raise UpcycleError(f"output {dst} exists; pass --force to overwrite it")
    moe_layers = [False] * info.num_layers if dense else opts.moe_layers(info.num_layers)
    stacked = dense or (all(moe_layers) and isinstance(opts.moe_layer_freq, int))
    scales = weight_scales(
        opts.weight_scaling,
        num_experts=opts.num_experts,
        granularity=opts.granularity,
        topk=opts.moe_router_topk,
        gated=info.gated_linear_unit,
        activation=info.activation,
        pre_softmax=opts.moe_router_pre_softmax,
        shared_expert=opts.shared_expert,
    )
    router_std = opts.router_init_std
    if router_std is None:
        router_std = float(getattr(info.args, "init_method_std", None) or 0.02)
    counts = Counts()
    F, G, H = info.ffn_hidden_size, opts.granularity, info.hidden_size
    fc1_rows = (2 if info.gated_linear_unit else 1) * F // G
    counts.expert_params = fc1_rows * H + H * F // G + fc1_rows * info.fc1_bias + H * info.fc2_bias

    layer_cache: dict = {"key": None, "weights": None}

    def layer_weights(layer: int, meta: bool):
        # the parts of one layer are written back to back: read each source layer once per pass
        if layer_cache["key"] != (layer, meta):
            layer_cache["weights"] = None
            layer_cache["weights"] = source.read_layer(layer, meta=meta)
            layer_cache["key"] = (layer, meta)
        return layer_cache["weights"]

    def plan_of(layer: int) -> LayerPlan:
        return LayerPlan(
            layer=layer,
            num_layers=info.num_layers,
            stacked=stacked,
            moe=moe_layers[layer],
            num_experts=opts.num_experts,
            granularity=G,
            gated=info.gated_linear_unit,
            scales=scales,
            router_init=opts.router_init,
            router_std=router_std,
            noise_std=opts.expert_noise_std,
            drop_ratio=opts.drop_upcycling_ratio,
            shared_expert=opts.shared_expert,
            seed=opts.seed,
            router_bias=bool(getattr(info.args, "add_bias_linear", info.fc2_bias)),
        )

    def pieces_for(group, meta: bool) -> list[Piece]:
        """Write unit ``group``: ("global", key) one non-layer tensor, ("objects",) all non-layer
        objects, (layer, part) one part of a layer (layers.layer_parts)."""
        if group[0] == "global":
            pieces = source.global_pieces(meta=meta, key=group[1])
        elif group[0] == "objects":
            pieces = [p for p in source.global_pieces(meta=True) if p.is_object]
        else:
            layer, part = group
            pieces = layer_pieces(plan_of(layer), layer_weights(layer, meta), part)
        # a LLaVA source yields the language model's keys without their "language_model." prefix
        rename = getattr(source, "output_key", None)
        return [dataclasses.replace(p, key=rename(p.key)) for p in pieces] if rename else pieces

    # plan every chunk from shapes (meta tensors): keys, shapes and counts without reading weights
    groups = [("global", p.key) for p in source.global_pieces(meta=True) if not p.is_object] + [
        ("objects",)
    ]
    for layer in range(info.num_layers):
        groups += [(layer, part) for part in layer_parts(plan_of(layer))]
    planned = []
    for group in groups:
        pieces = pieces_for(group, meta=True)
        planned.append((group, pieces))
        for p in pieces:
            # pre_mlp_layernorm.* aliases mlp.linear_fc1.layer_norm_* (see layers.py): count once
            if not p.is_object and ".pre_mlp_layernorm." not in p.key:
                counts.moe_params += p.numel
                if group[0] == "global":
                    counts.dense_params += p.numel
        if isinstance(group[0], int) and group[1] == "base":
            w = layer_weights(group[0], True)
            counts.dense_params += sum(t.numel() for t in (*w.other.values(), *w.mlp.values()))
            if moe_layers[group[0]]:
                counts.moe_layers += 1
                counts.inactive_params += (
                    opts.num_experts - opts.moe_router_topk
                ) * counts.expert_params
            else:
                counts.dense_layers += 1

    args, filled = output_args(source, opts, dense)
    # temporary directories of earlier runs of this output that were killed too hard to clean up
    leftovers = sweep(dst, remove=not opts.dry_run) if dst is not None else []
    for leftover in leftovers:  # now, not at the end: the conversion may take hours, or fail
        print(f"megatron-dpsl-upcycle: {leftover.message()}", file=sys.stderr)
    if opts.dry_run:
        if dst is not None and os.path.lexists(dst) and not opts.force:
            print(f"note: {dst} exists; a real run needs --force", file=sys.stderr)
        lines = _merge_lines([describe(p) for _, ps in planned for p in ps if not p.is_object])
        table = format_table(summary_rows(info, opts, counts))
        return UpcycleResult(
            None, counts, _record(info, opts, None, counts, filled), table, lines, leftovers
        )

    src_hash = source.content_hash()
    common = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 0,
        "num_floating_point_operations_so_far": 0,
    }
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
                lambda g: pieces_for(g, meta=False),
                common,
                on_group=lambda g: (
                    bar.update(1) if isinstance(g[0], int) and g[1] == "base" else None
                ),
            )
        (tmp / "latest_checkpointed_iteration.txt").write_text(STEP)
        record = _record(info, opts, src_hash, counts, filled)
        (tmp / CONFIG_JSON).write_text(json.dumps(record, indent=2, default=str) + "\n")
    table = format_table(summary_rows(info, opts, counts))
    return UpcycleResult(dst, counts, record, table, leftovers=leftovers)


def _merge_lines(lines: list[str]) -> list[str]:
    """Collapse the per-layer/per-expert chunks of one key into one line with its global shape."""
    seen: dict[str, str] = {}
    for line in lines:
        key = line.split("  ", 1)[0]
        seen[key] = line
    return list(seen.values())
