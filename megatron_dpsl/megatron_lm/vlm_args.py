"""The VLM launcher's own flags and the checks that stop a command it cannot honour before training.

``check_vlm_args(args)`` raises ``ValueError`` with one line naming the flag, the cause and the
allowed values; the launcher turns it into ``SystemExit`` before ``pretrain`` builds anything or
writes a checkpoint. It reads Megatron-LM's parsed namespace (validated or not: core_v0.16.1's
launcher checks a parse of its own before ``pretrain`` parses again).

"""

from __future__ import annotations

import argparse

from megatron_dpsl.megatron_lm.args import check_given_flags
from megatron_dpsl.megatron_lm.hooks import num_token_groups
from megatron_dpsl.megatron_lm.saved_args import read_saved_args

VISION_MODEL_TYPES = ("clip",)
CKPT_FORMATS = ("torch", "torch_dist")
_GROUP_FLAGS = "--moe-dpsl-group-alphas/--moe-dpsl-num-groups"

# The flags that shape the vision encoder or the image positions, as (flag, args name). A checkpoint
# saved with other values has a different ViT, or puts the images at other positions than these
# flags.
VISION_FLAGS = (
    ("--img-h", "img_h"),
    ("--img-w", "img_w"),
    ("--patch-dim", "patch_dim"),
    ("--disable-vision-class-token", "disable_vision_class_token"),
    ("--encoder-num-layers", "encoder_num_layers"),
    ("--vision-model-type", "vision_model_type"),
)


def add_vlm_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The launcher's flags (idempotent)."""
    if any(a.dest == "vision_model_type" for a in parser._actions):
        return parser
    group = parser.add_argument_group(
        title="llava (megatron-dpsl)",
        description="megatron_dpsl.megatron_lm.pretrain_vlm: the vision encoder's shape.",
    )
    group.add_argument(
        "--vision-model-type",
        choices=list(VISION_MODEL_TYPES),
        default=None,
        help="clip: the vision encoder gets CLIP ViT-L/14's widths (hidden 1024, 16 heads, FFN "
        "4096, "
        "QuickGELU, LayerNorm, biases; examples/multimodal's --vision-model-type clip) with "
        "--encoder-num-layers layers, whatever the language model's widths. Default: "
        "pretrain_vlm's "
        "encoder, a copy of the language model's config.",
    )
    return parser


def _encoder_layers(args) -> int | None:
    # before validate_args, --num-layers alone means the encoder has that many layers too
    return getattr(args, "encoder_num_layers", None) or getattr(args, "num_layers", None)


def check_token_groups(args) -> None:
    """Group priors need ``--moe-dpsl-token-groups modality``, and it needs group priors with two
    groups."""
    source = getattr(args, "moe_dpsl_token_groups", None)
    groups = num_token_groups(args)
    if groups is None:
        return  # check_given_flags refuses --moe-dpsl-token-groups without group priors
    if source != "modality":
        raise ValueError(
            f"{_GROUP_FLAGS}: pretrain_vlm's batches carry no dataset ids; pass "
            "--moe-dpsl-token-groups "
            f"modality (image rows take --moe-dpsl-vision-group's prior, text the other), got "
            f"{source or 'none'}"
        )
    vision = getattr(args, "moe_dpsl_vision_group", None)
    if vision not in (None, 0, 1):
        raise ValueError(
            f"--moe-dpsl-vision-group: 0 (vision on group 0's experts) or 1, got {vision}"
        )
    if groups != 2:
        raise ValueError(
            f"--moe-dpsl-token-groups modality: two prior groups (vision, text), got {groups} "
            f"from {_GROUP_FLAGS}"
        )


