"""A LLaVA checkpoint as an upcycling source: the language model is upcycled, the vision encoder and
projector pass through unchanged (VLM_NOTES §3.3; Megatron's runtime upcycling would expand the
ViT's MLPs too).

:class:`LlavaSource` wraps the language model's dense source (keys relative to ``language_model.``,
so the layer planning of convert.py is the GPT one) and adds the vision pieces with their own
sharded keys; :meth:`LlavaSource.output_key` puts the language model's keys back under
``language_model.``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.pieces import Piece
from megatron_dpsl.upcycle.source import LayerWeights

LM_PREFIX = "language_model."
VISION_PREFIX = "vision_model."
PROJECTOR_PREFIX = "vision_projection."
PASSTHROUGH_ROOTS = (VISION_PREFIX, PROJECTOR_PREFIX)
# upcycler options that describe the vision side; each is checked against the checkpoint
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
VISION_FLAGS = {
    "img_h": "--img-h",
    "img_w": "--img-w",
    "patch_dim": "--patch-dim",
    "encoder_num_layers": "--encoder-num-layers",
    "disable_vision_class_token": "--disable-vision-class-token",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionInfo:
    """The vision side as the checkpoint's tensors (and args) describe it.

    ``num_positions`` is the ViT's position-embedding rows: ``(img_h/patch_dim)*(img_w/patch_dim)``
    patches plus ``class_token_len`` class tokens.
    """

    num_layers: int
    hidden_size: int
    patch_dim: int
    num_positions: int
    class_token_len: int
    img_h: int | None = None
    img_w: int | None = None
    disable_vision_class_token: bool | None = None

    def values(self) -> dict:
        """The fields the vision flags name (``None``: the checkpoint does not say)."""
        return {
            "img_h": self.img_h,
            "img_w": self.img_w,
            "patch_dim": self.patch_dim,
            "encoder_num_layers": self.num_layers,
            "disable_vision_class_token": self.disable_vision_class_token,
        }


def check_image_size(info: VisionInfo, img_h: int | None, img_w: int | None, where: str) -> None:
    """``img_h x img_w`` in ``patch_dim`` patches must give the ViT's position-embedding rows."""
    if img_h is None or img_w is None:
        return
    p = info.patch_dim
    if img_h % p or img_w % p:
        raise UpcycleError(f"{where}: image {img_h}x{img_w} is not a multiple of patch_dim {p}")
    expect = (img_h // p) * (img_w // p) + info.class_token_len
    if expect != info.num_positions:
        raise UpcycleError(
            f"{where}: image {img_h}x{img_w} in {p}x{p} patches gives {expect} positions "
            f"(class tokens included), but the ViT's position embeddings have {info.num_positions} "
            "rows"
        )


def check_vision_flags(vision: VisionInfo | None, flags: dict, source) -> dict:
    """The vision flags given (not None) against the checkpoint; returns the resolved values.

    A flag on a source without a vision encoder, or one the checkpoint contradicts, is an error.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    if vision is None:
        if given:
            name = VISION_FLAGS[next(iter(given))]
            raise UpcycleError(
                f"{name} describes a vision encoder, but {source} has none (a text-only checkpoint)"
            )
        return {}
    values = vision.values()
    for key, value in given.items():
        have = values[key]
        if have is not None and have != value:
            raise UpcycleError(
                f"{VISION_FLAGS[key]} {value} contradicts the checkpoint ({key}={have}); "
                f"drop the flag or pass {have}"
            )
        values[key] = value
    check_image_size(vision, values["img_h"], values["img_w"], "vision flags")
    return values


def vision_info(shapes: dict, args, where) -> VisionInfo:
    """The ViT's shape from the global shapes of its sharded keys (``vision_model.*``, layers
    stacked or per layer); ``args`` (the checkpoint's Megatron-LM args, or None) must agree with
    them."""
    shape = shapes.get
    conv = shape(VISION_PREFIX + "conv1.weight")
    pos = shape(VISION_PREFIX + "position_embeddings.weight")
    if conv is None or pos is None:
        raise UpcycleError(
            f"{where} holds a LLaVA language model but no vision encoder "
            "(vision_model.conv1.weight, "
            "vision_model.position_embeddings.weight): a LLaVA without a vision tower cannot be "
            "passed through"
        )
    if not any(k.startswith(PROJECTOR_PREFIX) for k in shapes):
        raise UpcycleError(
            f"{where} holds a LLaVA without its vision projection (vision_projection.*)"
        )
    cls = shape(VISION_PREFIX + "class_token")
    rel = [(k[len(VISION_PREFIX) :], s) for k, s in shapes.items() if k.startswith(VISION_PREFIX)]
    stacked = [s[0] for k, s in rel if k.startswith("decoder.layers.") and not _LAYER.match(k)]
    per_layer = [int(m.group(1)) for k, _ in rel if (m := _LAYER.match(k))]
    num_layers = stacked[0] if stacked else (max(per_layer) + 1 if per_layer else 0)
    info = VisionInfo(
        num_layers=num_layers,
        hidden_size=conv[0],
        patch_dim=conv[-1],
        num_positions=pos[0],
        class_token_len=cls[1] if cls is not None else 0,
        img_h=getattr(args, "img_h", None),
        img_w=getattr(args, "img_w", None),
        disable_vision_class_token=getattr(args, "disable_vision_class_token", None),
    )
    _check_args(info, args, where)
    return info


def _check_args(info: VisionInfo, args, where) -> None:
    """The checkpoint's own args against its vision tensors."""
    patch = getattr(args, "patch_dim", None)
    if patch is not None and patch != info.patch_dim:
        raise UpcycleError(
            f"{where}: args.patch_dim={patch} contradicts vision_model.conv1.weight "
            f"({info.patch_dim}x{info.patch_dim} patches)"
        )
    layers = getattr(args, "encoder_num_layers", None)
    if layers is not None and layers != info.num_layers:
        raise UpcycleError(
            f"{where}: args.encoder_num_layers={layers} contradicts vision_model's "
            f"{info.num_layers} layers"
        )
    check_image_size(info, info.img_h, info.img_w, f"{where}: args.img_h/img_w")


def norm_aliases(w: LayerWeights) -> LayerWeights:
    """A language-model layer's norms under the names of every LLaVA language spec.

    Megatron-Core's ``decoder_model_with_local_default_spec`` (upstream ``pretrain_vlm.py``) maps
    no keys: ``input_layernorm.*`` and ``pre_mlp_layernorm.*``; the GPT local spec (the plugin's
    builder) and the TE specs say ``self_attention.linear_qkv.layer_norm_*`` and
    ``mlp.linear_fc1.layer_norm_*``. The input norm is written under both names; the pre-MLP norm
    goes to the MLP, which an MoE layer writes under both (layers.py). A load ignores the names its
    model does not ask for.
    """
    for kind in ("weight", "bias"):
        plain, fused = f"input_layernorm.{kind}", f"self_attention.linear_qkv.layer_norm_{kind}"
        norm = w.other.get(plain, w.other.get(fused))
        if norm is not None:
            w.other[plain] = w.other[fused] = norm
        pre = w.other.pop(f"pre_mlp_layernorm.{kind}", None)
        if pre is not None:
            w.mlp.setdefault(f"linear_fc1.layer_norm_{kind}", pre)
    return w


class LlavaSource:
    """A dense LLaVA: the language model's :class:`~megatron_dpsl.upcycle.source.DenseSource`
    plus the vision encoder and projector, copied unchanged.

    ``passthrough``: sharded key -> function ``(meta) -> list[Piece]`` giving that entry's pieces
    with full keys (``vision_model.*``, ``vision_projection.*``); objects are listed under their key
    too.
    """

    def __init__(
        self,
        lm,
        passthrough: dict[str, Callable[[bool], list[Piece]]],
        vision: VisionInfo,
        kind: str,
        args_update: dict | None = None,
    ):
        self.lm = lm
        self.passthrough = passthrough
        self.vision = vision
        self.info = dataclasses.replace(lm.info, source_kind=kind)
        for key, value in (args_update or {}).items():
            setattr(self.info.args, key, value)

    def global_pieces(self, meta: bool = False, key: str | None = None) -> list[Piece]:
        if key is not None:
            if key.startswith(PASSTHROUGH_ROOTS):
                return self.passthrough[key](meta)
            return self.lm.global_pieces(meta=meta, key=key)
        pieces = self.lm.global_pieces(meta=meta)
        for produce in self.passthrough.values():
            pieces += produce(meta)
        return pieces

    def read_layer(self, layer: int, meta: bool = False):
        return norm_aliases(self.lm.read_layer(layer, meta=meta))

    def output_key(self, key: str) -> str:
        """Sharded key in the LLaVA checkpoint of a key this source yields."""
        return key if key.startswith(PASSTHROUGH_ROOTS) else LM_PREFIX + key

    def content_hash(self) -> str:
        return self.lm.content_hash()

    def close(self) -> None:
        self.lm.close()


def check_vision_options(source, opts) -> None:
    """The vision flags of ``opts`` against ``source`` (a :class:`LlavaSource` or a text-only one);
    the values they resolve are written into the output's args."""
    flags = {k: getattr(opts, k) for k in VISION_FLAGS}
    values = check_vision_flags(getattr(source, "vision", None), flags, source.info.path)
    for key, value in values.items():
        if value is not None:
            setattr(source.info.args, key, value)
