"""The embedded trainer's command line: Megatron-LM's flag names for the subset it supports.

Every flag keeps Megatron-LM's spelling, default and meaning (``megatron/training/arguments.py`` at
core_v0.16.1) unless its help says otherwise, so a command line moves between this trainer and
Megatron-LM's ``pretrain_gpt.py``. The DPSL flags come from
``megatron_dpsl.megatron_lm.args.add_dpsl_args``. Flags the trainer adds for itself
(``--data-path`` as a corpus directory, ``--device``, ``--routing-stats-path``) say so in their
help.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Sequence

from megatron_dpsl.megatron_lm.args import (
    VLM_LAUNCHER_HINT,
    add_dpsl_args,
    add_moe_load_balancing_args,
    require_token_groups,
)
from megatron_dpsl.train.flag_checks import OneLineErrorParser, check_number

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="megatron-dpsl-train",
        description="Compact GPT/MoE trainer on megatron-core with the DPSL router (Megatron-LM "
        "flag "
        "names).",
        allow_abbrev=False,
    )
    _add_network_size_args(p)
    _add_moe_args(p)
    add_moe_load_balancing_args(p)
    add_dpsl_args(p)
    _add_distributed_args(p)
    _add_pipeline_and_recompute_args(p)
    _add_training_args(p)
    _add_data_args(p)
    _add_checkpointing_args(p)
    _add_logging_args(p)
    return p


def _add_network_size_args(p: argparse.ArgumentParser) -> None:
    """The "network size" flags."""
    g = p.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden size")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument(
        "--num-query-groups", type=int, default=None, help="grouped-query attention (implies GQA)"
    )
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default --seq-length")
    g.add_argument(
        "--vocab-size", type=int, default=256, help="byte-level corpora use 256 (the default)"
    )
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (gated, SiLU)")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g.add_argument(
        "--position-embedding-type",
        choices=["learned_absolute", "rope"],
        default="learned_absolute",
    )
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)


def _add_moe_args(p: argparse.ArgumentParser) -> None:
    """The "moe" flags."""
    g = p.add_argument_group("moe")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument(
        "--moe-ffn-hidden-size", type=int, default=None, help="default --ffn-hidden-size"
    )
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax")
    g.add_argument(
        "--moe-router-enable-expert-bias",
        action="store_true",
        help="aux-loss-free load balancing (Wang et al., arXiv 2408.15664): a per-expert bias "
        "added "
        "to the scores "
        "for top-k selection only, updated after every global batch by Megatron's "
        "finalize_model_grads; "
        "Megatron requires --moe-router-score-function sigmoid",
    )
    g.add_argument(
        "--moe-router-bias-update-rate",
        type=float,
        default=1e-3,
        help="step of the expert-bias update: bias += rate * sign(mean load - expert load) per "
        "global batch",
    )
    g.add_argument(
        "--moe-token-dispatcher-type",
        choices=["allgather", "alltoall", "flex"],
        default="allgather",
        help="on CPU only allgather works (alltoall builds a torch.cuda.Stream); Megatron-LM's "
        "default is allgather",
    )
    g.add_argument("--moe-per-layer-logging", action="store_true")


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    """The "distributed" flags."""
    g = p.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument(
        "--expert-tensor-parallel-size",
        type=int,
        default=None,
        help="default 1 when EP > 1, else TP",
    )
    g.add_argument(
        "--context-parallel-size", type=int, default=1, help="needs Transformer Engine (GPU)"
    )
    g.add_argument(
        "--distributed-backend",
        choices=["nccl", "gloo"],
        default=None,
        help="default: nccl on GPU, gloo on CPU",
    )
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="(trainer flag) cuda when available; cpu enables megatron_dpsl.train.cpu_platform",
    )
    g.add_argument(
        "--optimizer-impl",
        choices=["auto", "megatron", "torch"],
        default="auto",
        help="(trainer flag) megatron.core.optimizer (auto on GPU) or torch.optim.AdamW with "
        "Megatron's param "
        "groups and grad-norm reduction (auto on CPU, where megatron.core.optimizer allocates "
        "on 'cuda')",
    )
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")


def _add_pipeline_and_recompute_args(p: argparse.ArgumentParser) -> None:
    """Pipeline stages (Megatron's 1F1B and interleaved schedules) and activation recompute."""
    g = p.add_argument_group("pipeline parallelism and activation recompute")
    g.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="pipeline stages; each rank builds its stage's layers and runs Megatron's 1F1B "
        "schedule (interleaved with virtual stages)",
    )
    vpp = g.add_mutually_exclusive_group()
    vpp.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        help="layers per virtual stage: the interleaved schedule",
    )
    vpp.add_argument(
        "--num-virtual-stages-per-pipeline-rank",
        type=int,
        default=None,
        help="virtual stages (model chunks) per pipeline rank: the interleaved schedule",
    )
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument(
        "--recompute-modules",
        nargs="*",
        default=None,
        help="with --recompute-granularity selective: Megatron's module names (core_attn, moe, "
        "moe_act, layernorm, mlp, ...); default core_attn",
    )


