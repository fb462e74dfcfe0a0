"""The VLM launcher's command lines for the chain child (tests/support/megatron_lm_chain.py),
unpatched tree.

``vlm_cases(work)`` returns the cases (each run through Megatron-LM's real call chain up to the NCCL
``init_process_group``) and ``VLM_BUILD_ARGV`` the build (the provider's model on one gloo rank,
megatron_lm_vlm_build.py). ``write_checkpoint_args`` writes the ``--load`` checkpoints the
vision-config cases read: Megatron-LM's legacy ``torch`` layout
(``latest_checkpointed_iteration.txt``, ``iter_0000004/mp_rank_00/model_optim_rng.pt`` with the
run's ``args``), holding only what the check reads.

"""

from __future__ import annotations

import argparse
from pathlib import Path

import megatron_lm_vlm_story as vlm_story  # scripts/: the GPU stage's argv

MODALITY = [
    "--moe-dpsl-alpha-base",
    "0.75",
    "--moe-dpsl-alpha-shift",
    "0.5",
    "--moe-dpsl-num-groups",
    "2",
]
VISION = [
    "--img-h",
    "336",
    "--img-w",
    "336",
    "--patch-dim",
    "14",
    "--disable-vision-class-token",
    "--freeze-ViT",
]


def readme_argv(work: Path) -> list[str]:
    """docs/vlm.md's command: a small LLaVA, 4 experts top-2, aux_loss + DPSL with modality
    priors."""
    return [
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "64",
        "--max-position-embeddings",
        "1024",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        "10",
        "--lr",
        "1e-4",
        "--bf16",
        *VISION,
        "--num-experts",
        "4",
        "--moe-router-topk",
        "2",
        "--moe-router-load-balancing-type",
        "aux_loss",
        "dpsl",
        "--moe-aux-loss-coeff",
        "1e-3",
        "0.01",
        *MODALITY,
        "--moe-dpsl-token-groups",
        "modality",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "1024",
        "--ckpt-format",
        "torch",
        "--save",
        str(work / "ckpt"),
        "--load",
        str(work / "ckpt"),
        "--save-interval",
        "5",
        "--eval-iters",
        "0",
        "--log-interval",
        "1",
    ]


def _without(argv: list[str], flag: str, values: int = 1) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + values :]


def _replace(argv: list[str], flag: str, *values: str) -> list[str]:
    i = argv.index(flag)
    return argv[: i + 1] + list(values) + argv[i + 1 + len(values) :]


def write_checkpoint_args(load: Path, **changes) -> None:
    """A legacy ``torch`` checkpoint under ``load`` whose ``args`` are ``readme_argv``'s vision
    flags
    with ``changes`` (``args`` names) applied."""
    import torch

    saved = dict(
        img_h=336,
        img_w=336,
        patch_dim=14,
        disable_vision_class_token=True,
        encoder_num_layers=2,
        num_layers=2,
        vision_model_type=None,
    )
    saved.update(changes)
    step = load / "iter_0000004" / "mp_rank_00"
    step.mkdir(parents=True, exist_ok=True)
    state = {"args": argparse.Namespace(**saved), "iteration": 4, "checkpoint_version": 3.0}
    torch.save(state, step / "model_optim_rng.pt")
    (load / "latest_checkpointed_iteration.txt").write_text("4")


def vlm_cases(work: Path) -> list[dict]:
    """Every VLM case of the unpatched tree's child."""
    work = Path(work) / "vlm"
    readme = readme_argv(work)
    write_checkpoint_args(work / "ckpt_same")
    write_checkpoint_args(work / "ckpt_224", img_h=224, img_w=224)
    write_checkpoint_args(work / "ckpt_cls", disable_vision_class_token=False)
    load = lambda d: _replace(readme, "--load", str(work / d))  # noqa: E731
    cases = {
        "vlm_launcher_readme": ("launcher", readme, {}),
        "vlm_megatron_lm_readme": ("megatron_lm", readme, {}),
        "vlm_groups_without_modality": (
            "launcher",
            _without(readme, "--moe-dpsl-token-groups"),
            {},
        ),
        "vlm_modality_without_groups": (
            "launcher",
            [*_without(readme, "--moe-dpsl-alpha-base", 5), "--moe-dpsl-alpha", "0.75"],
            {},
        ),
        "vlm_modality_four_groups": (
            "launcher",
            _replace(readme, "--moe-dpsl-num-groups", "4"),
            {},
        ),
        "vlm_pipeline_groups": (
            "launcher",
            [*readme, "--pipeline-model-parallel-size", "2"],
            {"WORLD_SIZE": "2"},
        ),
        "vlm_virtual_pipeline_groups": (
            "launcher",
            [
                *_replace(readme, "--num-layers", "4"),
                *("--pipeline-model-parallel-size", "2"),
                *("--num-layers-per-virtual-pipeline-stage", "1"),
            ],
            {"WORLD_SIZE": "2"},
        ),
        "vlm_load_same_vision": ("launcher", load("ckpt_same"), {}),
        "vlm_load_other_image_size": ("launcher", load("ckpt_224"), {}),
        "vlm_load_other_class_token": ("launcher", load("ckpt_cls"), {}),
    }
    out = [
        {"name": name, "entry": entry, "script": "pretrain_vlm", "argv": argv, "env": env}
        for name, (entry, argv, env) in cases.items()
    ]
    for te in (False, True):
        for stage in vlm_story.stages(work / "story", te):
            name = f"story_{stage.name}_{'te' if te else 'local'}"
            out.append(
                {
                    "name": name,
                    "entry": "launcher",
                    "script": "pretrain_vlm",
                    "argv": list(stage.argv),
                }
            )
    return out


# The build: a tiny LLaVA at the story's choices (CLIP widths, Llama-style LM, RoPE base and
# factor, tied,
# frozen ViT, modality priors with vision on group 1), small enough for one CPU forward.
VLM_BUILD_ARGV = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "16",
    "--max-position-embeddings",
    "64",
    "--micro-batch-size",
    "2",
    "--img-h",
    "32",
    "--img-w",
    "32",
    "--patch-dim",
    "8",
    "--disable-vision-class-token",
    "--freeze-ViT",
    "--vision-model-type",
    "clip",
    "--position-embedding-type",
    "rope",
    "--rotary-base",
    "500000",
    "--use-rope-scaling",
    "--rope-scaling-factor",
    "32",
    "--swiglu",
    "--disable-bias-linear",
    "--normalization",
    "RMSNorm",
    "--num-experts",
    "4",
    "--moe-router-topk",
    "2",
    "--moe-token-dispatcher-type",
    "allgather",
    "--moe-router-load-balancing-type",
    "aux_loss",
    "dpsl",
    "--moe-aux-loss-coeff",
    "0.01",
    "0.01",
    *MODALITY,
    "--moe-dpsl-token-groups",
    "modality",
    "--moe-dpsl-vision-group",
    "1",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "128",
    "--mock-data",
    "--ckpt-format",
    "torch",
    "--transformer-impl",
    "local",
    "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion",
    "--no-persist-layer-norm",
    "--no-rope-fusion",
    "--no-masked-softmax-fusion",
]
