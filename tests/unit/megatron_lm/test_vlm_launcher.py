"""``python -m megatron_dpsl.megatron_lm.pretrain_vlm`` through Megatron-LM's real call chain on
CPU.

For the tag of the installed megatron-core (core_v0.16.1 with 0.16.1, core_v0.19.0 with 0.19.2), the
unpatched tree's child (tests/support/megatron_lm_chain.py; cases in megatron_lm_vlm_cases.py) runs:
``main()`` -> [core_v0.16.1: the launcher's own parse and checks] -> [core_v0.19.0:
``parse_and_validate_args``, the checks, ``pretrain_cfg_container_from_args``] -> ``pretrain`` ->
``ft_integration.setup`` (a parse without the launcher's provider) -> ``initialize_megatron`` ->
``_initialize_distributed`` -> the NCCL ``init_process_group`` (the boundary; replaced leaves: see
megatron_lm_chain.py). The build (megatron_lm_vlm_build.py) then runs the model providers on one
gloo rank: stock ``pretrain_vlm.model_provider`` and the launcher's, and one forward/backward of the
launcher's model on ``pretrain_vlm``'s own mock sample.

"""

from __future__ import annotations

import pytest

CHAIN = [
    "training.pretrain",
    "ft_integration.setup",
    "initialize.initialize_megatron",
    "initialize._initialize_distributed",
]
ALSO = [
    "arguments.validate_args",
    "global_vars.set_global_variables",
    "global_vars._build_tokenizer",
]


def _explain(report: dict) -> str:
    return (
        f"ended: {report.get('ended')} {report.get('exit_code') or ''} "
        f"{report.get('error') or ''}\n"
        f"{report.get('traceback') or ''}\nstderr: {report.get('stderr', '')[-1500:]}"
    )


def _assert_reached_boundary(report: dict, tag: str) -> None:
    assert report["ended"] == "boundary", _explain(report)
    assert report["boundary"] == {"backend": "nccl", "rank": 0, "world_size": 1}
    calls = report["calls"]
    assert [c for c in calls if c in CHAIN] == CHAIN, calls
    assert set(ALSO) <= set(calls), calls
    if tag == "core_v0.19.0":
        assert "argument_utils.pretrain_cfg_container_from_args" in calls
        assert report["parses"] == 2, calls  # parse_and_validate_args, ft_integration.setup
    else:
        assert report["parses"] == 3, (
            calls
        )  # the launcher's check, ft_integration.setup, initialize_megatron


def _exit_message(report: dict) -> str:
    assert report["ended"] == "exit", _explain(report)
    return str(report["exit_code"])


@pytest.fixture(scope="module")
def vlm(megatron_lm_reports):
    return megatron_lm_reports["unpatched"]


def test_launcher_runs_the_readme_command_to_the_cuda_boundary(vlm, megatron_lm_trees):
    report = vlm["vlm_launcher_readme"]
    _assert_reached_boundary(report, megatron_lm_trees["tag"])
    args = report["args"]
    assert args["moe_router_load_balancing_type"] == ["aux_loss", "dpsl"]
    assert (
        args["moe_dpsl_alpha_base"],
        args["moe_dpsl_alpha_shift"],
        args["moe_dpsl_num_groups"],
    ) == (
        0.75,
        0.5,
        2,
    )
    assert args["num_experts"] == 4


def test_stock_pretrain_vlm_rejects_the_same_command(vlm):
    report = vlm["vlm_megatron_lm_readme"]
    assert (report["ended"], report["exit_code"]) == ("exit", 2), _explain(report)
    assert "argument --moe-router-load-balancing-type: invalid choice: 'dpsl'" in report["stderr"]


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "vlm_groups_without_modality",
            "--moe-dpsl-group-alphas/--moe-dpsl-num-groups: pretrain_vlm's batches carry no "
            "dataset ids; "
            "pass --moe-dpsl-token-groups modality",
        ),
        (
            "vlm_modality_without_groups",
            "--moe-dpsl-token-groups modality: names where each token's",
        ),
        (
            "vlm_modality_four_groups",
            "--moe-dpsl-token-groups modality: two prior groups (vision, text), got 4",
        ),
        (
            "vlm_virtual_pipeline_groups",
            "--num-layers-per-virtual-pipeline-stage: virtual pipeline stages cannot follow the "
            "modality ids yet",
        ),
        ("vlm_load_other_image_size", "--img-h: this run has 336, the checkpoint "),
        (
            "vlm_load_other_class_token",
            "--disable-vision-class-token: this run has the flag given, the checkpoint ",
        ),
    ],
)
def test_bad_command_lines_stop_before_megatron_lm_initialises(vlm, case, message):
    """One line naming the flag, before pretrain builds or writes anything (no process group
    yet)."""
    report = vlm[case]
    assert _exit_message(report).startswith(message), _explain(report)
    assert "initialize._initialize_distributed" not in report["calls"]


def test_group_priors_under_pipeline_parallelism_reach_the_cuda_boundary(vlm):
    """Every pretrain_vlm stage gets its batch: each stage's hook has the input_ids (two ranks)."""
    report = vlm["vlm_pipeline_groups"]
    assert report["ended"] == "boundary", _explain(report)
    assert report["boundary"] == {"backend": "nccl", "rank": 0, "world_size": 2}
    assert report["args"]["moe_dpsl_num_groups"] == 2


def test_a_checkpoint_saved_with_the_same_vision_flags_passes_the_check(vlm, megatron_lm_trees):
    _assert_reached_boundary(vlm["vlm_load_same_vision"], megatron_lm_trees["tag"])


