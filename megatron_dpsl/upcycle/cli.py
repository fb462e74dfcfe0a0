"""``megatron-dpsl-upcycle`` / ``python -m megatron_dpsl.upcycle``: a thin argparse front over
:func:`megatron_dpsl.upcycle.upcycle`.

Examples (paper Sec. 3.1 / App. C.2 configurations)::

    # standard 2in4 with N(0, 0.01^2) noise
    megatron-dpsl-upcycle --source ckpts/dense --output ckpts/moe-2in4 \\
        --num-experts 4 --moe-router-topk 2 --expert-noise-std 0.01
    # granular 8in16, G=4, virtual-group router
    megatron-dpsl-upcycle --source hf/Qwen2-1.5B --output ckpts/moe-8in16 \\
        --num-experts 16 --granularity 4 --moe-router-topk 8
    # a function-preserving start (MoE logits == dense logits)
    megatron-dpsl-upcycle --source ckpts/dense --output ckpts/moe-exact \\
        --num-experts 16 --granularity 4 --moe-router-topk 8 --weight-scaling exact
"""

from __future__ import annotations

import argparse
import signal
import sys

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.options import SCORE_FUNCTIONS
from megatron_dpsl.upcycle.transforms import ROUTER_INITS, WEIGHT_SCALINGS


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after every option's help: ``off`` for flags; nothing for required options
    and for options whose default is computed (``None``: their help says it in words)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        if isinstance(action, argparse._StoreTrueAction):
            return f"{action.help} (default: off)"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-dpsl-upcycle",
        description="Upcycle a dense Megatron-Core torch_dist (or HF Llama/Qwen2) checkpoint into "
        "an MoE "
        "torch_dist checkpoint in the Megatron-LM layout (docs/upcycling.md).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--source",
        "--load",
        dest="source",
        required=True,
        metavar="DIR",
        help="dense checkpoint: Megatron-LM save dir, torch_dist step dir, or HF directory "
        "(config.json + "
        "*.safetensors) (required)",
    )
    p.add_argument(
        "--output",
        "--save",
        dest="output",
        metavar="DIR",
        help="output directory, created atomically (required unless --dry-run)",
    )
    p.add_argument(
        "--num-experts",
        type=int,
        required=True,
        metavar="E",
        help="routed experts per MoE layer (required)",
    )
    p.add_argument(
        "--granularity",
        type=int,
        default=1,
        metavar="G",
        help="split each dense FFN into G experts of F/G units; E/G copies of the FFN (8in16: E "
        "16, "
        "G 4, k 8)",
    )
    p.add_argument(
        "--moe-router-topk", type=int, default=2, metavar="K", help="experts per token, 1 <= K <= E"
    )
    p.add_argument(
        "--router-init",
        choices=ROUTER_INITS,
        default="virtual-group",
        help="virtual-group: one N(0, std^2) row per FFN copy, shared by its G experts; normal: "
        "independent "
        "rows; zeros: uniform routing",
    )
    p.add_argument(
        "--router-init-std",
        type=float,
        default=None,
        metavar="STD",
        help="std of the router rows (default: the source's init_method_std, else 0.02)",
    )
    p.add_argument(
        "--weight-scaling",
        choices=WEIGHT_SCALINGS,
        default="none",
        help="none (paper); he2024 = Megatron's runtime upcycling rule; exact = MoE equals dense",
    )
    p.add_argument(
        "--expert-noise-std",
        type=float,
        default=0.0,
        metavar="STD",
        help="additive N(0, STD^2) noise on each expert's weights (paper: 0.01)",
    )
    p.add_argument(
        "--drop-upcycling-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="Drop-Upcycling: re-initialise this fraction of each expert's units (paper: 0.5 for 4 "
        "experts, "
        "0.2 for 16)",
    )
    p.add_argument(
        "--shared-expert", action="store_true", help="keep the dense FFN whole as a shared expert"
    )
    p.add_argument(
        "--moe-layer-freq",
        default="1",
        metavar="FREQ",
        help="which layers become MoE: int N (layers 0, N, 2N, ...) or a 0/1 list, e.g. [1,0,1,0] "
        "or "
        "([1]*2+[0])*4",
    )
    p.add_argument(
        "--moe-router-pre-softmax",
        action="store_true",
        help="softmax over all experts before top-k (written to args; not allowed with "
        "--weight-scaling exact)",
    )
    p.add_argument(
        "--moe-router-score-function",
        choices=SCORE_FUNCTIONS,
        default="softmax",
        help="router score function written to args (exact needs softmax)",
    )
    p.add_argument(
        "--activation",
        choices=("silu", "gelu", "squared_relu", "quick_gelu"),
        default=None,
        help="activation of a source whose args do not say (default: from the source's args, else "
        "the shapes: gated -> silu, else gelu)",
    )
    vision = p.add_argument_group(
        "LLaVA sources",
        "the vision side, checked against the checkpoint (its ViT and projector are copied)",
    )
    for flag, what in (
        ("--img-h", "image height"),
        ("--img-w", "image width"),
        ("--patch-dim", "ViT patch size"),
        ("--encoder-num-layers", "ViT layers"),
    ):
        vision.add_argument(
            flag,
            type=int,
            default=None,
            metavar="N",
            help=f"{what} the source's ViT takes; an error if it says otherwise (default: the "
            "checkpoint's)",
        )
    vision.add_argument(
        "--disable-vision-class-token",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the ViT's class token is dropped before the projector; an error if the checkpoint "
        "says otherwise (default: the checkpoint's)",
    )
    p.add_argument(
        "--seq-length",
        type=int,
        default=None,
        metavar="N",
        help="sequence length written to the output's args (what --use-checkpoint-args fills in); "
        "at most the source's positions and, for Phi-3, its sliding window (default: the source's; "
        "HF: max_position_embeddings, or Phi-3's sliding_window)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="seed of router rows, noise and Drop-Upcycling (one stream per layer and expert)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the output tensors and the summary; write nothing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a killed conversion must clean up its temporary directory like Ctrl-C does
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    from megatron_dpsl.upcycle.convert import upcycle

    options = {k: v for k, v in vars(args).items() if k not in ("source", "output", "no_progress")}
    try:
        result = upcycle(args.source, args.output, progress=not args.no_progress, **options)
    except UpcycleError as exc:
        print(f"megatron-dpsl-upcycle: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megatron-dpsl-upcycle: interrupted; no output was written", file=sys.stderr)
        return 130
    if args.dry_run:
        print("\n".join(result.pieces))
    print(result.table)
    print(result.flags_text())
    if result.output is not None:
        print(f"wrote {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