def _add_training_args(p: argparse.ArgumentParser) -> None:
    """The "training" flags."""
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="default micro batch size * data-parallel size",
    )
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=list(LR_DECAY_STYLES), default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """The "data" flags."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path",
        default=None,
        help="(trainer meaning) a byte-corpus directory written by megatron_dpsl.train.corpus "
        "({train,valid}_{tokens,groups}.bin); per-token group ids feed DPSL group priors",
    )
    g.add_argument("--mock-data", action="store_true", help="random bytes with random group ids")

    add_llava_args(p)


def _add_checkpointing_args(p: argparse.ArgumentParser) -> None:
    """The "checkpointing" flags."""
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument(
        "--save-interval",
        type=int,
        default=None,
        help="default: save once, at the end (when --save)",
    )
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist")
    g.add_argument(
        "--finetune", action="store_true", help="load model weights only, restart at iteration 0"
    )
    sched = g.add_mutually_exclusive_group()
    sched.add_argument(
        "--override-opt_param-scheduler",
        "--override-opt-param-scheduler",
        action="store_true",
        dest="override_opt_param_scheduler",
        help="on --load, use this run's learning-rate and weight-decay schedule flags, not the "
        "checkpoint's",
    )
    sched.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        "--use-checkpoint-opt-param-scheduler",
        action="store_true",
        dest="use_checkpoint_opt_param_scheduler",
        help="on --load, keep the checkpoint's schedule (without either flag the two must match, "
        "as in Megatron-LM)",
    )
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")


def _add_logging_args(p: argparse.ArgumentParser) -> None:
    """The "logging" flags."""
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument(
        "--eval-interval", type=int, default=None, help="default: evaluate at the end only"
    )
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument(
        "--routing-stats-path",
        default=None,
        help="(trainer flag) after each evaluation, write the validation routing probabilities, "
        "expert loads and "
        "group ids (rank 0, .pt) here; the quickstart's plots read it",
    )


def add_llava_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The vision-language flags: Megatron-LM's ``pretrain_vlm.py`` names where it has one."""
    g = p.add_argument_group("vision-language (LLaVA)")
    g.add_argument(
        "--llava",
        action="store_true",
        help="(trainer flag) train Megatron-Core's LLaVAModel (CLIP ViT + MLP projector + this "
        "language model) on the procedural shapes data of megatron_dpsl.train.vlm_data (no "
        "--data-path); MoE routers get each position's modality (group 0 = image embeddings, "
        "1 = text; padding is excluded)",
    )
    g.add_argument(
        "--patch-dim",
        type=int,
        default=16,
        help="ViT patch size (the images are 32x32)",
    )
    g.add_argument(
        "--encoder-num-layers",
        type=int,
        default=None,
        help="ViT layers (default --num-layers)",
    )
    g.add_argument(
        "--vision-hidden-size",
        type=int,
        default=None,
        help="(trainer flag) ViT width (default --hidden-size); its FFN is 4x, its heads "
        "--num-attention-heads",
    )
    g.add_argument(
        "--disable-vision-class-token",
        action="store_true",
        help="drop the ViT's class token rows",
    )
    g.add_argument(
        "--freeze-LM",
        action="store_true",
        help="do not train the language model's parameters",
    )
    g.add_argument(
        "--freeze-ViT",
        action="store_true",
        help="do not train the vision encoder's parameters",
    )
    return p


