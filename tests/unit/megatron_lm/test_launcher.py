"""The launcher through Megatron-LM's real call chain on CPU, up to the first CUDA-only call.

For the Megatron-LM tag of the installed megatron-core (core_v0.16.1 with 0.16.1, core_v0.19.0 with
0.19.2: the second CI leg), an exported tree runs in a child interpreter
    (tests/support/megatron_lm_chain.py,
which names the replaced CUDA-only leaves): ``main()`` -> ``maybe_wrap_for_inprocess_restart``
(parse without our provider) -> [0.19: ``parse_and_validate_args``, ``gpt_config_from_args``, the
config container] -> ``pretrain`` -> ``ft_integration.setup`` (parse without our provider) ->
``initialize_megatron`` (parse, ``validate_args``, ``set_global_variables``: tokenizer, TensorBoard)
-> ``_initialize_distributed`` -> ``init_process_group`` (NCCL: the boundary).

Before the parser hook (``registration.py``) the launcher died in the first parse with
"invalid choice: 'dpsl'" on an unpatched tree; these tests fail that way on that code.
Also here: every Megatron-LM stage of the GPU story (scripts/megatron_lm_story.py) with its exact
argv, on the tree that stage uses.
"""

from __future__ import annotations

from pathlib import Path

import megatron_lm_story as story
import pytest

# Megatron-LM functions every run passes through before the boundary, in this order (both tags) ...
CHAIN = [
    "inprocess_restart.maybe_wrap_for_inprocess_restart",
    "training.pretrain",
    "ft_integration.setup",
    "initialize.initialize_megatron",
    "initialize._initialize_distributed",
]
# ... and these somewhere on the way (core_v0.19.0 validates before pretrain, core_v0.16.1 inside
# it)
ALSO = [
    "arguments.validate_args",
    "global_vars.set_global_variables",
    "global_vars._build_tokenizer",
]


def _explain(report: dict) -> str:
    return (
        f"ended: {report.get('ended')} "
        f"{report.get('error') or ''}\n{report.get('traceback') or ''}\n"
        f"stderr: {report.get('stderr', '')[-1500:]}"
    )


def _assert_reached_boundary(report: dict) -> None:
    assert report["ended"] == "boundary", _explain(report)
    assert report["boundary"] == {"backend": "nccl", "rank": 0, "world_size": 1}
    calls = report["calls"]
    assert [c for c in calls if c in CHAIN] == CHAIN, calls
    assert set(ALSO) <= set(calls), calls
    # maybe_wrap_for_inprocess_restart, ft_integration.setup and the provider's parse
    assert report["parses"] == 3, calls


def test_unpatched_launcher_runs_the_readme_command_to_the_cuda_boundary(
    megatron_lm_reports, megatron_lm_trees
):
    report = megatron_lm_reports["unpatched"]["launcher_readme"]
    _assert_reached_boundary(report)
    args = report["args"]
    work = Path(megatron_lm_trees["work"]) / "unpatched"
    assert args["moe_router_load_balancing_type"] == ["aux_loss", "dpsl"]
    assert args["moe_aux_loss_coeff"] == [0.001, 0.01]
    assert args["moe_dpsl_alpha"] == [0.75]
    assert (args["load"], args["save"]) == (str(work / "ckpt"), str(work / "ckpt"))
    assert (args["tokenizer_type"], args["mock_data"], args["bf16"]) == (
        "NullTokenizer",
        True,
        True,
    )
    if megatron_lm_trees["tag"] == "core_v0.19.0":
        # the launcher builds the model config itself, before pretrain
        assert "argument_utils.gpt_config_from_args" in report["calls"]


def test_megatron_core_is_the_trees_or_the_installed_wheels(megatron_lm_reports, megatron_lm_trees):
    """A git-dir tree runs its own megatron/core; a snapshot tree (CI) the installed wheel's, the
    replaced
    leaf megatron_lm_tree.py names."""
    import importlib.util
    import os

    wheel_core = os.path.dirname(importlib.util.find_spec("megatron.core").origin)
    expected = "tree" if megatron_lm_trees["git_dir"] else wheel_core
    for flavor in ("unpatched", "patched"):
        assert megatron_lm_reports[flavor]["launcher_readme"]["megatron_core"] == expected


