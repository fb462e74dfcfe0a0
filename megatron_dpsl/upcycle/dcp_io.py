"""Chunk-level reads and lazy writes of PyTorch-DCP checkpoints (the ``torch_dist`` format of
Megatron-Core's ``dist_checkpointing``), through DCP's public storage reader/writer and planner
interfaces. No process group and no megatron-core are needed.

Why not ``dist_checkpointing.load/save``: Megatron converts sharded tensors to torch ShardedTensors
assuming a regular grid whose other fragments live on other ranks; in one process that forbids
reading or writing "layer l of the [L, ...] tensor" alone, which streaming needs.

Megatron's conventions reproduced here: a ``ShardedTensor`` is stored under its key with its global
shape and one chunk per saved shard; a ``ShardedObject`` is a BYTE_IO entry named
``<key>/shard_<offset>_<shape>`` (dot-joined) holding ``torch.save([payload])``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.pieces import Piece

# dist_checkpointing's metadata.json for a torch_dist checkpoint (CheckpointingConfig)
MEGATRON_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def object_name(key: str, offset: Iterable[int], shape: Iterable[int]) -> str:
    """Megatron's ``ShardedObject.unique_key``."""
    return f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}"


def parse_object_name(name: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    key, shard = name.rsplit("/", 1)
    _, offset, shape = shard.split("_")
    return key, tuple(int(x) for x in offset.split(".")), tuple(int(x) for x in shape.split("."))


class _ChunkLoadPlanner(LoadPlanner):
    """Reads explicit regions: ``tensors[name] = (fqn, offsets, destination)``, ``objects[name] =
    fqn``."""

    def __init__(
        self, tensors: dict[str, tuple[str, tuple[int, ...], torch.Tensor]], objects: dict[str, str]
    ):
        self.tensors, self.objects = tensors, objects
        self.loaded_objects: dict[str, Any] = {}
        self._dest: dict[str, torch.Tensor] = {}
        self._obj_names: dict[str, str] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for name, (fqn, offsets, dest) in self.tensors.items():
            md = self.metadata.state_dict_metadata[fqn]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            # dest_index names our request; storage_index (set by the helper) names the stored chunk
            for item in create_read_items_for_chunk_list(fqn, md, [chunk]):
                items.append(
                    ReadItem(
                        type=item.type,
                        dest_index=MetadataIndex(name, item.dest_index.offset),
                        dest_offsets=item.dest_offsets,
                        storage_index=item.storage_index,
                        storage_offsets=item.storage_offsets,
                        lengths=item.lengths,
                    )
                )
            self._dest[name] = dest
        for name, fqn in self.objects.items():
            items.append(
                ReadItem(
                    type=LoadItemType.BYTE_IO,
                    dest_index=MetadataIndex(name),
                    dest_offsets=torch.Size((0,)),
                    storage_index=MetadataIndex(fqn),
                    storage_offsets=torch.Size((0,)),
                    lengths=torch.Size((0,)),
                )
            )
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        value.seek(0)
        # Megatron saves the list of this rank's shards of the object (one, for a unique key)
        data = torch.load(value, map_location="cpu", weights_only=False)
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        self.loaded_objects[read_item.dest_index.fqn] = data

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self._dest[read_item.dest_index.fqn]
        for dim, (off, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, off, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor returned a view of the destination: already in place


class DcpReader:
    """A DCP checkpoint directory opened once; ``read`` fetches chunks into fresh tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._reader = FileSystemReader(str(self.path))
        try:
            self.metadata: Metadata = self._reader.read_metadata()
        except Exception as exc:  # noqa: BLE001  a truncated or foreign .metadata pickle
            raise UpcycleError(f"{self.path / '.metadata'}: unreadable ({exc})") from None
        self._reader.set_up_storage_reader(self.metadata, True)

    def tensor_entries(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        return {
            k: (v.size, v.properties.dtype)
            for k, v in self.metadata.state_dict_metadata.items()
            if not isinstance(v, BytesStorageMetadata)
        }

    def object_entries(self) -> list[str]:
        return [
            k
            for k, v in self.metadata.state_dict_metadata.items()
            if isinstance(v, BytesStorageMetadata)
        ]

    def read(
        self,
        tensors: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]],
        objects: dict[str, str],
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``tensors[name] = (fqn, offsets, sizes)`` region of a stored tensor; ``objects[name] =
        fqn``."""
        requests = {}
        for name, (fqn, offsets, sizes) in tensors.items():
            dtype = self.metadata.state_dict_metadata[fqn].properties.dtype
            requests[name] = (fqn, offsets, torch.empty(sizes, dtype=dtype))
        if not requests and not objects:
            return {}, {}
        planner = _ChunkLoadPlanner(requests, objects)
        planner.set_up_planner({}, self.metadata, True)
        plan = self._reader.prepare_local_plan(planner.create_local_plan())
        plan = self._reader.prepare_global_plan([plan])[0]
        try:
            self._reader.read_data(plan, planner).wait()
        except Exception as exc:  # noqa: BLE001  truncated or overwritten data files
            files = ", ".join(sorted(p.name for p in self.path.glob("*.distcp")))
            first = next(iter({**tensors, **objects}))
            raise UpcycleError(
                f"{self.path}/{files}: cannot read {first} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
        return {n: d for n, (_, _, d) in requests.items()}, planner.loaded_objects


class _LazySavePlanner(SavePlanner):
    """Plans every chunk up front from shapes; ``produce(index)`` materialises a chunk when the
    writer reaches it, so only the pieces of the layer being written are in memory."""

    def __init__(self, items: list[WriteItem], produce: Callable[[MetadataIndex], Any]):
        self._items, self._produce = items, produce

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self._storage_meta = storage_meta

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self._items)

    def create_global_plan(self, all_plans):
        plans, metadata = create_default_global_save_plan(all_plans, rewrite_index_hints=True)
        metadata.storage_meta = self._storage_meta
        return plans, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        return self._produce(write_item.index)


def write_item_for(piece: Piece) -> WriteItem:
    """The DCP write item of one piece (tensor chunk or Megatron-style object)."""
    if piece.is_object:
        name = object_name(
            piece.key, tuple(i for i, _ in piece.prepend) + piece.obj_offset, piece.global_shape
        )
        return WriteItem(index=MetadataIndex(name), type=WriteItemType.BYTE_IO)
    offsets = torch.Size(tuple(i for i, _ in piece.prepend) + (0,) * piece.data.dim())
    sizes = torch.Size((1,) * len(piece.prepend) + tuple(piece.data.shape))
    props = TensorProperties(dtype=piece.data.dtype)
    return WriteItem(
        index=MetadataIndex(piece.key, offsets),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
            properties=props,
            size=torch.Size(piece.global_shape),
        ),
    )


def piece_payload(piece: Piece):
    """What DCP writes for the piece: the chunk with its prepended unit axes, or torch.save
    bytes."""
    if piece.is_object:
        buf = io.BytesIO()
        torch.save([piece.data], buf)  # Megatron's encoding: a list of the rank's shards
        buf.seek(0)
        return buf
    return piece.data.reshape((1,) * len(piece.prepend) + tuple(piece.data.shape)).contiguous()


def save_lazily(
    path: Path, items: list[WriteItem], produce: Callable[[MetadataIndex], Any]
) -> None:
    """One DCP save into ``path`` (a single data file, written in ``items`` order)."""
    import warnings

    from torch.distributed.checkpoint import save

    writer = FileSystemWriter(
        str(path), single_file_per_rank=True, thread_count=1, sync_files=False
    )
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        save({}, storage_writer=writer, planner=_LazySavePlanner(items, produce), no_dist=True)


def write_megatron_common(path: Path, common: dict, content_metadata: dict) -> None:
    """``common.pt`` (with Megatron's ``content_metadata`` key) and ``metadata.json``."""
    torch.save({**common, "content_metadata": content_metadata}, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps(MEGATRON_CONFIG))
