"""Writing the upcycled ``torch_dist`` checkpoint layer by layer, and placing it atomically.

All chunks are planned first from shapes (a pass over meta tensors); DCP then asks for each chunk
in plan order, and the chunks of one write unit ("group": one non-layer tensor, a layer's
non-expert part, or one expert) are computed when the first of them is asked for. Peak memory is
one source layer plus one group's pieces.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from megatron_dpsl.upcycle.dcp_io import (
    piece_payload,
    save_lazily,
    write_item_for,
    write_megatron_common,
)
from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.ownership import OLD_INFIX, OWNER_FILE, TMP_INFIX, write_owner
from megatron_dpsl.upcycle.pieces import Piece

# What Megatron-LM 0.16 passes as content metadata (training/checkpointing.py
# _build_sharded_state_dict_metadata): loaders rebuild their sharded state dict with these flags.
CONTENT_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


class _ChunkProducer:
    """Hands DCP each planned chunk when the writer reaches it: objects from the plan, tensors from
    ``materialise(group)``, called once per write unit (the previous unit is released first).
    An exception while building is kept, since DCP wraps it, and re-raised as itself."""

    def __init__(self, planned, materialise, on_group):
        self.materialise, self.on_group = materialise, on_group
        self.items, self.where, self.objects, self.shapes = [], {}, {}, {}
        for group, pieces in planned:
            for pos, piece in enumerate(pieces):
                item = write_item_for(piece)
                if item.index in self.where or item.index in self.objects:
                    raise UpcycleError(f"internal: chunk {item.index} planned twice")
                if piece.is_object:
                    self.objects[item.index] = piece_payload(piece)
                else:
                    self.where[item.index] = (group, pos)
                    self.shapes[item.index] = tuple(piece.data.shape)
                self.items.append(item)
        self.group, self.pieces, self.error = object(), None, None

    def __call__(self, index):
        try:
            return self._produce(index)
        except BaseException as exc:
            self.error = exc
            raise

    def _produce(self, index):
        if index in self.objects:
            return self.objects[index]
        group, pos = self.where[index]
        if self.group != group:
            self.pieces = None  # release the previous layer before building the next
            self.pieces = self.materialise(group)
            self.group = group
            if self.on_group is not None:
                self.on_group(group)
        piece = self.pieces[pos]
        if tuple(piece.data.shape) != self.shapes[index]:
            raise UpcycleError(
                f"internal: {index.fqn} planned {self.shapes[index]}, produced "
                f"{tuple(piece.data.shape)}"
            )
        return piece_payload(piece)


def write_torch_dist(
    step_dir: Path,
    planned: list[tuple[Hashable, list[Piece]]],
    materialise: Callable[[Hashable], list[Piece]],
    common: dict[str, Any],
    on_group: Callable[[Hashable], None] | None = None,
) -> int:
    """Write a Megatron ``torch_dist`` checkpoint into the new directory ``step_dir``.

    ``planned``: ``(group, pieces)`` with meta tensors (shapes/dtypes) in write order; objects carry
    their real payloads. ``materialise(group)`` returns the same pieces with real tensors.
    Returns the bytes written.
    """
    step_dir = Path(step_dir)
    step_dir.mkdir(parents=True)
    produce = _ChunkProducer(planned, materialise, on_group)
    try:
        save_lazily(step_dir, produce.items, produce)
    except BaseException:  # DCP's CheckpointException derives from BaseException
        if produce.error is not None:  # e.g. KeyboardInterrupt or an UpcycleError in a layer
            raise produce.error from None
        raise
    produce.pieces = None
    write_megatron_common(step_dir, common, CONTENT_METADATA)
    return sum(f.stat().st_size for f in step_dir.iterdir() if f.is_file())


@contextlib.contextmanager
def atomic_directory(target: Path, force: bool = False):
    """Yield a fresh temporary directory next to ``target``; rename it to ``target`` on success.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and
    ``target`` is untouched; while it exists it holds an owner record (ownership.py) so that a run
    killed too hard to clean up is recognised and swept by the next one. An existing ``target`` is
    replaced only with ``force``: it is renamed aside first and deleted after the new one is in
    place, so no moment leaves a half-written target.
    """
    target = Path(target).absolute()
    if (
        os.path.lexists(target) and not force
    ):  # lexists: a dangling symlink is an existing target too
        raise UpcycleError(f"output {target} exists; pass --force to overwrite it")
    if not target.parent.is_dir():
        raise UpcycleError(f"output parent directory {target.parent} does not exist")
    tmp = target.parent / f".{target.name}{TMP_INFIX}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_owner(
            tmp, target
        )  # a SIGKILL leaves tmp behind: the record lets the next run remove it
        yield tmp
        (tmp / OWNER_FILE).unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if os.path.lexists(target):
            old = target.parent / f".{target.name}{OLD_INFIX}{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException as exc:
        # put the old target back and drop the new checkpoint: the target stays as it was
        if old is not None and os.path.lexists(old) and not os.path.lexists(target):
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UpcycleError(
                f"could not move the new checkpoint into place at {target}: {exc}"
            ) from exc
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
