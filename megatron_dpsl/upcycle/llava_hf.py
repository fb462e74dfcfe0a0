"""A Hugging Face ``LlavaForConditionalGeneration`` directory as an upcycling source (VLM_NOTES §7).

The language model (Llama, Qwen2, Phi-3, Llama-3.2) is read by hf.py under its LLaVA prefix;
the CLIP vision tower and ``multi_modal_projector`` become Megatron-Core's ``CLIPViTModel`` and
``MultimodalProjector("mlp")``:

- LLaVA takes ``hidden_states[vision_feature_layer]`` of CLIP (``-2``: the next-to-last layer's
  output, before ``post_layernorm``); Megatron's ViT returns its last layer and has no ``ln_post``,
  so it keeps ``num_hidden_layers + 1 + vision_feature_layer`` layers (``vision_feature_layer``
  itself when >= 0) and ``post_layernorm`` is dropped.
- ``embeddings.class_embedding [h]`` -> ``class_token [1, 1, h]``; ``patch_embedding`` -> ``conv1``
  (no bias); ``position_embedding`` -> ``position_embeddings``; ``pre_layrnorm`` -> ``ln_pre``.
- ``layer_norm1/2`` -> ``input_layernorm`` / ``pre_mlp_layernorm`` (the local ViT spec; the TE
  spec's fused ``linear_qkv.layer_norm_*`` / ``linear_fc1.layer_norm_*`` are written too);
  ``q/k/v_proj`` -> ``linear_qkv`` with rows ``[q_h; k_h; v_h]`` per head (biases alike);
  ``out_proj`` -> ``linear_proj``; ``mlp.fc1/fc2`` -> ``mlp.linear_fc1/fc2``. Activation
  ``quick_gelu`` (Megatron's ``quick_gelu``) or ``gelu``.
- ``vision_feature_select_strategy="default"`` drops the class token's row: Megatron's
  ``drop_vision_class_token`` (``--disable-vision-class-token``); ``"full"`` keeps it.
- ``multi_modal_projector.linear_1 -> gelu -> linear_2`` -> ``vision_projection.encoder.linear_fc1
  / linear_fc2`` (biases with ``multimodal_projector_bias``).

Images: HF repeats ``image_token_index`` ``image_seq_length`` times in ``input_ids``; Megatron's
``LLaVAModel`` takes one ``image_token_index`` (-200 by default) per image and expands it.
"""

from __future__ import annotations

import torch

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.hf import (
    TOKENIZER_FILES,
    HFDenseSource,
    HFLanguageModelReader,
    describe_language_model,
)
from megatron_dpsl.upcycle.llava import PROJECTOR_PREFIX, VISION_PREFIX, VisionInfo
from megatron_dpsl.upcycle.pieces import Piece

# key layouts: transformers >= 5 save_pretrained, the Hub's llava-hf checkpoints, in-memory names
VISION_TOWER_PREFIXES = (
    "vision_tower.vision_model.",
    "model.vision_tower.vision_model.",
    "vision_tower.",
    "model.vision_tower.",
)
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
ACTIVATIONS = ("quick_gelu", "gelu")
LAYERS = "decoder.layers."


def find_prefix(names, prefixes, probe: str, what: str, root) -> str:
    """The first of ``prefixes`` under which ``probe`` exists."""
    for prefix in prefixes:
        if prefix + probe in names:
            return prefix
    raise UpcycleError(
        f"{root}: a LLaVA without a {what} (no {' / '.join(p + probe for p in prefixes)})"
    )


def vision_layers_kept(cfg: dict) -> int:
    """CLIP layers the LLaVA uses: those up to ``hidden_states[vision_feature_layer]``."""
    layer = cfg.get("vision_feature_layer", -2)
    num = int(cfg["vision_config"]["num_hidden_layers"])
    if not isinstance(layer, int):
        raise UpcycleError(
            f"config.json: vision_feature_layer={layer!r} (features of several layers) is not "
            "supported; Megatron's LLaVAModel takes one ViT layer's output"
        )
    kept = num + 1 + layer if layer < 0 else layer
    if not 1 <= kept <= num:
        raise UpcycleError(
            f"config.json: vision_feature_layer={layer} outside the ViT's {num} layers"
        )
    return kept


def check_llava_config(cfg: dict, root) -> dict:
    """The LLaVA-level fields this mapping supports; returns the vision config."""
    vision = cfg.get("vision_config")
    if not vision:
        raise UpcycleError(f"{root}/config.json: a LLaVA without a vision_config (no vision tower)")
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise UpcycleError(
            f"config.json: vision tower model_type {vision.get('model_type')!r}; "
            "supported: 'clip_vision_model'"
        )
    if vision.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
        raise UpcycleError(
            f"config.json: vision hidden_act {vision['hidden_act']!r}; supported: {ACTIVATIONS}"
        )
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise UpcycleError(
            f"config.json: projector_hidden_act {cfg['projector_hidden_act']!r}; supported: 'gelu'"
        )
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise UpcycleError(
            f"config.json: vision_feature_select_strategy {strategy!r}; "
            "supported: 'default', 'full'"
        )
    vision_layers_kept(cfg)
    return vision