def test_stock_megatron_lm_script_still_rejects_dpsl(megatron_lm_reports):
    """What the launcher exists for: the unpatched tree's own pretrain_gpt.py refuses the same
    command."""
    report = megatron_lm_reports["unpatched"]["megatron_lm_readme"]
    assert (report["ended"], report["exit_code"]) == ("exit", 2), _explain(report)
    assert "argument --moe-router-load-balancing-type: invalid choice: 'dpsl'" in report["stderr"]


def test_launcher_registration_is_undone_between_runs(megatron_lm_reports):
    # the build ran after the launcher cases in the same interpreter: Megatron-LM's parser is stock
    # again
    assert megatron_lm_reports["unpatched"]["build"]["parses_dpsl_without_provider"] is False


def test_unpatched_launcher_refuses_group_priors(megatron_lm_reports, megatron_lm_trees):
    report = megatron_lm_reports["unpatched"]["launcher_groups"]
    if megatron_lm_trees["tag"] == "core_v0.16.1":
        # core_v0.16.1's pretrain parses the arguments itself: the refusal comes at model build
        # (dpsl_gpt_builder, tested in test_patches), after the boundary
        _assert_reached_boundary(report)
    else:
        assert report["ended"] == "exit", _explain(report)
        assert str(report["exit_code"]).startswith(
            "--moe-dpsl-group-alphas/--moe-dpsl-num-groups: not supported "
            "on an unpatched Megatron-LM"
        )


@pytest.mark.parametrize("entry", ["megatron_lm", "launcher"])
def test_patched_tree_runs_group_priors_to_the_cuda_boundary(megatron_lm_reports, entry):
    report = megatron_lm_reports["patched"][f"{entry}_groups"]
    _assert_reached_boundary(report)
    args = report["args"]
    assert (
        args["moe_dpsl_alpha_base"],
        args["moe_dpsl_alpha_shift"],
        args["moe_dpsl_num_groups"],
    ) == (0.75, 0.5, 2)
    assert args["data_path"][0::2] == ["1", "1"] and args["data_path"][1].endswith(
        "code_text_document"
    )


def test_patched_megatron_lm_script_runs_the_readme_command(megatron_lm_reports):
    _assert_reached_boundary(megatron_lm_reports["patched"]["megatron_lm_readme"])
    _assert_reached_boundary(megatron_lm_reports["patched"]["launcher_readme"])


@pytest.mark.parametrize("stage", [s.name for s in story.megatron_lm_stages(Path("/"))])
def test_every_gpu_story_stage_reaches_the_cuda_boundary(
    megatron_lm_reports, megatron_lm_trees, stage
):
    """The GPU script's exact argv (scripts/megatron_lm_story.py), on the tree and entry that stage
    uses."""
    work = Path(megatron_lm_trees["work"]) / "story"
    spec = next(s for s in story.megatron_lm_stages(work) if s.name == stage)
    report = megatron_lm_reports[spec.tree][f"story_{stage}"]
    _assert_reached_boundary(report)
    argv = list(spec.argv)
    args = report["args"]
    assert args["train_iters"] == int(argv[argv.index("--train-iters") + 1])
    assert args["save"] == spec.save
    if "--load" in argv:
        assert args["load"] == argv[argv.index("--load") + 1]
    if "--num-experts" in argv:
        assert args["moe_router_load_balancing_type"] == ["aux_loss", "dpsl"]
        assert args["moe_aux_loss_coeff"] == [0.001, 0.01]


def test_story_upcycle_stage_rehearsed_loads_into_the_dpsl_moe_model(megatron_lm_reports):
    """The story's dense -> upcycle -> moe_dpsl checkpoint path with its own argv
    (megatron_lm_chain.
    rehearse_upcycle): the dense checkpoint as the tag's Megatron-Core writes it, the upcycler CLI,
    then Megatron-LM's check_checkpoint_args and a strict load of the DPSL MoE model."""
    report = megatron_lm_reports["unpatched"]["rehearse_upcycle"]
    assert "error" not in report, report.get("error")
    assert report["upcycle_rc"] == 0 and report["tracker"] == "release"
    assert report["check_checkpoint_args"] == "ok"
    assert (report["missing"], report["unexpected"]) == ([], [])
    assert report["routers"] == ["DPSLRouter", "DPSLRouter"] and report["finite"]
