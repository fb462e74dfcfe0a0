"""Reading a Hugging Face Llama / Qwen2 checkpoint (``config.json`` + safetensors) as a dense
Megatron GPTModel, one layer at a time. Nothing is downloaded; files are memory-mapped.

Mapping (HF -> Megatron-Core GPTModel, local or TE spec; see docs/upcycling.md):

- ``model.embed_tokens.weight`` -> ``embedding.word_embeddings.weight`` ``[V, H]``
- ``layers.i.input_layernorm.weight`` -> ``self_attention.linear_qkv.layer_norm_weight`` (RMSNorm)
- ``q_proj [nh*d, H]``, ``k_proj``/``v_proj [ng*d, H]`` -> ``linear_qkv.weight [(nh+2ng)*d, H]``,
  grouped per query group: ``[q heads of group g (nh/ng*d rows), k_g (d), v_g (d)]`` for g in
  0..ng-1 (Megatron splits the fused projection per group, so GQA needs this interleave); biases
  alike.
- ``o_proj`` -> ``linear_proj.weight``
- ``post_attention_layernorm.weight`` -> ``mlp.linear_fc1.layer_norm_weight`` (the pre-MLP norm)
- ``gate_proj``, ``up_proj`` ``[F, H]`` -> ``linear_fc1.weight = cat(gate, up) [2F, H]`` (Megatron's
  SwiGLU computes ``silu(x[:F]) * x[F:]``); ``down_proj`` -> ``linear_fc2.weight [H, F]``
- ``model.norm.weight`` -> ``decoder.final_layernorm.weight``; ``lm_head.weight`` ->
  ``output_layer.weight`` unless ``tie_word_embeddings``
- RoPE: HF's rotate-half convention is Megatron's non-interleaved rotary
  (``rotary_interleaved=False``); ``rope_theta`` -> ``rotary_base``; ``head_dim`` ->
  ``kv_channels``; ``rms_norm_eps`` -> ``norm_epsilon``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.pieces import Piece
from megatron_dpsl.upcycle.readers import hash_files
from megatron_dpsl.upcycle.source import DenseModelInfo, LayerWeights

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def is_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = (
        params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    )
    if rope_type != "default":
        raise UpcycleError(
            f"config.json: rope type {rope_type!r} is not supported (only unscaled 'default' "
            "RoPE maps "
            "exactly onto Megatron's rotary embedding)"
        )
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


class HFDenseSource:
    """A local HF Llama/Qwen2 directory as a dense Megatron GPTModel source."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.root = Path(path)
        cfg = json.loads((self.root / "config.json").read_text())
        self.cfg = cfg
        mtype = cfg.get("model_type")
        if mtype not in SUPPORTED_MODEL_TYPES:
            already = " (already an MoE)" if mtype and "moe" in mtype else ""
            raise UpcycleError(
                f"config.json: model_type {mtype!r}{already} is not supported; supported: "
                f"{SUPPORTED_MODEL_TYPES}"
            )
        if cfg.get("num_experts") or cfg.get("num_local_experts"):
            raise UpcycleError("config.json describes an MoE model already; upcycle a dense model")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UpcycleError(
                f"config.json: unknown activation hidden_act={act!r}; supported: 'silu' (SwiGLU)"
            )
        if mtype == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
            raise UpcycleError(
                "config.json: attention_bias/mlp_bias=True cannot be expressed with Megatron's "
                "add_bias_linear/add_qkv_bias flags; supported: both False"
            )
        if mtype == "qwen2" and cfg.get("use_sliding_window"):
            raise UpcycleError("config.json: use_sliding_window=True is not supported")
        self.qkv_bias = mtype == "qwen2"
        self.num_heads = int(cfg["num_attention_heads"])
        self.num_groups = int(cfg.get("num_key_value_heads") or self.num_heads)
        hidden = int(cfg["hidden_size"])
        self.head_dim = int(cfg.get("head_dim") or hidden // self.num_heads)
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        rotary_base = _rope_theta(cfg)

        self._files: dict[str, Path] = {}
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            for name, file in json.loads(index.read_text())["weight_map"].items():
                self._files[name] = self.root / file
        else:
            for file in sorted(self.root.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        self._files[name] = file
        self._handles = {f: safe_open(str(f), framework="pt") for f in set(self._files.values())}
        if "model.embed_tokens.weight" not in self._files:
            raise UpcycleError(
                f"{self.root}: no model.embed_tokens.weight in the safetensors files"
            )
        embed = self._get("model.embed_tokens.weight", meta=True)
        vocab = embed.shape[0]
        L = int(cfg["num_hidden_layers"])
        ffn = int(cfg["intermediate_size"])
        args = argparse.Namespace(
            num_layers=L,
            hidden_size=hidden,
            ffn_hidden_size=ffn,
            num_attention_heads=self.num_heads,
            group_query_attention=self.num_groups != self.num_heads,
            num_query_groups=self.num_groups,
            kv_channels=self.head_dim,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            seq_length=int(cfg.get("max_position_embeddings", 4096)),
            position_embedding_type="rope",
            # Megatron-LM's --no-position-embedding: RoPE adds no table
            add_position_embedding=False,
            # the deprecated alias of --position-embedding-type rope
            use_rotary_position_embeddings=False,
            rotary_base=int(rotary_base)
            if float(rotary_base).is_integer()
            else rotary_base,  # an int flag
            rotary_interleaved=False,
            rotary_percent=1.0,
            normalization="RMSNorm",
            # --norm-epsilon's dest: layernorm_epsilon at core_v0.16/0.19, norm_epsilon before
            layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
            norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
            swiglu=True,
            untie_embeddings_and_output_weights=not self.tied,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            padded_vocab_size=vocab,
            vocab_size=vocab,
            params_dtype=embed.dtype,
            bf16=embed.dtype == torch.bfloat16,
            fp16=embed.dtype == torch.float16,
            attention_dropout=float(cfg.get("attention_dropout", 0.0)),
            hidden_dropout=0.0,
            init_method_std=float(cfg.get("initializer_range", 0.02)),
            use_rope_scaling=False,
            # what Megatron-LM's own HF loader writes; --use-checkpoint-args then builds this
            # tokenizer (None without tokenizer files: the run's --tokenizer-* flags stand)
            tokenizer_type="HuggingFaceTokenizer" if self._has_tokenizer() else None,
            tokenizer_model=str(self.root.resolve()) if self._has_tokenizer() else None,
            hf_model_type=mtype,
        )
        self.info = DenseModelInfo(
            source_kind="hf",
            path=self.root,
            num_layers=L,
            hidden_size=hidden,
            ffn_hidden_size=ffn,
            gated_linear_unit=True,
            activation="silu",
            fc1_bias=False,
            fc2_bias=False,
            dtype=embed.dtype,
            args=args,
        )

    def _has_tokenizer(self) -> bool:
        return any(
            (self.root / f).is_file()
            for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        )

    def _get(self, name: str, meta: bool = False) -> torch.Tensor:
        file = self._files.get(name)
        if file is None:
            raise UpcycleError(f"{self.root}: tensor {name!r} missing from the safetensors files")
        handle = self._handles[file]
        if meta:
            sl = handle.get_slice(name)
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(
                sl.get_dtype()
            )
            if dtype is None:
                raise UpcycleError(f"{name}: unsupported safetensors dtype {sl.get_dtype()}")
            return torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        return handle.get_tensor(name)

    def global_pieces(self, meta: bool = False, key: str | None = None) -> list[Piece]:
        if key is not None:  # one tensor alone
            return [Piece(key, self._get(self._hf_name(key), meta))]
        pieces = [
            Piece("embedding.word_embeddings.weight", self._get("model.embed_tokens.weight", meta)),
            Piece("decoder.final_layernorm.weight", self._get("model.norm.weight", meta)),
        ]
        if not self.tied:
            pieces.append(Piece("output_layer.weight", self._get("lm_head.weight", meta)))
        return pieces

    def _hf_name(self, key: str) -> str:
        return {
            "embedding.word_embeddings.weight": "model.embed_tokens.weight",
            "decoder.final_layernorm.weight": "model.norm.weight",
            "output_layer.weight": "lm_head.weight",
        }[key]

    def fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """HF q ``[nh*d, ...]``, k/v ``[ng*d, ...]`` -> Megatron ``[(nh+2ng)*d, ...]`` grouped per
        query group."""
        ng, d = self.num_groups, self.head_dim
        per = self.num_heads // ng
        rest = q.shape[1:]
        q = q.reshape(ng, per * d, *rest)
        k = k.reshape(ng, d, *rest)
        v = v.reshape(ng, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(ng * (per + 2) * d, *rest)

    def read_layer(self, layer: int, meta: bool = False) -> LayerWeights:
        p = f"model.layers.{layer}."
        g = lambda n: self._get(p + n, meta)  # noqa: E731
        other = {
            "self_attention.linear_qkv.layer_norm_weight": g("input_layernorm.weight"),
            "self_attention.linear_qkv.weight": self.fuse_qkv(
                g("self_attn.q_proj.weight"),
                g("self_attn.k_proj.weight"),
                g("self_attn.v_proj.weight"),
            ),
            "self_attention.linear_proj.weight": g("self_attn.o_proj.weight"),
        }
        if self.qkv_bias:
            other["self_attention.linear_qkv.bias"] = self.fuse_qkv(
                g("self_attn.q_proj.bias"), g("self_attn.k_proj.bias"), g("self_attn.v_proj.bias")
            )
        mlp = {
            "linear_fc1.weight": torch.cat(
                [g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")], dim=0
            ),
            "linear_fc2.weight": g("mlp.down_proj.weight"),
            "linear_fc1.layer_norm_weight": g("post_attention_layernorm.weight"),
        }
        objects = {
            "self_attention.linear_qkv._extra_state": None,
            "self_attention.linear_proj._extra_state": None,
        }
        return LayerWeights(other=other, other_objects=objects, mlp=mlp)

    def content_hash(self) -> str:
        files = [self.root / "config.json", *sorted(set(self._files.values()))]
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            files.append(index)
        return hash_files(self.root, files)

    def close(self) -> None:
        self._handles.clear()