class HFLlavaVision:
    """The CLIP tower and projector of a HF LLaVA as Megatron ``vision_model.*`` /
    ``vision_projection.*`` pieces. ``get(name, meta)`` reads one HF tensor."""

    def __init__(self, cfg: dict, names, get, root):
        self.cfg, self.get, self.root = cfg, get, root
        self.vcfg = check_llava_config(cfg, root)
        self.tower = find_prefix(
            names, VISION_TOWER_PREFIXES, "embeddings.patch_embedding.weight", "vision tower", root
        )
        self.projector = find_prefix(
            names, PROJECTOR_PREFIXES, "linear_1.weight", "multi_modal_projector", root
        )
        self.num_layers = vision_layers_kept(cfg)
        self.heads = int(self.vcfg["num_attention_heads"])
        self.bias = bool(cfg.get("multimodal_projector_bias", True))
        conv = get(self.tower + "embeddings.patch_embedding.weight", True)
        pos = get(self.tower + "embeddings.position_embedding.weight", True)
        image = int(self.vcfg["image_size"])
        self.info = VisionInfo(
            num_layers=self.num_layers,
            hidden_size=conv.shape[0],
            patch_dim=conv.shape[-1],
            num_positions=pos.shape[0],
            class_token_len=1,
            img_h=image,
            img_w=image,
            disable_vision_class_token=cfg.get("vision_feature_select_strategy", "default")
            == "default",
        )

    def _qkv(self, layer: int, kind: str, meta: bool) -> torch.Tensor:
        """HF q/k/v ``[h, ...]`` -> Megatron ``linear_qkv`` ``[3h, ...]``: rows ``[q_h; k_h; v_h]``
        for each head h."""
        p = f"{self.tower}encoder.layers.{layer}.self_attn."
        q, k, v = (self.get(f"{p}{n}_proj.{kind}", meta) for n in "qkv")
        n = self.heads
        if meta:
            return torch.empty((3 * q.shape[0], *q.shape[1:]), dtype=q.dtype, device="meta")
        parts = [t.reshape(n, t.shape[0] // n, *t.shape[1:]) for t in (q, k, v)]
        return torch.cat(parts, dim=1).reshape(3 * q.shape[0], *q.shape[1:])

    def _layer(self, layer: int) -> dict:
        """Layer ``layer``'s entries under their ``decoder.layers.`` names (the local ViT spec's,
        and the TE spec's fused norm names as aliases) -> ``(meta) -> tensor``."""
        p = f"{self.tower}encoder.layers.{layer}."
        hf = {
            "input_layernorm": "layer_norm1",
            "self_attention.linear_qkv.layer_norm": "layer_norm1",
            "self_attention.linear_proj": "self_attn.out_proj",
            "pre_mlp_layernorm": "layer_norm2",
            "mlp.linear_fc1.layer_norm": "layer_norm2",
            "mlp.linear_fc1": "mlp.fc1",
            "mlp.linear_fc2": "mlp.fc2",
        }
        out = {}
        for kind in ("weight", "bias"):
            for name, hf_name in hf.items():
                sep = "_" if name.endswith("layer_norm") else "."
                out[f"{name}{sep}{kind}"] = lambda m, n=f"{p}{hf_name}.{kind}": self.get(n, m)
            out[f"self_attention.linear_qkv.{kind}"] = lambda m, k=kind: self._qkv(layer, k, m)
        return out

    def passthrough(self) -> dict:
        """Sharded key -> ``(meta) -> [Piece]``: the ViT's layers stacked ``[L, ...]``, the
        projector, and the extra states."""
        t, L = self.tower, self.num_layers
        top = {
            "class_token": lambda m: _reshape(
                self.get(t + "embeddings.class_embedding", m), (1, 1, -1)
            ),
            "conv1.weight": lambda m: self.get(t + "embeddings.patch_embedding.weight", m),
            "position_embeddings.weight": lambda m: self.get(
                t + "embeddings.position_embedding.weight", m
            ),
            "ln_pre.weight": lambda m: self.get(t + "pre_layrnorm.weight", m),
            "ln_pre.bias": lambda m: self.get(t + "pre_layrnorm.bias", m),
        }
        out = {VISION_PREFIX + k: _one(VISION_PREFIX + k, f) for k, f in top.items()}
        for name in self._layer(0):
            out[VISION_PREFIX + LAYERS + name] = self._stacked(VISION_PREFIX + LAYERS + name, name)
        for linear in (
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        ):
            key = f"{VISION_PREFIX}{LAYERS}{linear}._extra_state"
            out[key] = lambda m, key=key: [
                Piece(key, None, ((i, L),), is_object=True) for i in range(L)
            ]
        proj = self.projector
        kinds = ("weight", "bias") if self.bias else ("weight",)
        for hf, mg in (("linear_1", "linear_fc1"), ("linear_2", "linear_fc2")):
            for kind in kinds:
                key = f"{PROJECTOR_PREFIX}encoder.{mg}.{kind}"
                out[key] = _one(key, lambda m, n=f"{proj}{hf}.{kind}": self.get(n, m))
            key = f"{PROJECTOR_PREFIX}encoder.{mg}._extra_state"
            out[key] = lambda m, key=key: [
                Piece(key, None, is_object=True, obj_shape=(1,), obj_offset=(0,))
            ]
        return out

    def _stacked(self, key: str, name: str):
        """The ``[L, ...]`` stack of one entry over the kept layers."""

        def produce(meta: bool) -> list[Piece]:
            if meta:
                one = self._layer(0)[name](True)
                stack = torch.empty((self.num_layers, *one.shape), dtype=one.dtype, device="meta")
            else:
                stack = torch.stack([self._layer(i)[name](False) for i in range(self.num_layers)])
            return [Piece(key, stack)]

        return produce

    def args(self, lm_hidden: int) -> dict:
        """Megatron-LM args of the vision side (pretrain_vlm's flags, the ViT/projector shape)."""
        v = self.vcfg
        hidden, heads = int(v["hidden_size"]), self.heads
        return dict(
            vision_model_type="clip",
            encoder_num_layers=self.num_layers,
            img_h=self.info.img_h,
            img_w=self.info.img_w,
            patch_dim=self.info.patch_dim,
            disable_vision_class_token=self.info.disable_vision_class_token,
            vision_hidden_size=hidden,
            vision_ffn_hidden_size=int(v["intermediate_size"]),
            vision_num_attention_heads=heads,
            vision_kv_channels=hidden // heads,
            vision_activation=v.get("hidden_act", "quick_gelu"),
            vision_layernorm_epsilon=float(v.get("layer_norm_eps", 1e-5)),
            vision_projector_ffn_hidden_size=lm_hidden,
            vision_projector_activation="gelu",
            vision_projector_bias=self.bias,
            hf_image_token_index=self.cfg.get("image_token_index", self.cfg.get("image_token_id")),
        )


def _reshape(t: torch.Tensor, shape) -> torch.Tensor:
    return (
        t.reshape(shape)
        if t.device.type != "meta"
        else torch.empty(t.reshape(shape).shape, dtype=t.dtype, device="meta")
    )


def _one(key: str, get):
    return lambda meta: [Piece(key, get(meta))]


LM_PREFIXES = ("language_model.model.", "model.language_model.")
HEADS = ("language_model.lm_head.weight", "lm_head.weight")


def llava_config(root) -> dict | None:
    """``config.json`` of a HF LLaVA with Hugging Face's defaults filled in (the Hub's configs list
    only what differs from them), or None if the directory holds another model type."""
    from megatron_dpsl.upcycle.files import read_json

    raw = read_json(root / "config.json")  # a damaged file: a one-line error naming it
    if not isinstance(raw, dict) or raw.get("model_type") != "llava":
        return None  # not a LLaVA: the causal-LM reader says what is wrong with it
    try:
        from transformers import AutoConfig
    except ImportError:  # the saved config must then be complete
        return raw
    try:
        return AutoConfig.from_pretrained(str(root)).to_dict()
    except Exception as exc:  # noqa: BLE001  transformers' ValueError/KeyError/OSError
        raise UpcycleError(f"{root / 'config.json'}: transformers cannot read it ({exc})") from None


class _LanguageModel(HFLanguageModelReader):
    """The LLaVA's decoder read by hf.py (Llama, Qwen2, Phi-3, Llama-3.2's llama3 RoPE); content
    hash and close over the whole directory, as for a causal LM."""

    content_hash = HFDenseSource.content_hash
    close = HFDenseSource.close

    def __init__(self, root, text: dict, tensors, prefix: str):
        head = next((h for h in HEADS if h in tensors), HEADS[0])  # checked there unless tied
        has_tokenizer = any((root / f).is_file() for f in TOKENIZER_FILES)
        super().__init__(
            describe_language_model(
                text,
                tensors,
                prefix=prefix,
                lm_head=head,
                where=f"{root / 'config.json'} text_config",
                tokenizer_dir=root if has_tokenizer else None,
            )
        )
        self.root = root


def open_hf_llava(root):
    """A HF ``LlavaForConditionalGeneration`` directory as a :class:`LlavaSource`, or None if the
    directory holds another model."""
    from megatron_dpsl.upcycle.llava import LlavaSource
    from megatron_dpsl.upcycle.safetensors_files import SafetensorsFiles

    cfg = llava_config(root)
    if cfg is None:
        return None
    text = cfg.get("text_config")
    if not text:
        raise UpcycleError(f"{root}/config.json: a LLaVA without a text_config")
    tensors = SafetensorsFiles(root)
    try:
        names = set(tensors.names())
        prefix = find_prefix(names, LM_PREFIXES, "embed_tokens.weight", "language model", root)
        lm = _LanguageModel(root, text, tensors, prefix)
        get = lambda name, meta: tensors.meta(name) if meta else tensors.get(name)  # noqa: E731
        vision = HFLlavaVision(cfg, names, get, root)
    except BaseException:
        tensors.close()
        raise
    return LlavaSource(
        lm,
        vision.passthrough(),
        vision.info,
        kind="hf-llava",
        args_update=vision.args(lm.info.hidden_size),
    )
