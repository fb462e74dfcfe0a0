"""Reading a dense Megatron-Core ``torch_dist`` checkpoint one layer at a time.

Each tensor is requested as the region "layer ``l`` of the global tensor" (dcp_io.DcpReader), so
the source's TP/PP layout does not matter: sharded tensors are stored with their global shapes and
DCP reads any region across the stored chunks. Only one layer is materialised at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import torch

from megatron_dpsl.upcycle.dcp_io import DcpReader, parse_object_name
from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.files import load_pickle, read_json
from megatron_dpsl.upcycle.pieces import Piece
from megatron_dpsl.upcycle.source import MLP_WEIGHTS, DenseModelInfo, LayerWeights

TRACKER = "latest_checkpointed_iteration.txt"
COMMON_STATE = "common_state"  # megatron-core 0.19's ShardedObject for the non-tensor state
LAYERS = "decoder.layers."
# Roots of model entries in a Megatron-LM checkpoint; everything else (optimizer., rng_state,
# rerun_state_machine_state, ...) is training state the upcycled checkpoint does not carry.
MODEL_ROOTS = ("embedding.", "decoder.", "output_layer.", "mtp.", "rotary_pos_emb.")


def resolve_step_dir(path: Path) -> tuple[Path, int | None]:
    """Megatron-LM save dir (tracker file) or a bare ``dist_checkpointing`` dir -> (step dir,
    iteration)."""
    if not path.exists():
        raise UpcycleError(f"source {path} does not exist")
    if not path.is_dir():
        raise UpcycleError(f"source {path} is a file; expected a checkpoint directory")
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            return path / "release", None
        if not text.isdigit():
            raise UpcycleError(
                f"{tracker} holds {text!r}; expected an iteration number or 'release'"
            )
        step = path / f"iter_{int(text):07d}"
        if not step.is_dir():
            raise UpcycleError(f"{tracker} points at {step.name}, which does not exist")
        return step, int(text)
    if (path / "metadata.json").is_file():
        match = re.fullmatch(r"iter_(\d{7})", path.name)
        return path, int(match.group(1)) if match else None
    if any(path.glob("mp_rank_*")):  # the legacy per-rank 'torch' format (legacy.py)
        match = re.fullmatch(r"iter_(\d{7})", path.name)
        return path, int(match.group(1)) if match else None
    raise UpcycleError(
        f"{path} is not a checkpoint: expected {TRACKER} (Megatron-LM save dir), metadata.json "
        "(torch_dist step dir) or config.json + *.safetensors (Hugging Face)"
    )


def hash_files(root: Path, files: list[Path]) -> str:
    """sha256 over relative names and bytes, in sorted order (1 MiB reads)."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(str(file.relative_to(root)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _activation_from_args(args: argparse.Namespace | None, glu: bool) -> str:
    """Megatron-LM flags -> activation name (``--swiglu``, ``--quick-geglu``,
    ``--squared-relu``)."""
    if args is None:
        return "silu" if glu else "gelu"  # Megatron's defaults for the two shapes
    if getattr(args, "swiglu", False):
        return "silu"
    if getattr(args, "quick_geglu", False):
        return "quick_gelu"
    if getattr(args, "squared_relu", False):
        return "squared_relu"
    if glu:
        raise UpcycleError(
            "unknown activation: fc1 is gated (2x ffn_hidden_size rows) but the checkpoint args "
            "set "
            "none of swiglu/quick_geglu; supported: silu (swiglu), quick_gelu, gelu, squared_relu"
        )
    return "gelu"


def dense_model_info(
    *, path: Path, num_layers: int, meta_of, args, iteration, activation
) -> DenseModelInfo:
    """The dense model's shape from layer 0's MLP; ``meta_of(layer, name)`` gives the (per-layer
    shape, dtype) of a layer entry or None. ``args``: the checkpoint's Megatron-LM args or None."""
    fc1 = meta_of(0, "mlp.linear_fc1.weight")
    fc2 = meta_of(0, "mlp.linear_fc2.weight")
    if fc1 is None or fc2 is None:
        raise UpcycleError(
            f"{path}: layer 0 has no mlp.linear_fc1/linear_fc2 weights (not a dense GPT MLP)"
        )
    fc1_shape, fc2_shape = fc1[0], fc2[0]
    hidden, ffn = fc2_shape[0], fc2_shape[1]
    if fc1_shape[0] not in (ffn, 2 * ffn) or fc1_shape[1] != hidden:
        raise UpcycleError(
            f"fc1 {list(fc1_shape)} and fc2 {list(fc2_shape)} shapes do not form an MLP"
        )
    glu = fc1_shape[0] == 2 * ffn
    if args is not None and getattr(args, "num_experts", None):
        raise UpcycleError(
            f"source is already an MoE checkpoint (args.num_experts={args.num_experts})"
        )
    act = activation or _activation_from_args(args, glu)
    if args is None:
        args = argparse.Namespace(
            num_layers=num_layers,
            hidden_size=hidden,
            ffn_hidden_size=ffn,
            swiglu=glu and act == "silu",
        )
    return DenseModelInfo(
        source_kind="megatron",
        path=path,
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        gated_linear_unit=glu,
        activation=act,
        fc1_bias=meta_of(0, "mlp.linear_fc1.bias") is not None,
        fc2_bias=meta_of(0, "mlp.linear_fc2.bias") is not None,
        dtype=fc1[1],
        args=args,
        iteration=iteration,
    )