def check_parallel_layout(args) -> None:
    """The layouts in which the modality ids cannot reach every router.

    Pipeline stages are fine: ``pretrain_vlm`` gives every stage its batch (its dataset provider is
    ``is_distributed``), and each stage's hook computes the ids from the ``input_ids`` its forward
    gets (``models.llava_token_groups``). Virtual stages are not: the hook follows one model chunk.
    """
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if pp > 1 and (getattr(args, "context_parallel_size", 1) or 1) > 1:
        # stock model_provider's assertion, here before anything is built
        raise ValueError(
            "--context-parallel-size: pretrain_vlm does not combine it with "
            "--pipeline-model-parallel-size > 1 (its mock data is not packed for PP)"
        )
    if num_token_groups(args) is None:
        return
    vpp = [
        flag
        for flag, name in (
            ("--num-layers-per-virtual-pipeline-stage", "num_layers_per_virtual_pipeline_stage"),
            ("--num-virtual-stages-per-pipeline-rank", "num_virtual_stages_per_pipeline_rank"),
            # what validate_args derives from either
            ("--num-virtual-stages-per-pipeline-rank", "virtual_pipeline_model_parallel_size"),
        )
        if getattr(args, name, None) is not None
    ]
    if vpp:
        raise ValueError(
            f"{vpp[0]}: virtual pipeline stages cannot follow the modality ids yet (one model "
            "chunk per stage); drop it with --moe-dpsl-token-groups modality"
        )
    if (getattr(args, "context_parallel_size", 1) or 1) > 1 and getattr(
        args, "use_packed_sequence", False
    ):
        raise ValueError(
            "--use-packed-sequence: with --context-parallel-size > 1 pretrain_vlm packs the batch "
            "as THD, where the modality ids cannot follow; drop one of them with "
            "--moe-dpsl-token-groups modality"
        )
    if getattr(args, "overlap_moe_expert_parallel_comm", False):
        raise ValueError(
            "--overlap-moe-expert-parallel-comm runs micro-batches' forwards interleaved; not "
            "supported with --moe-dpsl-token-groups modality"
        )


def check_checkpoint_vision(args) -> None:
    """``--load``'s checkpoint (when there is one) must have been saved with this run's vision
    flags."""
    load = getattr(args, "load", None)
    if not load or getattr(args, "use_checkpoint_args", False):
        return
    saved = read_saved_args(load, getattr(args, "ckpt_step", None))
    if saved is None:
        # no checkpoint yet: Megatron-LM starts from scratch (--exit-on-missing-checkpoint: refuses)
        return
    theirs_ns, where = saved
    for flag, name in VISION_FLAGS:
        ours = _encoder_layers(args) if name == "encoder_num_layers" else getattr(args, name, None)
        theirs = (
            _encoder_layers(theirs_ns)
            if name == "encoder_num_layers"
            else getattr(theirs_ns, name, None)
        )
        if ours != theirs:
            raise ValueError(
                f"{flag}: this run has {_shown(ours)}, the checkpoint {where} was saved with "
                f"{_shown(theirs)} (its vision encoder and image positions follow it); give {flag} "
                f"as saved, or --load a checkpoint saved with {_shown(ours)}"
            )
    _check_clip_widths(args, theirs_ns, where)


# With --vision-model-type clip: the widths the launcher builds, against what an upcycled Hugging
# Face LLaVA's args record (megatron_dpsl.upcycle.llava_hf); None: the language model's hidden size.
CLIP_WIDTHS = (
    ("vision_hidden_size", 1024),
    ("vision_ffn_hidden_size", 4096),
    ("vision_num_attention_heads", 16),
    ("vision_projector_ffn_hidden_size", None),
)


def _check_clip_widths(args, saved, where: str) -> None:
    if getattr(args, "vision_model_type", None) != "clip":
        return
    for name, ours in CLIP_WIDTHS:
        ours = args.hidden_size if ours is None else ours
        theirs = getattr(saved, name, None)
        if theirs is not None and theirs != ours:
            raise ValueError(
                f"--vision-model-type clip: builds {name} {ours} (CLIP ViT-L/14, LLaVA-1.5's "
                f"projector), the checkpoint {where} has {theirs}; only such LLaVAs load through "
                "the launcher"
            )


def _shown(value) -> str:
    if isinstance(value, bool):
        return "the flag given" if value else "the flag not given"
    return "none" if value is None else str(value)


def check_vlm_args(args) -> None:
    """Every launcher check, in the order a user would fix them (``ValueError`` naming the flag)."""
    fmt = getattr(args, "ckpt_format", "torch")
    if fmt not in CKPT_FORMATS:
        raise ValueError(
            f"--ckpt-format: the VLM launcher saves and loads {' or '.join(CKPT_FORMATS)}, got "
            f"{fmt}"
        )
    check_given_flags(
        args
    )  # the DPSL flags' own rules, before the config is built (after the process group)
    check_token_groups(args)
    check_parallel_layout(args)
    check_checkpoint_vision(args)