def _validate_llava(args: argparse.Namespace) -> None:
    """The vision flags: with ``--llava`` its data, ViT shape and combined (text + image) sequence
    length; without it, none of the flags that need a vision-language model."""
    from megatron_dpsl.train import vlm_data

    if not args.llava:
        for flag, name in (("--freeze-LM", "freeze_LM"), ("--freeze-ViT", "freeze_ViT")):
            if getattr(args, name):
                _error(flag, "needs --llava (a vision-language model)")
        return
    if args.data_path is not None or args.mock_data:
        _error(
            "--llava",
            "trains on the procedural shapes data: drop --data-path / --mock-data",
        )
    if args.patch_dim < 1 or vlm_data.IMAGE_SIZE % args.patch_dim:
        _error(
            "--patch-dim",
            f"must divide the image size {vlm_data.IMAGE_SIZE}, got {args.patch_dim}",
        )
    if args.encoder_num_layers is None:
        args.encoder_num_layers = args.num_layers
    if args.vision_hidden_size is None:
        args.vision_hidden_size = args.hidden_size
    if args.vision_hidden_size % args.num_attention_heads:
        _error(
            "--vision-hidden-size",
            f"must be a multiple of --num-attention-heads {args.num_attention_heads}, "
            f"got {args.vision_hidden_size}",
        )
    img_seq_len = vlm_data.image_seq_length(args.patch_dim, args.disable_vision_class_token)
    combined = vlm_data.TEXT_LENGTH + img_seq_len - 1
    if args.seq_length < combined:
        _error(
            "--seq-length",
            f"the shapes rows are {combined} positions long ({vlm_data.TEXT_LENGTH} text tokens, "
            f"the image token replaced by {img_seq_len} embeddings), got {args.seq_length}",
        )


def _count(flag: str, lo: int = 1, hi: int | None = None, note: str = "") -> tuple:
    return flag, dict(lo=lo, hi=hi, integer=True, note=note)


def _real(flag: str, lo: float = 0, hi: float | None = None, **kw) -> tuple:
    return flag, dict(lo=lo, hi=hi, **kw)


# Every numeric flag of the trainer and its range (None: the flag's derived default). The DPSL and
# AC flags are not here: DPSLTransformerConfig (the one validator) checks them under their flags.
NUMERIC_FLAGS = (
    _count("--num-layers"),
    _count("--hidden-size"),
    _count("--ffn-hidden-size"),
    _count("--num-attention-heads"),
    _count("--num-query-groups"),
    _count("--seq-length"),
    _count("--max-position-embeddings"),
    _count("--vocab-size"),
    _count("--make-vocab-size-divisible-by"),
    _real("--init-method-std", lo_open=True),
    _real("--hidden-dropout", hi=1, hi_open=True),
    _real("--attention-dropout", hi=1, hi_open=True),
    _count("--num-experts"),
    _count("--moe-router-topk"),
    _count("--moe-ffn-hidden-size"),
    _real("--moe-z-loss-coeff"),
    _real("--moe-router-bias-update-rate"),
    _real("--moe-aux-loss-coeff"),
    _count("--tensor-model-parallel-size"),
    _count("--expert-model-parallel-size"),
    _count("--expert-tensor-parallel-size"),
    _count("--context-parallel-size"),
    _count("--pipeline-model-parallel-size"),
    _count("--num-layers-per-virtual-pipeline-stage"),
    _count("--num-virtual-stages-per-pipeline-rank"),
    _count("--recompute-num-layers"),
    _count("--micro-batch-size"),
    _count("--global-batch-size"),
    _count("--train-iters"),
    _real("--lr"),
    _real("--min-lr"),
    _count("--lr-warmup-iters", 0),
    _count("--lr-decay-iters"),
    _real("--weight-decay"),
    _real("--adam-beta1", hi=1, hi_open=True),
    _real("--adam-beta2", hi=1, hi_open=True),
    _real("--adam-eps", lo_open=True),
    _real("--clip-grad", note="0 disables clipping"),
    _count("--seed", 0, 2**32 - 1, note="NumPy's seed range"),
    _count("--save-interval"),
    _count("--log-interval"),
    _count("--eval-interval"),
    _count("--eval-iters", note="the trainer evaluates at least once, at the end"),
    _count("--patch-dim"),
    _count("--encoder-num-layers"),
    _count("--vision-hidden-size"),
)


