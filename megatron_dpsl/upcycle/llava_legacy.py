"""A Megatron-LM LLaVA saved in the legacy per-rank ``torch`` format, as an upcycling source.

The TP shards are merged by :class:`~megatron_dpsl.upcycle.legacy.LegacyShards`; the language
model is served layer by layer like a ``torch_dist`` one, and the ViT and projector pass through
under the keys Megatron-Core's ``sharded_state_dict`` gives them (the ``[L, ...]`` layer stack of
``decoder.layers.<name>``). State-dict names are the sharded names for LLaVA's specs: neither
``decoder_model_with_*_default_spec`` nor the ViT specs remap keys.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.legacy import LegacyShards
from megatron_dpsl.upcycle.llava import LM_PREFIX, PASSTHROUGH_ROOTS, LlavaSource, vision_info
from megatron_dpsl.upcycle.pieces import Piece
from megatron_dpsl.upcycle.readers import dense_model_info, hash_files
from megatron_dpsl.upcycle.source import MLP_WEIGHTS, LayerWeights

_LAYER = re.compile(r"(.*decoder\.layers\.)(\d+)\.(.+)")


@dataclasses.dataclass
class _Module:
    """One module tree (``language_model.``, ``vision_model.``, ...) of the state dict."""

    top: dict  # non-layer names -> state-dict key
    layers: dict  # layer index -> {name relative to decoder.layers.<i>. -> state-dict key}
    stack: str = ""  # the 'decoder.layers.' prefix, relative to the module


def _split(keys, root: str) -> _Module:
    mod = _Module(top={}, layers={})
    for key in keys:
        if not key.startswith(root):
            continue
        rel = key[len(root) :]
        match = _LAYER.fullmatch(rel)
        if match:
            mod.stack = match.group(1)
            mod.layers.setdefault(int(match.group(2)), {})[match.group(3)] = key
        else:
            mod.top[rel] = key
    return mod


class LegacyLMSource:
    """The language model of a legacy LLaVA checkpoint (keys relative to ``language_model.``)."""

    def __init__(self, shards: LegacyShards, root: Path, activation: str | None):
        self.shards, self.root = shards, root
        self.mod = _split([*shards.keys, *shards.objects], LM_PREFIX)
        if self.mod.stack != "decoder.layers.":
            raise UpcycleError(f"{shards.step_dir}: no language_model.decoder.layers.* entries")
        num_layers = max(self.mod.layers) + 1
        if sorted(self.mod.layers) != list(range(num_layers)):
            raise UpcycleError(
                f"{shards.step_dir}: language-model layers {sorted(self.mod.layers)} have gaps"
            )
        moe = [
            n
            for n in self.mod.layers[0]
            if n.startswith(("mlp.router", "mlp.experts", "mlp.shared_experts"))
        ]
        if moe:
            raise UpcycleError(
                "source is already an MoE checkpoint (found "
                f"language_model.decoder.layers.0.{moe[0]}); upcycle a dense model"
            )

        def meta_of(layer, name):
            key = self.mod.layers.get(layer, {}).get(name)
            return None if key is None else (shards.shape(key), shards.models[0][key].dtype)

        self.info = dense_model_info(
            path=shards.step_dir,
            num_layers=num_layers,
            meta_of=meta_of,
            args=shards.args,
            iteration=shards.iteration,
            activation=activation,
        )

    def _tensor(self, key: str, meta: bool) -> torch.Tensor:
        if meta:
            return torch.empty(
                self.shards.shape(key), dtype=self.shards.models[0][key].dtype, device="meta"
            )
        return self.shards.tensor(key)

    def global_pieces(self, meta: bool = False, key: str | None = None) -> list[Piece]:
        # the top-level _extra_state (output_layer's) is not in LLaVA's sharded_state_dict
        names = [n for n, k in self.mod.top.items() if k not in self.shards.objects]
        names = [key] if key is not None else names
        return [Piece(n, self._tensor(self.mod.top[n], meta)) for n in names]

    def read_layer(self, layer: int, meta: bool = False) -> LayerWeights:
        weights = LayerWeights(other={}, other_objects={}, mlp={})
        for name, key in self.mod.layers[layer].items():
            if key in self.shards.objects:
                if not name.startswith("mlp."):
                    weights.other_objects[name] = self.shards.objects[key]
            elif name.startswith("mlp."):
                if name[4:] not in MLP_WEIGHTS:
                    raise UpcycleError(
                        f"unsupported dense MLP entry {key} (expected {MLP_WEIGHTS})"
                    )
                weights.mlp[name[4:]] = self._tensor(key, meta)
            else:
                weights.other[name] = self._tensor(key, meta)
        return weights

    def content_hash(self) -> str:
        return hash_files(self.root, self.shards.content_files())

    def close(self) -> None:
        pass


def _passthrough(shards: LegacyShards) -> dict:
    """Sharded key -> producer of the ViT's and projector's pieces, layers stacked ``[L, ...]``."""
    out: dict = {}
    names = [*shards.keys, *shards.objects]
    for root in PASSTHROUGH_ROOTS:
        mod = _split(names, root)
        for rel, key in mod.top.items():
            out[root + rel] = _top_piece(shards, root + rel, key)
        count = len(mod.layers)
        if count and sorted(mod.layers) != list(range(count)):
            raise UpcycleError(f"{shards.step_dir}: {root}layers {sorted(mod.layers)} have gaps")
        for name in mod.layers.get(0, {}):
            keys = [mod.layers[i][name] for i in range(count)]
            out[root + mod.stack + name] = _stacked_piece(shards, root + mod.stack + name, keys)
    return out


def _top_piece(shards, out_key, key):
    if key in shards.objects:
        # a module's own _extra_state: Megatron shards it as a (1,) grid of one object
        return lambda meta: [
            Piece(out_key, shards.objects[key], is_object=True, obj_shape=(1,), obj_offset=(0,))
        ]

    def produce(meta):
        dtype = shards.models[0][key].dtype
        data = (
            torch.empty(shards.shape(key), dtype=dtype, device="meta")
            if meta
            else shards.tensor(key)
        )
        return [Piece(out_key, data)]

    return produce


def _stacked_piece(shards, out_key, keys):
    L = len(keys)
    if keys[0] in shards.objects:
        return lambda meta: [
            Piece(out_key, shards.objects[k], ((i, L),), is_object=True) for i, k in enumerate(keys)
        ]

    def produce(meta):
        dtype = shards.models[0][keys[0]].dtype
        if meta:
            return [
                Piece(out_key, torch.empty((L, *shards.shape(keys[0])), dtype=dtype, device="meta"))
            ]
        return [Piece(out_key, torch.stack([shards.tensor(k) for k in keys]))]

    return produce


def open_legacy_llava(step_dir: Path, root: Path, activation: str | None) -> LlavaSource:
    shards = LegacyShards(step_dir)
    if not any(k.startswith(LM_PREFIX) for k in shards.keys):
        raise UpcycleError(
            f"{step_dir} is a legacy 'torch' checkpoint of a model other than LLaVA; only LLaVA is "
            "read "
            "in this format. Convert it with Megatron-LM's --ckpt-convert-format torch_dist first"
        )
    lm = LegacyLMSource(shards, root, activation)
    passthrough = _passthrough(shards)
    shapes = {
        k: tuple(p.global_shape)
        for k, f in passthrough.items()
        for p in f(True)[:1]
        if not p.is_object
    }
    vision = vision_info(shapes, shards.args, step_dir)
    # the output is torch_dist whatever the source was
    return LlavaSource(
        lm,
        passthrough,
        vision,
        kind="megatron-llava-torch",
        args_update={"ckpt_format": "torch_dist"},
    )