class MegatronDenseSource:
    """A dense GPTModel ``torch_dist`` checkpoint (any TP/PP layout), streamed layer by layer."""

    def __init__(self, path: Path, activation: str | None = None):
        self.root = Path(path)
        self.step_dir, iteration = resolve_step_dir(self.root)
        meta_file = self.step_dir / "metadata.json"
        if not meta_file.is_file() and any(self.step_dir.glob("mp_rank_*")):
            raise UpcycleError(
                f"{self.step_dir} is a legacy 'torch' format checkpoint (mp_rank_*/) of a model "
                "other "
                "than LLaVA; convert it to torch_dist first (Megatron-LM: --ckpt-convert-format "
                "torch_dist)"
            )
        if not meta_file.is_file():
            raise UpcycleError(
                f"{self.step_dir} has no metadata.json: not a dist_checkpointing checkpoint"
            )
        meta = read_json(meta_file)
        backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
        if backend != "torch_dist":
            raise UpcycleError(
                f"{self.step_dir} uses sharded_backend={backend!r}; only 'torch_dist' is supported"
            )
        if not (self.step_dir / ".metadata").is_file():
            raise UpcycleError(f"{self.step_dir} has no .metadata: not a torch_dist checkpoint")
        self._dcp = DcpReader(self.step_dir)
        common = self._common_state()
        args = common.get("args") if isinstance(common, dict) else None
        if (
            iteration is None
            and isinstance(common, dict)
            and isinstance(common.get("iteration"), int)
        ):
            iteration = common["iteration"]
        self._index()
        self.info = self._infer_info(args, iteration, activation)

    def _common_state(self) -> dict:
        """The non-tensor state (``args``, ``iteration``, ...): ``common.pt`` (megatron-core <=
        0.16), or the ``common_state`` object inside the DCP checkpoint (megatron-core 0.19 saves it
        there)."""
        common_file = self.step_dir / "common.pt"
        if common_file.is_file():
            return load_pickle(common_file)
        names = [n for n in self._dcp.object_entries() if parse_object_name(n)[0] == COMMON_STATE]
        if not names:
            return {}
        return self._dcp.read({}, {names[0]: names[0]})[1][names[0]]

    # -- indexing -------------------------------------------------------------------------------
    def _index(self) -> None:
        tensors = self._dcp.tensor_entries()
        embed = [
            k
            for k in tensors
            if k.endswith("embedding.word_embeddings.weight") and not k.startswith("optimizer")
        ]
        if not embed:
            raise UpcycleError(
                f"{self.step_dir} holds no 'embedding.word_embeddings.weight': not a GPTModel "
                "checkpoint"
            )
        self.prefix = min(embed, key=len)[: -len("embedding.word_embeddings.weight")]

        def model_key(k: str) -> str | None:
            if not k.startswith(self.prefix):
                return None
            rel = k[len(self.prefix) :]
            return rel if rel.startswith(MODEL_ROOTS) else None

        # stacked: 'decoder.layers.<name>' with a leading [num_layers] axis;
        # per-layer: 'decoder.layers.<i>.<name>' (Megatron's non-homogeneous layout)
        self.stacked: dict[str, tuple] = {}
        self.per_layer: dict[int, dict[str, tuple]] = {}
        self.globals: dict[str, tuple] = {}
        for key, (size, dtype) in tensors.items():
            if (rel := model_key(key)) is not None:
                self._place(
                    rel, (key, tuple(size), dtype), self.stacked, self.per_layer, self.globals
                )
        self.stacked_obj: dict[str, list] = {}
        self.per_layer_obj: dict[int, dict[str, list]] = {}
        self.global_obj: dict[str, list] = {}
        for name in self._dcp.object_entries():
            key, offset, shape = parse_object_name(name)
            if (rel := model_key(key)) is None:
                continue
            target = self._place(
                rel, [], self.stacked_obj, self.per_layer_obj, self.global_obj, append=True
            )
            target.append((name, offset, shape))
        everything = [*self.stacked, *self.per_layer.get(0, {}), *self.stacked_obj]
        moe = [
            k
            for k in everything
            if k.startswith(("mlp.experts", "mlp.router", "mlp.shared_experts"))
        ]
        if moe:
            raise UpcycleError(
                f"source is already an MoE checkpoint (found decoder.layers.{moe[0]}); upcycle a "
                "dense model"
            )

    @staticmethod
    def _place(rel, entry, stacked, per_layer, globals_, append=False):
        if rel.startswith(LAYERS):
            head, _, name = rel[len(LAYERS) :].partition(".")
            if head.isdigit():
                target, name = per_layer.setdefault(int(head), {}), name
            else:
                target, name = stacked, rel[len(LAYERS) :]
        else:
            target, name = globals_, rel
        if append:
            return target.setdefault(name, [])
        target[name] = entry
        return entry

    def _infer_info(self, args, iteration, activation) -> DenseModelInfo:
        if self.stacked:
            num_layers = next(iter(self.stacked.values()))[1][0]
        elif self.per_layer:
            num_layers = max(self.per_layer) + 1
        else:
            raise UpcycleError(f"{self.step_dir} holds no 'decoder.layers.*' tensors")
        return dense_model_info(
            path=self.step_dir,
            num_layers=num_layers,
            meta_of=self._meta_of,
            args=args,
            iteration=iteration,
            activation=activation,
        )

    def _meta_of(self, layer: int, name: str):
        """(per-layer shape, dtype) of ``name`` in ``layer`` or None."""
        if name in self.stacked:
            _, size, dtype = self.stacked[name]
            return size[1:], dtype
        entry = self.per_layer.get(layer, {}).get(name)
        return None if entry is None else (entry[1], entry[2])

    # -- reading --------------------------------------------------------------------------------
    def global_pieces(self, meta: bool = False, key: str | None = None) -> list[Piece]:
        if (
            key is not None
        ):  # one tensor alone (the writer materialises non-layer tensors one by one)
            fqn, size, dtype = self.globals[key]
            if meta:
                return [Piece(key, torch.empty(size, dtype=dtype, device="meta"))]
            tensors, _ = self._dcp.read({key: (fqn, (0,) * len(size), size)}, {})
            return [Piece(key, tensors[key])]
        request = {
            rel: (key, (0,) * len(size), size) for rel, (key, size, _) in self.globals.items()
        }
        objects = {name: name for shards in self.global_obj.values() for name, _, _ in shards}
        if meta:
            tensors = {
                rel: torch.empty(size, dtype=dtype, device="meta")
                for rel, (_, size, dtype) in self.globals.items()
            }
            _, payloads = self._dcp.read({}, objects)
        else:
            tensors, payloads = self._dcp.read(request, objects)
        pieces = [Piece(rel, tensors[rel]) for rel in self.globals]
        for rel, shards in self.global_obj.items():
            for name, offset, shape in shards:
                pieces.append(
                    Piece(rel, payloads[name], is_object=True, obj_shape=shape, obj_offset=offset)
                )
        return pieces

    def read_layer(self, layer: int, meta: bool = False) -> LayerWeights:
        """Tensors of ``layer`` (meta tensors if ``meta``); object payloads are always read
        (small)."""
        num_layers = self.info.num_layers
        request: dict[str, tuple] = {}
        shapes: dict[str, tuple] = {}
        for name, (key, size, dtype) in self.stacked.items():
            request[name] = (key, (layer,) + (0,) * (len(size) - 1), (1,) + size[1:])
            shapes[name] = (size[1:], dtype)
        for name, (key, size, dtype) in self.per_layer.get(layer, {}).items():
            request[name] = (key, (0,) * len(size), size)
            shapes[name] = (size, dtype)
        objects: dict[str, str] = {}
        for name, shards in self.stacked_obj.items():
            for fqn, offset, shape in shards:
                if offset[0] == layer and shape[0] == num_layers:
                    objects[name] = fqn
        for name, shards in self.per_layer_obj.get(layer, {}).items():
            objects[name] = shards[0][0]
        if meta:
            _, payloads = self._dcp.read({}, objects)
            tensors = {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in shapes.items()}
        else:
            loaded, payloads = self._dcp.read(request, objects)
            tensors = {n: t.reshape(shapes[n][0]) for n, t in loaded.items()}
        weights = LayerWeights(other={}, other_objects={}, mlp={})
        for name, tensor in tensors.items():
            if name.startswith("mlp."):
                if name[4:] not in MLP_WEIGHTS:
                    raise UpcycleError(
                        f"unsupported dense MLP entry decoder.layers.{name} (expected "
                        f"{MLP_WEIGHTS})"
                    )
                weights.mlp[name[4:]] = tensor
            else:
                weights.other[name] = tensor
        for name, payload in payloads.items():
            if not name.startswith("mlp."):
                weights.other_objects[name] = payload
        return weights

    def content_hash(self) -> str:
        files = [p for p in self.step_dir.rglob("*") if p.is_file()]
        return hash_files(self.step_dir, files)

    def close(self) -> None:
        pass
