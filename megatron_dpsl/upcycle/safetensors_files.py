"""The safetensors files of a Hugging Face directory, opened once and memory-mapped: which file
holds each tensor, its shape and dtype without reading it, and the tensor itself.

Damage is reported as one :class:`UpcycleError` naming the file: a truncated or corrupt file, an
index (``model.safetensors.index.json``) that is not JSON or names a shard that is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.files import read_json

INDEX = "model.safetensors.index.json"
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:  # noqa: BLE001  SafetensorError, OSError: the file is damaged
        raise UpcycleError(f"{file}: not a readable safetensors file ({exc})") from None


def _index_files(root: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index; every shard it names must exist."""
    index = read_json(root / INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise UpcycleError(f"{root / INDEX}: no 'weight_map' object")
    files = {name: root / str(file) for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise UpcycleError(
                f"{root / INDEX} names shard {file.name}, which is missing from {root}"
            )
    return files


class SafetensorsFiles:
    """Every tensor of ``root``'s safetensors files (through the index when there is one)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if (self.root / INDEX).is_file():
            self.file_of = _index_files(self.root)
            self._handles = {f: _open(f) for f in sorted(set(self.file_of.values()))}
        else:
            self.file_of = {}
            self._handles = {f: _open(f) for f in sorted(self.root.glob("*.safetensors"))}
            for file, handle in self._handles.items():
                self.file_of.update({name: file for name in handle.keys()})
        for name, file in self.file_of.items():
            if name not in self._handles[file].keys():
                raise UpcycleError(
                    f"{self.root / INDEX} places {name} in {file.name}, which lacks it"
                )

    @property
    def files(self) -> list[Path]:
        return sorted(self._handles)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> list[str]:
        return list(self.file_of)

    def _file(self, name: str) -> Path:
        if name not in self.file_of:
            raise UpcycleError(f"{self.root}: tensor {name!r} missing from the safetensors files")
        return self.file_of[name]

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor with ``name``'s shape and dtype (nothing read)."""
        file = self._file(name)
        sl = self._handles[file].get_slice(name)
        dtype = DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise UpcycleError(
                f"{file}: {name} has dtype {sl.get_dtype()}; supported: {tuple(DTYPES)}"
            )
        return torch.empty(sl.get_shape(), dtype=dtype, device="meta")

    def get(self, name: str) -> torch.Tensor:
        """The tensor; NaN or inf in it stops the conversion (damaged bytes would be copied)."""
        file = self._file(name)
        try:
            tensor = self._handles[file].get_tensor(name)
        except Exception as exc:  # noqa: BLE001
            raise UpcycleError(f"{file}: cannot read {name} ({exc})") from None
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UpcycleError(f"{file}: tensor {name} holds NaN or inf; the source is damaged")
        return tensor

    def close(self) -> None:
        self._handles.clear()
