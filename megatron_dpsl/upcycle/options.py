"""Upcycling options: one keyword-only dataclass, validated against itself and then the source."""

from __future__ import annotations

import dataclasses
import math

from megatron_dpsl.config.layer_freq import LayerFreqError, parse_layer_freq
from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.source import DenseModelInfo
from megatron_dpsl.upcycle.transforms import ROUTER_INITS, WEIGHT_SCALINGS

SCORE_FUNCTIONS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "gelu", "squared_relu", "quick_gelu")
MAX_EXPERTS = 4096  # above any published MoE (DeepSeek-V3 256, Kimi K2 384); bounds the plan's size
MAX_SEED = 2**63 - 1


def check_int(flag: str, value, low: int, high: int | None = None) -> None:
    """``value`` is an int in ``[low, high]``; the error names ``flag``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UpcycleError(f"{flag} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UpcycleError(f"{flag} must be {allowed}, got {value}")


def check_real(flag: str, value, low: float, high: float | None = None, *, high_open=False) -> None:
    """``value`` is a finite number in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above = high is not None and (value >= high if high_open else value > high) if ok else False
    if not ok or value < low or above:
        close = ")" if high_open else "]"
        allowed = f"in [{low}, {high}{close}" if high is not None else f">= {low}"
        raise UpcycleError(f"{flag} must be a finite number {allowed}, got {value!r}")


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
    seq_length: int | None = None
    """Written to args as ``seq_length`` (what ``--use-checkpoint-args`` fills in when a run omits
    ``--seq-length``); default: the source's, or for a HF source the longest sequence on which
    Megatron computes what HF computes (``max_position_embeddings``, or Phi-3's sliding window)."""
    seed: int = 1234
    force: bool = False
    dry_run: bool = False
    progress: bool = True

    def __post_init__(self):
        self._check_numbers()
        self._check_choices()
        try:  # Megatron-LM's pattern syntax, bounded, never eval (config/layer_freq.py)
            freq = parse_layer_freq(self.moe_layer_freq)
        except LayerFreqError as exc:
            raise UpcycleError(str(exc)) from None
        object.__setattr__(self, "moe_layer_freq", freq)
        if isinstance(freq, int):
            check_int("--moe-layer-freq", freq, 1)
        elif set(freq) - {0, 1} or not any(freq):
            raise UpcycleError(
                f"--moe-layer-freq list must hold 0/1 with at least one 1, got {freq}"
            )
        if self.weight_scaling == "exact":
            self._check_exact()

    def _check_numbers(self):
        E, G, k = self.num_experts, self.granularity, self.moe_router_topk
        check_int("--num-experts", E, 1, MAX_EXPERTS)
        check_int("--granularity", G, 1, E)
        if E % G:
            raise UpcycleError(
                f"--num-experts {E} is not a multiple of --granularity {G} (E/G copies of the FFN)"
            )
        check_int("--moe-router-topk", k, 1, E)
        check_int("--seed", self.seed, 0, MAX_SEED)
        check_real("--expert-noise-std", self.expert_noise_std, 0.0)
        check_real("--drop-upcycling-ratio", self.drop_upcycling_ratio, 0.0, 1.0, high_open=True)
        if self.router_init_std is not None:
            check_real("--router-init-std", self.router_init_std, 0.0)
        for name in ("seq_length", "img_h", "img_w", "patch_dim", "encoder_num_layers"):
            if getattr(self, name) is not None:
                check_int(f"--{name.replace('_', '-')}", getattr(self, name), 1)

    def _check_choices(self):
        for flag, value, allowed in (
            ("--router-init", self.router_init, ROUTER_INITS),
            ("--weight-scaling", self.weight_scaling, WEIGHT_SCALINGS),
            ("--moe-router-score-function", self.moe_router_score_function, SCORE_FUNCTIONS),
            ("--activation", self.activation, (None, *ACTIVATIONS)),
        ):
            if value not in allowed:
                raise UpcycleError(f"{flag} {value!r}: allowed {tuple(a for a in allowed if a)}")

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
        if self.seq_length is not None:
            check_seq_length(self.seq_length, info.args)


def check_seq_length(seq_length: int, args) -> None:
    """``--seq-length`` within the positions the model has, and within a HF sliding window:
    Megatron-LM (without ``--window-size``) attends to the whole causal context, HF only to the
    last ``sliding_window`` keys, so the two differ on longer sequences."""
    max_pos = getattr(args, "max_position_embeddings", None)
    if max_pos is not None and seq_length > max_pos:
        raise UpcycleError(
            f"--seq-length {seq_length} exceeds the source's max_position_embeddings {max_pos}"
        )
    window = getattr(args, "hf_sliding_window", None)
    if window is not None and seq_length > window:
        raise UpcycleError(
            f"--seq-length {seq_length} exceeds the source's sliding_window {window}: Hugging Face "
            f"attends to the last {window} keys, Megatron-LM to the whole sequence, so the "
            f"upcycled model would compute something else; use --seq-length <= {window}"
        )
