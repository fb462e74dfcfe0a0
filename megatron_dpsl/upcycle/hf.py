"""A Hugging Face Llama / Qwen2 / Phi-3 decoder (``config.json`` + safetensors) read as a dense
Megatron-Core ``GPTModel``, one layer at a time. Nothing is downloaded; files are memory-mapped.

Mapping (HF -> Megatron-Core GPTModel, local or TE spec; see docs/upcycling.md):

- ``model.embed_tokens.weight`` -> ``embedding.word_embeddings.weight`` ``[V, H]``
- ``layers.i.input_layernorm.weight`` -> ``self_attention.linear_qkv.layer_norm_weight`` (RMSNorm)
- ``q_proj [nh*d, H]``, ``k_proj``/``v_proj [ng*d, H]`` -> ``linear_qkv.weight [(nh+2ng)*d, H]``,
  grouped per query group: ``[q heads of group g (nh/ng*d rows), k_g (d), v_g (d)]`` for g in
  0..ng-1 (Megatron splits the fused projection per group, so GQA needs this interleave); biases
  alike. Phi-3's ``qkv_proj`` is ``[q; k; v]`` rows: split, then grouped the same way.
- ``o_proj`` -> ``linear_proj.weight``
- ``post_attention_layernorm.weight`` -> ``mlp.linear_fc1.layer_norm_weight`` (the pre-MLP norm)
- ``gate_proj``, ``up_proj`` ``[F, H]`` -> ``linear_fc1.weight = cat(gate, up) [2F, H]`` (Megatron's
  SwiGLU computes ``silu(x[:F]) * x[F:]``); Phi-3's ``gate_up_proj`` is that already;
  ``down_proj`` -> ``linear_fc2.weight [H, F]``
- ``model.norm.weight`` -> ``decoder.final_layernorm.weight``; ``lm_head.weight`` ->
  ``output_layer.weight`` unless ``tie_word_embeddings``
- RoPE: HF's rotate-half convention is Megatron's non-interleaved rotary
  (``rotary_interleaved=False``); ``rope_theta`` -> ``rotary_base``, llama3 scaling ->
  ``rope_scaling_factor`` (hf_config.py).

:func:`describe_language_model` (config dict + tensor files -> :class:`HFLanguageModel`) and
:class:`HFLanguageModelReader` serve any checkpoint that holds such a decoder under a prefix
(a vision-language model's ``language_model.model.``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.files import read_json
from megatron_dpsl.upcycle.hf_args import hf_megatron_args
from megatron_dpsl.upcycle.hf_config import HFTextConfig, parse_text_config
from megatron_dpsl.upcycle.pieces import Piece
from megatron_dpsl.upcycle.readers import hash_files
from megatron_dpsl.upcycle.safetensors_files import INDEX, SafetensorsFiles
from megatron_dpsl.upcycle.source import DenseModelInfo, LayerWeights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def is_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / INDEX).is_file()
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFLanguageModel:
    """A decoder found in safetensors files: its config, where its tensors are, the Megatron view.

    ``prefix`` holds ``embed_tokens``, ``layers.<i>.`` and ``norm`` (``model.`` for a causal LM);
    ``lm_head`` names the output projection (unused when tied).
    """

    config: HFTextConfig
    tensors: SafetensorsFiles
    prefix: str
    lm_head: str
    info: DenseModelInfo


def layer_tensor_shapes(c: HFTextConfig) -> dict[str, tuple[int, ...]]:
    """HF names (relative to ``layers.<i>.``) and shapes of one decoder layer, as ``c`` declares."""
    H, F, d = c.hidden_size, c.ffn_hidden_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_query_groups * d
    shapes = {
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
        "self_attn.o_proj.weight": (H, q),
        "mlp.down_proj.weight": (H, F),
    }
    if c.fused_qkv:
        shapes["self_attn.qkv_proj.weight"] = (q + 2 * kv, H)
    else:
        shapes.update(
            {
                "self_attn.q_proj.weight": (q, H),
                "self_attn.k_proj.weight": (kv, H),
                "self_attn.v_proj.weight": (kv, H),
            }
        )
    if c.qkv_bias:
        shapes.update(
            {
                "self_attn.q_proj.bias": (q,),
                "self_attn.k_proj.bias": (kv,),
                "self_attn.v_proj.bias": (kv,),
            }
        )
    if c.fused_gate_up:
        shapes["mlp.gate_up_proj.weight"] = (2 * F, H)
    else:
        shapes.update({"mlp.gate_proj.weight": (F, H), "mlp.up_proj.weight": (F, H)})
    return shapes


def _declared(c: HFTextConfig) -> str:
    return (
        f"hidden_size={c.hidden_size}, intermediate_size={c.ffn_hidden_size}, "
        f"num_attention_heads={c.num_attention_heads}, num_key_value_heads={c.num_query_groups}, "
        f"head_dim={c.head_dim}, vocab_size={c.vocab_size}"
    )


def check_tensors(
    c: HFTextConfig, tensors: SafetensorsFiles, prefix: str, lm_head: str, where: str
):
    """Every tensor the config implies exists with the implied shape and one float dtype, and the
    files hold no layer beyond ``num_hidden_layers``; errors name both numbers. Returns the
    dtype."""
    expected = {
        f"{prefix}embed_tokens.weight": (c.vocab_size, c.hidden_size),
        f"{prefix}norm.weight": (c.hidden_size,),
    }
    if not c.tied:
        expected[lm_head] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        expected.update({f"{prefix}layers.{i}.{n}": s for n, s in layer_tensor_shapes(c).items()})
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    found = {int(m.group(1)) for n in tensors.names() if (m := pattern.match(n))}
    if found and max(found) + 1 != c.num_layers:
        raise UpcycleError(
            f"{where}: num_hidden_layers={c.num_layers} but the safetensors hold {max(found) + 1} "
            f"layers ({prefix}layers.0..{max(found)})"
        )
    dtypes = set()
    for name, shape in expected.items():
        meta = tensors.meta(name)
        if tuple(meta.shape) != shape:
            raise UpcycleError(
                f"{tensors.file_of[name]}: {name} has shape {list(meta.shape)} but {where} "
                f"({_declared(c)}) implies {list(shape)}"
            )
        dtypes.add(meta.dtype)
    if len(dtypes) != 1:
        raise UpcycleError(
            f"{tensors.root}: the model's tensors mix dtypes {sorted(map(str, dtypes))}"
        )
    return dtypes.pop()


def describe_language_model(
    cfg: dict,
    tensors: SafetensorsFiles,
    *,
    prefix: str = "model.",
    lm_head: str = "lm_head.weight",
    where: str = "config.json",
    tokenizer_dir: Path | None = None,
) -> HFLanguageModel:
    """The dense decoder ``cfg`` (a ``config.json`` dict, or a VLM's ``text_config``) declares,
    checked against ``tensors``, with the Megatron-LM args that rebuild it."""
    config = parse_text_config(cfg, where)
    dtype = check_tensors(config, tensors, prefix, lm_head, where)
    args = hf_megatron_args(config, dtype=dtype, tokenizer_dir=tokenizer_dir)
    info = DenseModelInfo(
        source_kind="hf",
        path=tensors.root,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        gated_linear_unit=True,
        activation="silu",
        fc1_bias=False,
        fc2_bias=False,
        dtype=dtype,
        args=args,
    )
    return HFLanguageModel(
        config=config, tensors=tensors, prefix=prefix, lm_head=lm_head, info=info
    )


def fuse_qkv(c: HFTextConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q ``[nh*d, ...]``, k/v ``[ng*d, ...]`` -> Megatron ``[(nh+2ng)*d, ...]`` grouped per query
    group."""
    ng, d = c.num_query_groups, c.head_dim
    per = c.num_attention_heads // ng
    rest = q.shape[1:]
    q = q.reshape(ng, per * d, *rest)
    k = k.reshape(ng, d, *rest)
    v = v.reshape(ng, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(ng * (per + 2) * d, *rest)


def split_qkv(c: HFTextConfig, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Phi-3's ``qkv_proj`` rows ``[q (nh*d); k (ng*d); v (ng*d)]`` -> (q, k, v)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_query_groups * c.head_dim
    return qkv[:q], qkv[q : q + kv], qkv[q + kv :]


class HFLanguageModelReader:
    """Megatron pieces of an :class:`HFLanguageModel`, one layer at a time."""

    def __init__(self, model: HFLanguageModel):
        self.model, self.info = model, model.info
        self._globals = {
            "embedding.word_embeddings.weight": f"{model.prefix}embed_tokens.weight",
            "decoder.final_layernorm.weight": f"{model.prefix}norm.weight",
        }
        if not model.config.tied:
            self._globals["output_layer.weight"] = model.lm_head

    def _get(self, name: str, meta: bool) -> torch.Tensor:
        return self.model.tensors.meta(name) if meta else self.model.tensors.get(name)

    def global_pieces(self, meta: bool = False, key: str | None = None) -> list[Piece]:
        keys = [key] if key is not None else list(self._globals)
        return [Piece(k, self._get(self._globals[k], meta)) for k in keys]

    def _qkv(self, g, suffix: str) -> torch.Tensor:
        c = self.model.config
        if c.fused_qkv:
            return fuse_qkv(c, *split_qkv(c, g("self_attn.qkv_proj." + suffix)))
        return fuse_qkv(c, *(g(f"self_attn.{p}_proj.{suffix}") for p in "qkv"))

    def read_layer(self, layer: int, meta: bool = False) -> LayerWeights:
        c = self.model.config
        g = lambda n: self._get(f"{self.model.prefix}layers.{layer}.{n}", meta)  # noqa: E731
        other = {
            "self_attention.linear_qkv.layer_norm_weight": g("input_layernorm.weight"),
            "self_attention.linear_qkv.weight": self._qkv(g, "weight"),
            "self_attention.linear_proj.weight": g("self_attn.o_proj.weight"),
        }
        if c.qkv_bias:
            other["self_attention.linear_qkv.bias"] = self._qkv(g, "bias")
        fc1 = (
            g("mlp.gate_up_proj.weight")
            if c.fused_gate_up
            else torch.cat([g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")], dim=0)
        )
        mlp = {
            "linear_fc1.weight": fc1,
            "linear_fc2.weight": g("mlp.down_proj.weight"),
            "linear_fc1.layer_norm_weight": g("post_attention_layernorm.weight"),
        }
        objects = {
            "self_attention.linear_qkv._extra_state": None,
            "self_attention.linear_proj._extra_state": None,
        }
        return LayerWeights(other=other, other_objects=objects, mlp=mlp)


def read_hf_checkpoint(path: Path) -> HFLanguageModel:
    """A local HF causal-LM directory, parsed and checked (no weights read)."""
    root = Path(path)
    tensors = SafetensorsFiles(root)
    try:
        has_tokenizer = any((root / f).is_file() for f in TOKENIZER_FILES)
        return describe_language_model(
            read_json(root / "config.json"),
            tensors,
            where=str(root / "config.json"),
            tokenizer_dir=root if has_tokenizer else None,
        )
    except BaseException:
        tensors.close()
        raise


class HFDenseSource(HFLanguageModelReader):
    """A local HF Llama/Qwen2/Phi-3 directory as a dense Megatron GPTModel source."""

    def __init__(self, path: Path):
        super().__init__(read_hf_checkpoint(path))
        self.root = Path(path)

    def content_hash(self) -> str:
        files = [self.root / "config.json", *self.model.tensors.files]
        if (self.root / INDEX).is_file():
            files.append(self.root / INDEX)
        return hash_files(self.root, files)

    def close(self) -> None:
        self.model.tensors.close()