@pytest.mark.parametrize("spec", ["local", "te"])
@pytest.mark.parametrize("stage", ["vlm_aux", "vlm_dpsl"])
def test_gpu_story_vlm_stages_reach_the_cuda_boundary(vlm, megatron_lm_trees, stage, spec):
    """scripts/megatron_lm_vlm_story.py's exact argv (the paper's shapes), with the local and the TE
    spec."""
    report = vlm[f"story_{stage}_{spec}"]
    _assert_reached_boundary(report, megatron_lm_trees["tag"])
    args = report["args"]
    expected = ["dpsl"] if stage == "vlm_dpsl" else ["aux_loss"]
    assert args["moe_router_load_balancing_type"] in (expected, expected[0])
    assert args["num_experts"] == 4 and args["train_iters"] == 12


# ----------------------------------------------------------------------------- the build (one gloo
# rank)


@pytest.fixture(scope="module")
def build(vlm):
    report = vlm["vlm_build"]
    assert "error" not in report, report.get("error")
    return report


def test_stock_model_provider_crashes_on_the_moe_spec(build):
    """The upstream bug the launcher's provider exists for (both tags)."""
    assert build["stock"] == "AttributeError: 'MoESubmodules' object has no attribute 'linear_fc1'"


def test_launcher_builds_a_dpsl_moe_llava_with_a_dense_projector(build):
    assert build["lm_routers"] == ["DPSLRouter", "DPSLRouter"]
    assert build["routers"] == build["lm_routers"]  # none in the ViT or the projector
    assert (build["projection"], build["projection_fc1"]) == ("MLP", "ColumnParallelLinear")
    assert (build["vision_moe"], build["projection_moe"]) == (None, None)


def test_launcher_ties_embeddings_and_passes_rope_base_and_factor(build):
    assert build["tied"] and build["output_weight_is_none"]
    # exact: the same RotaryEmbedding arithmetic on the same float32 inputs
    assert build["inv_freq_error"]["flags"] == 0.0
    assert (
        build["inv_freq_error"]["stock"] > 1e-3
    )  # what stock pretrain_vlm builds (θ 10000, factor 8)


def test_vision_model_type_clip_and_freeze_vit(build):
    assert build["vision_hidden"] == 1024  # CLIP ViT-L/14's width; the language model's is 64
    assert (build["vit_layers"], build["lm_layers"]) == (2, 2)
    assert build["vision_frozen"] and not build["lm_frozen"]
    forward = build["forward"]
    assert forward["finite"]
    assert not forward["grads_in_vision_model"] and forward["grads_in_projection"]


def test_freeze_lm_and_freeze_vit_train_the_projector_alone(build):
    """Stage I (projector alignment): upstream's flags through upstream's own model.freeze."""
    assert build["stage_one"]["trainable"] == ["vision_projection"]


def test_projectors_are_dense_of_the_chosen_kind(build):
    """Without --vision-model-type: the dense MLP stock builds for the same LM without experts (the
    LM's SwiGLU and FFN; its ViT the LM's width). With --vision-model-type clip: LLaVA-1.5's GELU
    projector, FFN = the LM's hidden size (64), biases, on a 1024-wide CLIP ViT."""
    stock = build["stage_one"]["projection"]
    assert (stock["fc1"], stock["gated_linear_unit"], stock["vision_hidden"]) == (
        "ColumnParallelLinear",
        True,
        64,
    )
    assert stock["ffn_hidden_size"] == stock["language_ffn_hidden_size"]
    clip = build["projection_shape"]
    assert (clip["ffn_hidden_size"], clip["gated_linear_unit"], clip["bias"]) == (64, False, True)
    assert clip["vision_hidden"] == 1024


def test_every_router_sees_the_modality_of_each_position(build):
    """pretrain_vlm's mock rows are ``<image>`` + text: the image's ``img_seq_len`` rows come first.
    With --moe-dpsl-vision-group 1 they are group 1 and the text rows group 0 (a reference from the
    data's layout, not from the hook's arithmetic)."""
    forward = build["forward"]
    assert all(t[0] == -200 and -200 not in t[1:] for t in forward["tokens"])
    img, text = build["img_seq_len"], len(forward["tokens"][0]) - 1
    assert img == 16  # (32 / 8)^2 patches, class token dropped
    expected = [[1] * img + [0] * text for _ in forward["tokens"]]
    assert forward["router_groups"] == [expected] * len(build["lm_routers"])


def test_launcher_model_round_trips_through_torch_dist(build):
    """--ckpt-format torch_dist, which stock pretrain_vlm refuses: every tensor back bit for bit."""
    td = build["torch_dist"]
    assert (td["missing"], td["unexpected"]) == ([], [])
    assert (
        td["tensors"] > 40 and td["max_abs_diff"] == 0.0
    )  # exact: saved and loaded, no arithmetic


def test_gpt_launcher_refuses_modality_priors(vlm, megatron_lm_trees):
    """Modality priors without a vision encoder, at the flag level: pretrain_gpt has no images."""
    report = vlm["launcher_modality"]
    if megatron_lm_trees["tag"] == "core_v0.16.1":
        # core_v0.16.1's pretrain parses the flags itself: dpsl_gpt_builder refuses when it builds
        # the model (require_token_groups, test_vlm_args), after the boundary
        assert report["ended"] == "boundary", _explain(report)
    else:
        assert _exit_message(report).startswith(
            "--moe-dpsl-token-groups modality: pretrain_gpt has no vision encoder"
        )