def check_ranges(args: argparse.Namespace) -> None:
    """Every flag of ``NUMERIC_FLAGS`` is finite and in range (lists: each value); ValueError."""
    for flag, bounds in NUMERIC_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None:
                check_number(flag, v, **bounds)


def _error(flag: str, message: str) -> None:
    raise ValueError(f"{flag}: {message}")


def validate_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Fill derived values the way Megatron-LM's ``validate_args`` does; ValueError naming the
    flag."""
    check_ranges(args)
    _derive_model_sizes(args)
    _derive_parallel_layout(args, world_size)
    _derive_pipeline(args)
    _check_recompute(args)
    _check_moe(args)
    _derive_batches_and_schedule(args)
    _check_interleaving(args)
    _validate_llava(args)
    _check_data_and_router_flags(args)
    _check_token_groups(args)
    return args


def _derive_model_sizes(args: argparse.Namespace) -> None:
    """FFN width, position embeddings, attention heads and query groups, the padded vocabulary."""
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        _error(
            "--seq-length",
            f"{args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}",
        )
    if args.num_query_groups is not None and args.num_attention_heads % args.num_query_groups:
        _error(
            "--num-query-groups",
            f"must divide --num-attention-heads {args.num_attention_heads}, got "
            f"{args.num_query_groups}",
        )
    if args.hidden_size % args.num_attention_heads:
        _error(
            "--num-attention-heads",
            f"must divide --hidden-size {args.hidden_size}, got {args.num_attention_heads}",
        )
    if args.num_query_groups is not None:
        args.group_query_attention = True
    else:
        args.group_query_attention = False
    # Megatron-LM's _vocab_size_with_padding
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    args.padded_vocab_size = int(math.ceil(args.vocab_size / multiple) * multiple)


def _derive_parallel_layout(args: argparse.Namespace, world_size: int) -> None:
    """Data-parallel and expert-tensor-parallel sizes from TP/CP/EP and the world; SP and CP
    needs."""
    tp, cp, ep, pp = (
        args.tensor_model_parallel_size,
        args.context_parallel_size,
        args.expert_model_parallel_size,
        args.pipeline_model_parallel_size,
    )
    if world_size % (tp * cp * pp):
        flag = "--tensor-model-parallel-size"
        if pp > 1 and world_size % (tp * cp) == 0:
            flag = "--pipeline-model-parallel-size"
        _error(flag, f"TP {tp} x CP {cp} x PP {pp} must divide the world size {world_size}")
    args.data_parallel_size = world_size // (tp * cp * pp)
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = 1 if ep > 1 else tp
    if world_size % (ep * args.expert_tensor_parallel_size * pp):
        _error(
            "--expert-model-parallel-size",
            f"EP {ep} x ETP {args.expert_tensor_parallel_size} x PP {pp} must divide the world "
            f"size {world_size}",
        )
    if tp == 1 and args.sequence_parallel:
        args.sequence_parallel = False  # Megatron-LM drops it silently too
    if (
        args.sequence_parallel
        and args.transformer_impl == "local"
        and importlib.util.find_spec("apex") is None
    ):
        # megatron-core's WrappedTorchNorm (the local spec's norm without apex) asserts not
        # sequence_parallel
        _error(
            "--sequence-parallel",
            "needs --transformer-impl transformer_engine or NVIDIA apex (the local spec's "
            "torch LayerNorm does not support sequence parallelism); on CPU use EP or DP "
            "instead of TP+SP",
        )
    if cp > 1 and args.transformer_impl != "transformer_engine":
        _error(
            "--context-parallel-size",
            "context parallelism needs --transformer-impl transformer_engine (a GPU)",
        )


def _derive_pipeline(args: argparse.Namespace) -> None:
    """Layers per stage and the virtual-stage count, as Megatron-LM's ``validate_args`` derives
    ``virtual_pipeline_model_parallel_size``; the p2p settings gloo can run."""
    pp = args.pipeline_model_parallel_size
    per_layers = args.num_layers_per_virtual_pipeline_stage
    chunks = args.num_virtual_stages_per_pipeline_rank
    if args.num_layers % pp:
        _error(
            "--pipeline-model-parallel-size",
            f"must divide --num-layers {args.num_layers}, got {pp}",
        )
    per_stage = args.num_layers // pp
    if per_layers is not None:
        if per_stage % per_layers:
            _error(
                "--num-layers-per-virtual-pipeline-stage",
                f"must divide the {per_stage} layers of each pipeline stage, got {per_layers}",
            )
        chunks = per_stage // per_layers
    if chunks is not None and per_stage % chunks:
        _error(
            "--num-virtual-stages-per-pipeline-rank",
            f"must divide the {per_stage} layers of each pipeline stage, got {chunks}",
        )
    args.virtual_pipeline_model_parallel_size = chunks if chunks and chunks > 1 else None
    if args.virtual_pipeline_model_parallel_size and pp == 1:
        flag = "--num-layers-per-virtual-pipeline-stage"
        if per_layers is None:
            flag = "--num-virtual-stages-per-pipeline-rank"
        _error(flag, "the interleaved schedule needs --pipeline-model-parallel-size > 1")
    # Megatron-LM: p2p overlap with the interleaved schedule, batched p2p otherwise (the trainer
    # turns batching off on gloo, which has none, once the backend is known)
    args.overlap_p2p_comm = args.virtual_pipeline_model_parallel_size is not None
    args.batch_p2p_comm = not args.overlap_p2p_comm
    if pp > 1 and args.llava:
        _error(
            "--pipeline-model-parallel-size",
            "--llava trains on one pipeline stage in the embedded trainer; pipeline a LLaVA "
            "model with python -m megatron_dpsl.megatron_lm.pretrain_vlm",
        )


def _check_recompute(args: argparse.Namespace) -> None:
    """Megatron-LM's recompute rules: full needs a method and a layer count; selective takes
    modules, not a method."""
    granularity = args.recompute_granularity
    if granularity == "full":
        for flag, value in (
            ("--recompute-method", args.recompute_method),
            ("--recompute-num-layers", args.recompute_num_layers),
        ):
            if value is None:
                _error(flag, "--recompute-granularity full needs it (uniform or block; a count)")
        if args.recompute_modules is not None:
            _error("--recompute-modules", "needs --recompute-granularity selective")
    elif granularity == "selective":
        if args.recompute_method is not None:
            _error("--recompute-method", "only with --recompute-granularity full")
    else:
        for flag, value in (
            ("--recompute-method", args.recompute_method),
            ("--recompute-num-layers", args.recompute_num_layers),
            ("--recompute-modules", args.recompute_modules),
        ):
            if value is not None:
                _error(flag, "needs --recompute-granularity (full or selective)")


def _check_interleaving(args: argparse.Namespace) -> None:
    """Megatron's interleaved schedule runs the micro-batches in groups of PP."""
    pp = args.pipeline_model_parallel_size
    if args.virtual_pipeline_model_parallel_size and args.num_microbatches % pp:
        _error(
            "--global-batch-size",
            f"the interleaved schedule needs a micro-batch count ({args.num_microbatches} = "
            f"--global-batch-size / (--micro-batch-size x data-parallel size)) that is a "
            f"multiple of --pipeline-model-parallel-size {pp}",
        )


