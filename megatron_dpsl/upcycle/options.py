"""Upcycling options: one keyword-only dataclass, validated against itself and then the source."""

from __future__ import annotations

import dataclasses

from megatron_dpsl.config import layer_freq
from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.source import DenseModelInfo
from megatron_dpsl.upcycle.transforms import ROUTER_INITS, WEIGHT_SCALINGS

SCORE_FUNCTIONS = ("softmax", "sigmoid")


def parse_layer_freq(value) -> int | list[int]:
    """``--moe-layer-freq``: an int N (every N-th layer, from layer 0, is MoE) or a 0/1 list per
    layer, in Megatron-LM's spellings (``2``, ``[1,0,1,0]``, ``([1]*3+[0])*2``) or ``1,0,1,0``;
    read by ``megatron_dpsl.config.layer_freq`` (a bounded parser, never ``eval``).
    """
    try:
        return layer_freq.parse_layer_freq(value)
    except layer_freq.LayerFreqError as err:
        raise UpcycleError(str(err)) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpcycleOptions:
    """Everything that shapes the upcycled checkpoint (recorded verbatim in
    ``upcycle_config.json``)."""

    num_experts: int
    """E: routed experts per MoE layer (``--num-experts``)."""
    granularity: int = 1
    """G: each dense FFN is split into G experts of ``F/G`` units; E/G copies
    (``--granularity``)."""
    moe_router_topk: int = 2
    """k: experts per token (``--moe-router-topk``)."""
    router_init: str = "virtual-group"
    """``virtual-group`` | ``normal`` | ``zeros`` (``--router-init``)."""
    router_init_std: float | None = None
    """Std of the router's normal init; default: the source's ``init_method_std`` or 0.02."""
    weight_scaling: str = "none"
    """``none`` | ``he2024`` | ``exact`` (``--weight-scaling``)."""
    expert_noise_std: float = 0.0
    """Std of additive N(0, std^2) noise on each expert's fc1/fc2 weights (paper: 0.01)."""
    drop_upcycling_ratio: float = 0.0
    """Fraction of each expert's units re-initialised (Drop-Upcycling; paper 0.5 for 4, 0.2 for 16
    experts)."""
    shared_expert: bool = False
    """Keep the whole dense FFN as a shared expert (``--shared-expert``)."""
    moe_layer_freq: int | list[int] = 1
    """Which layers become MoE (Megatron-LM's ``--moe-layer-freq``)."""
    moe_router_pre_softmax: bool = False
    """Written to args; softmax before top-k (not exact-equivalent)."""
    moe_router_score_function: str = "softmax"
    """Written to args: ``softmax`` | ``sigmoid``."""
    activation: str | None = None
    """Override the activation for sources without args (``silu``, ``gelu``, ``squared_relu``,
    ``quick_gelu``)."""
    img_h: int | None = None
    """LLaVA sources: image height the ViT takes (``--img-h``); checked against the checkpoint."""
    img_w: int | None = None
    """LLaVA sources: image width (``--img-w``); checked against the checkpoint."""
    patch_dim: int | None = None
    """LLaVA sources: ViT patch size (``--patch-dim``); checked against the checkpoint."""
    encoder_num_layers: int | None = None
    """LLaVA sources: ViT layers (``--encoder-num-layers``); checked against the checkpoint."""
    disable_vision_class_token: bool | None = None
    """LLaVA sources: the class token is dropped before the projector
    (``--disable-vision-class-token``)."""
    seed: int = 1234
    force: bool = False
    dry_run: bool = False
    progress: bool = True

    def __post_init__(self):
        E, G, k = self.num_experts, self.granularity, self.moe_router_topk
        if not isinstance(E, int) or E < 1:
            raise UpcycleError(f"--num-experts must be a positive int, got {E!r}")
        if not isinstance(G, int) or G < 1:
            raise UpcycleError(f"--granularity must be a positive int, got {G!r}")
        if E % G:
            raise UpcycleError(
                f"--num-experts {E} is not a multiple of --granularity {G} (E/G copies of the FFN)"
            )
        if not isinstance(k, int) or not 1 <= k <= E:
            raise UpcycleError(f"--moe-router-topk {k} must be in [1, --num-experts={E}]")
        if self.router_init not in ROUTER_INITS:
            raise UpcycleError(f"--router-init {self.router_init!r}: allowed {ROUTER_INITS}")
        if self.weight_scaling not in WEIGHT_SCALINGS:
            raise UpcycleError(
                f"--weight-scaling {self.weight_scaling!r}: allowed {WEIGHT_SCALINGS}"
            )
        if self.moe_router_score_function not in SCORE_FUNCTIONS:
            raise UpcycleError(
                f"--moe-router-score-function {self.moe_router_score_function!r}: allowed "
                f"{SCORE_FUNCTIONS}"
            )
        if self.expert_noise_std < 0:
            raise UpcycleError(f"--expert-noise-std must be >= 0, got {self.expert_noise_std}")
        if not 0 <= self.drop_upcycling_ratio < 1:
            raise UpcycleError(
                f"--drop-upcycling-ratio must be in [0, 1), got {self.drop_upcycling_ratio}"
            )
        if self.router_init_std is not None and self.router_init_std < 0:
            raise UpcycleError(f"--router-init-std must be >= 0, got {self.router_init_std}")
        if self.activation not in (None, "silu", "gelu", "squared_relu", "quick_gelu"):
            raise UpcycleError(
                f"--activation {self.activation!r}: unknown activation; allowed silu, gelu, "
                "squared_relu, quick_gelu"
            )
        for name in ("img_h", "img_w", "patch_dim", "encoder_num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UpcycleError(
                    f"--{name.replace('_', '-')} must be a positive int, got {value!r}"
                )
        # an int >= 1 or a 0/1 list with a 1
        object.__setattr__(self, "moe_layer_freq", parse_layer_freq(self.moe_layer_freq))
        if self.weight_scaling == "exact":
            self._check_exact()

    def _check_exact(self):
        G, k = self.granularity, self.moe_router_topk
        why = []
        if self.moe_router_pre_softmax:
            why.append(
                "--moe-router-pre-softmax: top-k of a softmax over all experts is not "
                "renormalised, "
                "so the selected probabilities sum to less than one (a token-dependent factor)"
            )
        if self.moe_router_score_function != "softmax":
            why.append(
                "--moe-router-score-function sigmoid: Megatron renormalises sigmoid scores only "
                "for k > 1, "
                "with an epsilon; use softmax"
            )
        if G > 1 and self.router_init != "virtual-group":
            why.append(
                f"--router-init {self.router_init}: with --granularity {G} the G shards of one "
                "copy must share "
                "a router row (virtual-group) so top-k selects whole copies"
            )
        if k % G:
            why.append(
                f"--moe-router-topk {k} is not a multiple of --granularity {G}: top-k would select "
                "partial "
                "copies of the FFN"
            )
        if self.expert_noise_std:
            why.append("--expert-noise-std > 0 perturbs the experts")
        if self.drop_upcycling_ratio:
            why.append("--drop-upcycling-ratio > 0 re-initialises expert weights")
        if why:
            raise UpcycleError("--weight-scaling exact cannot be exact here: " + "; ".join(why))

    def moe_layers(self, num_layers: int) -> list[bool]:
        """Per layer: True if it becomes MoE (Megatron's moe_layer_freq semantics)."""
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            return [i % freq == 0 for i in range(num_layers)]
        if len(freq) != num_layers:
            raise UpcycleError(
                f"--moe-layer-freq has {len(freq)} entries; the source has {num_layers} layers"
            )
        return [bool(v) for v in freq]

    def check_source(self, info: DenseModelInfo) -> None:
        """Errors that need the source's shape."""
        if info.ffn_hidden_size % self.granularity:
            raise UpcycleError(
                f"FFN hidden size {info.ffn_hidden_size} is not divisible by --granularity "
                f"{self.granularity}"
            )
        self.moe_layers(info.num_layers)
