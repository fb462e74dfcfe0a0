"""The VLM launcher's flag checks (megatron_lm/vlm_args.py), the token-group flags (args.py) and the
reader of a checkpoint's saved ``args`` (saved_args.py), on namespaces as Megatron-LM's parser makes
them."""

from __future__ import annotations

import argparse

import pytest

from megatron_dpsl.megatron_lm.args import add_dpsl_args, check_given_flags, require_token_groups
from megatron_dpsl.megatron_lm.saved_args import read_saved_args
from megatron_dpsl.megatron_lm.vlm_args import add_vlm_args, check_vlm_args


def _args(*argv: str) -> argparse.Namespace:
    """A parse of ``argv`` with the DPSL and VLM flags and the Megatron-LM flags the checks read."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--moe-router-load-balancing-type", nargs="+", default="aux_loss")
    parser.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=0.0)
    for flag, default in (
        ("--pipeline-model-parallel-size", 1),
        ("--num-layers-per-virtual-pipeline-stage", None),
        ("--num-virtual-stages-per-pipeline-rank", None),
        ("--context-parallel-size", 1),
        ("--num-layers", 2),
        ("--hidden-size", 64),
        ("--encoder-num-layers", None),
        ("--img-h", 336),
        ("--img-w", 336),
        ("--patch-dim", 14),
    ):
        parser.add_argument(flag, type=int, default=default)
    for flag in ("--use-packed-sequence", "--disable-vision-class-token", "--use-checkpoint-args"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--overlap-moe-expert-parallel-comm", action="store_true")
    parser.add_argument("--ckpt-format", default="torch_dist")
    parser.add_argument("--load", default=None)
    parser.add_argument("--ckpt-step", type=int, default=None)
    return add_vlm_args(add_dpsl_args(parser)).parse_args(list(argv))


MODALITY = (
    "--moe-router-load-balancing-type",
    "dpsl",
    "--moe-dpsl-alpha-base",
    "0.75",
    "--moe-dpsl-alpha-shift",
    "0.5",
    "--moe-dpsl-num-groups",
    "2",
    "--moe-dpsl-token-groups",
    "modality",
)


def test_modality_priors_pass():
    check_vlm_args(_args(*MODALITY, "--moe-dpsl-vision-group", "1"))
    # every pretrain_vlm stage gets its batch, so the ids follow pipeline stages
    check_vlm_args(_args(*MODALITY, "--pipeline-model-parallel-size", "4"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ("--moe-router-load-balancing-type", "dpsl", "--moe-dpsl-token-groups", "modality"),
            "--moe-dpsl-token-groups modality: names where each token's prior group comes from; "
            "it needs group priors",
        ),
        (
            ("--moe-router-load-balancing-type", "dpsl", "--moe-dpsl-vision-group", "1"),
            "--moe-dpsl-vision-group: only used with --moe-dpsl-token-groups modality, got none",
        ),
        (
            (*MODALITY[:-2], "--moe-dpsl-token-groups", "dataset", "--moe-dpsl-vision-group", "0"),
            "--moe-dpsl-vision-group: only used with --moe-dpsl-token-groups modality, got dataset",
        ),
    ],
)
def test_token_group_flags_need_what_they_name(argv, message):
    with pytest.raises(ValueError) as e:
        check_given_flags(_args(*argv))
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ("--moe-dpsl-vision-group", "2"),
            "--moe-dpsl-vision-group: 0 (vision on group 0's experts) or 1, got 2",
        ),
        (
            ("--context-parallel-size", "2", "--use-packed-sequence"),
            "--use-packed-sequence: with --context-parallel-size > 1",
        ),
        (
            ("--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"),
            "--num-virtual-stages-per-pipeline-rank: virtual pipeline stages cannot follow",
        ),
        (
            ("--pipeline-model-parallel-size", "2", "--context-parallel-size", "2"),
            "--context-parallel-size: pretrain_vlm does not combine it with "
            "--pipeline-model-parallel-size > 1",
        ),
        # core_v0.19's validate_args refuses torch_dcp without FSDP itself; core_v0.16.1's does not
        (
            ("--ckpt-format", "torch_dcp"),
            "--ckpt-format: the VLM launcher saves and loads torch or torch_dist, got torch_dcp",
        ),
        (
            ("--overlap-moe-expert-parallel-comm",),
            "--overlap-moe-expert-parallel-comm runs micro-batches'",
        ),
    ],
)
def test_layouts_the_modality_ids_cannot_follow_are_refused(extra, message):
    with pytest.raises(ValueError) as e:
        check_vlm_args(_args(*MODALITY, *extra))
    assert str(e.value).startswith(message)


def test_gpt_entry_points_refuse_modality_priors():
    """Modality priors without a vision encoder: pretrain_gpt (launcher, patched script) has no
    image
    rows."""
    args = _args(*MODALITY)
    with pytest.raises(ValueError) as e:
        require_token_groups(args, ("dataset",), "pretrain_gpt")
    assert str(e.value).startswith(
        "--moe-dpsl-token-groups modality: pretrain_gpt has no vision encoder, so no token is an "
        "image"
    )
    require_token_groups(
        _args(*MODALITY[:-2], "--moe-dpsl-token-groups", "dataset"), ("dataset",), "x"
    )
    require_token_groups(_args(*MODALITY[:-2]), ("dataset",), "pretrain_gpt")  # the default source


def test_saved_args_of_a_torch_dist_checkpoint(tmp_path):
    """Megatron-LM's torch_dist layout as its dist_checkpointing writes it (args in the common
    state)."""
    from megatron.core import dist_checkpointing
    from support.megatron_cpu import init_single_process

    init_single_process()
    step = tmp_path / "iter_0000007"
    step.mkdir()
    saved = argparse.Namespace(
        img_h=224, img_w=336, patch_dim=14, num_layers=2, encoder_num_layers=2
    )
    dist_checkpointing.save({"args": saved, "iteration": 7}, str(step))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    args, where = read_saved_args(str(tmp_path))
    assert (args.img_h, where) == (224, str(step))
    with pytest.raises(ValueError) as e:
        check_vlm_args(_args(*MODALITY, "--load", str(tmp_path)))
    assert str(e.value).startswith(
        f"--img-h: this run has 336, the checkpoint {step} was saved with 224"
    )


def test_no_checkpoint_yet_is_no_contradiction(tmp_path):
    assert read_saved_args(str(tmp_path)) is None
    check_vlm_args(_args(*MODALITY, "--load", str(tmp_path)))


def test_embedded_trainer_refuses_modality_priors_without_a_vision_encoder():
    """The trainer parses the same flags (add_dpsl_args): its corpus gives dataset groups only."""
    from megatron_dpsl.train.arguments import parse_args, validate_args

    tiny = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4"]
    tiny += ["--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "1", "--num-experts"]
    tiny += ["4", "--disable-bias-linear", *MODALITY]
    with pytest.raises(ValueError) as e:
        validate_args(parse_args(tiny), world_size=1)
    assert str(e.value).startswith(
        "--moe-dpsl-token-groups modality: megatron-dpsl-train has no vision encoder, so no token "
        "is an image"
    )
    validate_args(parse_args([*tiny[:-2], "--moe-dpsl-token-groups", "dataset"]), world_size=1)


def test_clip_widths_of_an_upcycled_hf_llava_must_be_clip_l(tmp_path):
    """An HF LLaVA the upcycler converted records its CLIP widths in args; with --vision-model-type
    clip the launcher builds CLIP ViT-L/14 and LLaVA-1.5's projector (FFN = the LM hidden size)."""
    import torch

    saved = argparse.Namespace(
        img_h=336, img_w=336, patch_dim=14, num_layers=2, encoder_num_layers=2,
        disable_vision_class_token=False, vision_model_type="clip", vision_hidden_size=1024,
        vision_ffn_hidden_size=4096, vision_num_attention_heads=16,
        vision_projector_ffn_hidden_size=64,
    )  # fmt: skip
    step = tmp_path / "release" / "mp_rank_00"
    step.mkdir(parents=True)
    torch.save({"args": saved}, step / "model_optim_rng.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    argv = [*MODALITY, "--load", str(tmp_path), "--vision-model-type", "clip"]
    check_vlm_args(_args(*argv, "--hidden-size", "64"))
    with pytest.raises(ValueError) as e:
        check_vlm_args(_args(*argv, "--hidden-size", "128"))
    assert str(e.value).startswith(
        "--vision-model-type clip: builds vision_projector_ffn_hidden_size 128 (CLIP ViT-L/14, "
        "LLaVA-1.5's projector), the checkpoint "
    )