def _check_moe(args: argparse.Namespace) -> None:
    """MoE flags against the model and the layout (EP divides the experts, top-k, biases, SP)."""
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    if args.num_experts is not None:
        if args.num_experts % ep:
            _error(
                "--expert-model-parallel-size",
                f"must divide --num-experts {args.num_experts}, got {ep}",
            )
        if not 1 <= args.moe_router_topk <= args.num_experts:
            _error(
                "--moe-router-topk",
                f"must be in [1, --num-experts={args.num_experts}], got {args.moe_router_topk}",
            )
        if args.moe_ffn_hidden_size is None:
            args.moe_ffn_hidden_size = args.ffn_hidden_size
        if args.add_bias_linear:
            # SequentialMLP adds the expert bias in place on a tensor-parallel-region view; autograd
            # refuses
            _error(
                "--disable-bias-linear",
                "MoE models need it with megatron-core 0.16.1's local experts (as "
                "Megatron-LM's MoE examples use)",
            )
        if tp > 1 and not args.sequence_parallel:
            _error(
                "--sequence-parallel",
                "MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel "
                "(Megatron's rule)",
            )
    elif ep > 1:
        _error("--expert-model-parallel-size", "needs --num-experts")


def _derive_batches_and_schedule(args: argparse.Namespace) -> None:
    """Global batch and micro-batch count; learning-rate schedule and interval bounds."""
    mb_dp = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = mb_dp
    if args.global_batch_size % mb_dp:
        _error(
            "--global-batch-size",
            "must be a multiple of --micro-batch-size x data-parallel size = "
            f"{args.micro_batch_size} x "
            f"{args.data_parallel_size}, got {args.global_batch_size}",
        )
    args.num_microbatches = args.global_batch_size // mb_dp
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.min_lr > args.lr:
        _error("--min-lr", f"must be <= --lr {args.lr}, got {args.min_lr}")
    if args.lr_warmup_iters < 0 or args.lr_warmup_iters > args.lr_decay_iters:
        _error(
            "--lr-warmup-iters",
            f"must be in [0, --lr-decay-iters={args.lr_decay_iters}], got {args.lr_warmup_iters}",
        )
    if args.eval_interval is not None and args.eval_interval < 1:
        _error("--eval-interval", f"must be >= 1, got {args.eval_interval}")
    if args.save_interval is not None and args.save_interval < 1:
        _error("--save-interval", f"must be >= 1, got {args.save_interval}")
    if args.log_interval < 1:
        _error("--log-interval", f"must be >= 1, got {args.log_interval}")


