"""Megatron-LM's legacy ``torch`` checkpoint format read as global tensors.

``--ckpt-format torch`` (what upstream's ``pretrain_vlm.py`` requires) saves one
``iter_XXXXXXX/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` per model-parallel rank
(``get_checkpoint_name``, megatron/training/checkpointing.py), each holding ``{"model":
state_dict, "args", "iteration", ...}`` with that rank's tensor-parallel shards under the module
names (``language_model.decoder.layers.3.mlp.linear_fc1.weight``). A global tensor is the
concatenation of the TP shards: along dim 0 for column-parallel weights (fused QKV, fc1, the word
embeddings and output layer), dim 1 for row-parallel ones (attention output, fc2), and one copy of
everything else (norms, biases of row-parallel linears, the ViT's patch and position
embeddings), which must be equal on every rank. A gated fc1 holds ``[gate_r; up_r]`` on rank r, so
it is de-interleaved into ``[gate_0..gate_T; up_0..up_T]`` (Megatron's global SwiGLU layout).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.files import load_pickle

CHECKPOINT_FILE = "model_optim_rng.pt"
RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?")
COLUMN_PARALLEL = (
    "linear_qkv.weight",
    "linear_qkv.bias",
    "linear_fc1.weight",
    "linear_fc1.bias",
    "word_embeddings.weight",
    "output_layer.weight",
)
ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def is_legacy_checkpoint(step_dir: Path) -> bool:
    return any(RANK_DIR.fullmatch(p.name) for p in Path(step_dir).glob("mp_rank_*"))


def _tp_dim(key: str) -> int | None:
    if key.endswith(COLUMN_PARALLEL):
        return 0
    if key.endswith(ROW_PARALLEL):
        return 1
    return None


class LegacyShards:
    """The ``model`` state dicts of every TP rank of one step directory, memory-mapped.

    ``tensor(key)`` is the global tensor of ``key`` (module name, as saved); ``shape(key)`` its
    global shape without reading the data; ``objects`` the non-tensor entries (``_extra_state``),
    taken from TP rank 0 (every rank saves the same).
    """

    def __init__(self, step_dir: Path):
        self.step_dir = Path(step_dir)
        ranks = {}
        for path in sorted(self.step_dir.glob("mp_rank_*")):
            match = RANK_DIR.fullmatch(path.name)
            if match is None:
                continue
            if match.group(3) is not None or (match.group(2) is not None and int(match.group(2))):
                raise UpcycleError(
                    f"{path.name}: a pipeline- or expert-parallel legacy checkpoint; only tensor-"
                    "parallel shards (mp_rank_TT or mp_rank_TT_000) are read. Convert it with "
                    "Megatron-LM's --ckpt-convert-format torch_dist first"
                )
            ranks[int(match.group(1))] = path / CHECKPOINT_FILE
        if sorted(ranks) != list(range(len(ranks))):
            raise UpcycleError(
                f"{self.step_dir}: TP ranks {sorted(ranks)} are not 0..{len(ranks) - 1}"
            )
        for file in ranks.values():
            if not file.is_file():
                raise UpcycleError(f"{file.parent} has no {CHECKPOINT_FILE}")
        # Megatron-LM pickles argparse.Namespace and more: only checkpoints the user trusts
        states = [load_pickle(ranks[r], mmap=True) for r in sorted(ranks)]
        if "model" not in states[0]:
            chunks = [k for k in states[0] if re.fullmatch(r"model\d+", str(k))]
            what = "virtual pipeline chunks " + ", ".join(chunks) if chunks else "no 'model' entry"
            raise UpcycleError(f"{ranks[0]}: {what}; expected one 'model' state dict per rank")
        self.models = [s["model"] for s in states]
        keys = list(self.models[0])
        for rank, model in enumerate(self.models[1:], 1):
            if list(model) != keys:
                raise UpcycleError(
                    f"TP rank {rank} holds other keys than rank 0 in {self.step_dir}"
                )
        self.args = states[0].get("args")
        self.iteration = states[0].get("iteration")
        self.files = [ranks[r] for r in sorted(ranks)]
        self.keys = [k for k in keys if torch.is_tensor(self.models[0][k])]
        self.objects = {k: v for k, v in self.models[0].items() if not torch.is_tensor(v)}

    def _shards(self, key: str) -> list[torch.Tensor]:
        return [m[key] for m in self.models]

    def _gated(self, key: str) -> bool:
        """Is ``...linear_fc1.{weight,bias}`` the fc1 of a gated MLP (rows = 2x fc2's columns)?"""
        stem = key.rsplit("linear_fc1.", 1)[0]
        fc1, fc2 = (
            self.models[0].get(stem + "linear_fc1.weight"),
            self.models[0].get(stem + "linear_fc2.weight"),
        )
        return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]

    def shape(self, key: str) -> tuple[int, ...]:
        shards = self._shards(key)
        dim = _tp_dim(key)
        shape = list(shards[0].shape)
        if dim is not None and len(shards) > 1:
            shape[dim] = sum(s.shape[dim] for s in shards)
        return tuple(shape)

    def tensor(self, key: str) -> torch.Tensor:
        shards = self._shards(key)
        if len(shards) == 1:
            return shards[0].clone()
        dim = _tp_dim(key)
        if dim is None:
            for rank, shard in enumerate(shards[1:], 1):
                if not torch.equal(shard, shards[0]):
                    raise UpcycleError(
                        f"{key} differs between TP ranks 0 and {rank} but is not a tensor-parallel "
                        "weight this reader knows how to concatenate"
                    )
            return shards[0].clone()
        if "linear_fc1." in key and self._gated(key):
            halves = [s.chunk(2, dim=0) for s in shards]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        return torch.cat(shards, dim=dim)

    def content_files(self) -> list[Path]:
        return list(self.files)