def _check_data_and_router_flags(args: argparse.Namespace) -> None:
    """One data source; the router's z-loss and expert-bias flags."""
    if args.data_path is None and not args.mock_data and not args.llava:
        _error(
            "--data-path",
            "give a corpus directory (python -m megatron_dpsl.train.corpus --out DIR) or "
            "--mock-data",
        )
    if args.data_path is not None and args.mock_data:
        _error("--mock-data", "give either --data-path or --mock-data")
    if args.moe_z_loss_coeff is not None and args.moe_z_loss_coeff < 0:
        _error("--moe-z-loss-coeff", f"must be >= 0, got {args.moe_z_loss_coeff}")
    if args.moe_router_bias_update_rate < 0:
        _error(
            "--moe-router-bias-update-rate", f"must be >= 0, got {args.moe_router_bias_update_rate}"
        )
    if args.moe_router_enable_expert_bias and args.num_experts is None:
        _error("--moe-router-enable-expert-bias", "needs --num-experts (an MoE model)")


def _check_token_groups(args: argparse.Namespace) -> None:
    """``--moe-dpsl-token-groups``: the corpus gives each document's group (``dataset``); the
    trainer's LLaVA (``--llava``, when present) the modality, with vision on group 0."""
    llava = getattr(args, "llava", False)
    hint = (
        "the embedded trainer has one with --llava" if hasattr(args, "llava") else VLM_LAUNCHER_HINT
    )
    require_token_groups(
        args, ("modality",) if llava else ("dataset",), "megatron-dpsl-train", hint=hint
    )
    if getattr(args, "moe_dpsl_vision_group", None) not in (None, 0):
        _error("--moe-dpsl-vision-group", "the embedded trainer puts vision on group 0")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); ``validate_args`` runs once the world size is
    known."""
    return build_parser().parse_args(argv)
