"""Child interpreter: run a Megatron-LM entry point's real call chain on CPU up to the first
CUDA-only call.

    python tests/support/megatron_lm_chain.py CASES.json        # prints one JSON line: {case name:
    report}

``CASES.json``: ``{"tree": DIR, "patched": bool, "cases": [{"name", "entry", "argv", "env"}],
"builds": [{"name", "argv"}]}``, one Megatron-LM tree per child (its modules are imported once, ~10
s). ``entry``: ``launcher`` (``megatron_dpsl.megatron_lm.
pretrain_gpt.main()``, with ``MEGATRON_LM_PATH`` = the tree) or ``megatron_lm`` (the tree's own
``pretrain_gpt.py`` run as ``__main__``). The chain runs exactly as on a GPU
(``maybe_wrap_for_inprocess_restart`` -> ``pretrain`` -> ``ft_integration.setup`` ->
``initialize_megatron`` -> ``parse_args``/``validate_args`` -> ``set_global_variables`` -> ...) with
only these leaves replaced, each because it is CUDA-only:

- ``torch.cuda.is_available`` answers True: ``initialize_megatron`` asserts "Megatron requires
  CUDA." before it parses anything (only that assert reads it before the boundary).
- ``torch.distributed.init_process_group`` is the boundary: the first call that needs a GPU (the
  NCCL process group of ``_initialize_distributed``). It records its arguments and stops the chain.
- Python 3.11 only: ``typing.override`` (see ``megatron_lm_tree.use_tree``).
- A tree from the committed snapshot (CI) has no ``megatron/core``: the installed megatron-core
  wheel's is used (``megatron_lm_tree``'s docstring; each report's ``megatron_core`` says which).

Each case reports how it ended (``boundary``: reached the NCCL call; ``exit``: SystemExit, with the
captured stderr; ``error``: another exception), the Megatron-LM functions it passed through, how
many times the command line was parsed, and the parsed arguments that matter here. Between cases
Megatron's own ``unset_global_variables`` / ``destroy_rerun_state_machine`` reset its globals, and
Megatron-LM's own ``add_megatron_arguments`` is put back (the launcher wraps it).

``builds`` then check the pieces on one gloo rank (``megatron_cpu`` shims): Megatron-LM's own
``parse_args`` with and without ``add_dpsl_args``, its ``core_transformer_config_from_args``, the
launcher's config, and the routers of the GPT model the launcher's builder (core_v0.16.1:
``dpsl_gpt_builder``; core_v0.19.0: ``GPTModelBuilder`` on ``dpsl_gpt_config``) and, on a patched
tree, Megatron-LM's own builder make.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import sys
import tempfile
import traceback
from pathlib import Path

from support.megatron_lm_tree import use_tree

# Functions whose passage the tests check, by name; recorded when defined under the tree.
WATCHED = {
    "maybe_wrap_for_inprocess_restart",
    "parse_args",
    "parse_and_validate_args",
    "setup",
    "pretrain",
    "initialize_megatron",
    "validate_args",
    "set_global_variables",
    "_build_tokenizer",
    "setup_logging",
    "initialize_rerun_state_machine",
    "_initialize_distributed",
    "gpt_config_from_args",
    "pretrain_cfg_container_from_args",
    "core_transformer_config_from_args",
    "add_megatron_arguments",
}
ARG_FIELDS = (
    "moe_layer_freq",
    "moe_router_load_balancing_type",
    "moe_aux_loss_coeff",
    "moe_dpsl_coeff",
    "moe_dpsl_alpha",
    "moe_dpsl_group_alphas",
    "moe_dpsl_alpha_base",
    "moe_dpsl_alpha_shift",
    "moe_dpsl_num_groups",
    "moe_dpsl_gather",
    "moe_dpsl_log_interval",
    "num_experts",
    "load",
    "save",
    "train_iters",
    "mock_data",
    "tokenizer_type",
    "padded_vocab_size",
    "data_path",
    "distributed_backend",
    "bf16",
    "position_embedding_type",
)


class CudaBoundary(Exception):
    """Raised by the replaced ``init_process_group``: the chain reached the first CUDA-only call."""


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def run_case(tree: str, case: dict, stock_add_megatron_arguments) -> dict:
    import torch
    import torch.distributed

    seen: list[str] = []
    boundary: dict = {}
    # the tree's files, and megatron.core's where it comes from the installed wheel (a snapshot
    # tree)
    prefixes = tuple(dict.fromkeys(os.path.abspath(d) + os.sep for d in (tree, _core_dir())))

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_name in WATCHED and code.co_filename.startswith(prefixes):
            seen.append(f"{Path(code.co_filename).stem}.{code.co_name}")

    def init_process_group(*args, **kwargs):
        boundary.update(
            {k: _jsonable(v) for k, v in kwargs.items() if k in ("backend", "world_size", "rank")}
        )
        raise CudaBoundary("torch.distributed.init_process_group")

    report = {"ended": None}
    stderr = tempfile.TemporaryFile(
        "w+"
    )  # a real file: Megatron-LM calls faulthandler.enable() on import
    old = (
        torch.cuda.is_available,
        torch.distributed.init_process_group,
        sys.argv,
        dict(os.environ),
    )
    torch.cuda.is_available = lambda: (
        True
    )  # replaced leaf: Megatron's "Megatron requires CUDA." assert
    torch.distributed.init_process_group = init_process_group  # replaced leaf: the boundary (NCCL)
    os.environ.update(case.get("env", {}))
    try:
        with contextlib.redirect_stderr(stderr):
            sys.setprofile(profile)
            try:
                script = case.get("script", "pretrain_gpt")
                if case["entry"] == "launcher":
                    os.environ["MEGATRON_LM_PATH"] = tree
                    sys.argv = [f"{script}.py", *case["argv"]]
                    importlib.import_module(f"megatron_dpsl.megatron_lm.{script}").main()
                else:
                    sys.argv = [os.path.join(tree, f"{script}.py"), *case["argv"]]
                    runpy.run_path(sys.argv[0], run_name="__main__")
                report["ended"] = "returned"
            finally:
                sys.setprofile(None)
    except CudaBoundary:
        report["ended"] = "boundary"
        report["boundary"] = boundary
    except SystemExit as e:
        report["ended"] = "exit"
        report["exit_code"] = _jsonable(e.code)
    except Exception as e:  # noqa: BLE001 - reported to the test, which names it
        report["ended"] = "error"
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()[-3000:]
    finally:
        torch.cuda.is_available, torch.distributed.init_process_group, sys.argv = old[:3]
        os.environ.clear()
        os.environ.update(old[3])
        arguments = sys.modules["megatron.training.arguments"]
        arguments.add_megatron_arguments = (
            stock_add_megatron_arguments  # undo the launcher's parser hook
        )
    stderr.seek(0)
    report["stderr"] = stderr.read()[-3000:]
    report["calls"] = list(dict.fromkeys(seen))  # first passage of each, in order
    report["megatron_core"] = (
        "tree" if _core_dir().startswith(os.path.abspath(tree) + os.sep) else _core_dir()
    )
    report["parses"] = sum(1 for s in seen if s.endswith((".parse_args",)))
    report.update(_megatron_state())
    return report


def _core_dir() -> str:
    import megatron.core

    return os.path.dirname(megatron.core.__file__)


def _megatron_state() -> dict:
    """The parsed arguments and the model config the launcher built (if it got that far), then a
    reset."""
    state = {}
    try:
        from megatron.training import global_vars
    except ImportError:
        return state
    args = global_vars._GLOBAL_ARGS
    if args is not None:
        state["args"] = {k: _jsonable(getattr(args, k)) for k in ARG_FIELDS if hasattr(args, k)}
        global_vars.unset_global_variables()
    from megatron.core import rerun_state_machine

    rerun_state_machine.destroy_rerun_state_machine()
    return state


# --------------------------------------------------------------------------- builds


CONFIG_FIELDS = (
    "moe_dpsl_alpha",
    "moe_dpsl_coeff",
    "moe_dpsl_gather",
    "moe_dpsl_log_interval",
    "moe_router_load_balancing_type",
    "moe_aux_loss_coeff",
    "num_moe_experts",
)


def _parse(argv, provider):
    """Megatron-LM's own parse_args + validate_args (None when argparse exits)."""
    from megatron.training import arguments

    sys.argv = ["pretrain_gpt.py", *argv]
    with (
        tempfile.TemporaryFile("w+") as sink,
        contextlib.redirect_stderr(sink),
        contextlib.redirect_stdout(sink),
    ):
        try:
            args = arguments.parse_args(extra_args_provider=provider)
        except SystemExit:
            return None
        arguments.validate_args(args)
    return args


def _routers(model) -> list[str]:
    return [type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Router")]


def _modules(model) -> dict:
    """The routers and the MoE layer classes of ``model``, in module order."""
    names = [type(m).__name__ for m in model.modules()]
    return {
        "routers": [n for n in names if n.endswith("Router")],
        "moe_layers": [n for n in names if n.endswith("MoELayer")],
    }


def build_report(argv: list, patched: bool) -> dict:
    from megatron.training import arguments, global_vars

    from megatron_dpsl.megatron_lm import pretrain_gpt as launcher
    from megatron_dpsl.megatron_lm.args import add_dpsl_args, megatron_lm_config_from_args

    report: dict = {"arguments_file": arguments.__file__}
    report["parses_dpsl_without_provider"] = _parse(argv, None) is not None
    args = _parse(argv, add_dpsl_args)
    report["core_config"] = type(arguments.core_transformer_config_from_args(args)).__name__
    config = megatron_lm_config_from_args(args)
    report["dpsl_config"] = {
        "class": type(config).__name__,
        **{k: getattr(config, k) for k in CONFIG_FIELDS},
    }
    try:
        arguments.core_transformer_config_from_args(
            _parse([*argv, "--moe-dpsl-alpha", "1", "2", "3"], add_dpsl_args)
        )
        report["bad_alpha_error"] = None
    except ValueError as e:
        report["bad_alpha_error"] = str(e)

    # Build the model the way pretrain() does, on CPU, one gloo rank.
    from support.megatron_cpu import init_single_process

    init_single_process()
    args.padded_vocab_size = 32
    global_vars.set_args(args)  # what set_global_variables does
    try:
        if "extra_args_provider" in _pretrain_parameters():  # core_v0.16.x
            import gpt_builders

            report["launcher"] = _modules(launcher.dpsl_gpt_builder(args, True, True))
            if patched:
                report["megatron_lm"] = _modules(gpt_builders.gpt_builder(args, True, True))
        else:  # core_v0.19: GPTModelBuilder on the model config
            from megatron.core.process_groups_config import ProcessGroupCollection
            from megatron.training.argument_utils import gpt_config_from_args
            from megatron.training.models.gpt import GPTModelBuilder

            pgs = ProcessGroupCollection.use_mpu_process_groups()

            def build(cfg):
                return GPTModelBuilder(cfg).build_model(pgs, pre_process=True, post_process=True)

            report["launcher"] = _modules(build(launcher.dpsl_gpt_config(args)))
            if patched:
                report["megatron_lm"] = _modules(build(gpt_config_from_args(args)))
    finally:
        global_vars.unset_global_variables()
    for who in ("launcher", "megatron_lm"):
        if who in report:
            report[f"{who}_routers"] = report[who]["routers"]
    return report


# --------------------------------------------------------------------------- the upcycle stage,
# rehearsed


def rehearse_upcycle(dense_argv: list, upcycle_argv: list, moe_argv: list, iteration: int) -> dict:
    """The GPU story's dense -> upcycle -> MoE-load path on CPU, with the story's own argv.

    The dense GPTModel of ``dense_argv`` (Megatron-LM's parse, validate and globals; the launcher's
    builder) is saved as Megatron-LM lays a torch_dist step out (``iter_*/``: ``model``, ``args``,
    ``iteration``, ``checkpoint_version``; the tree's own dist_checkpointing, so core_v0.19 keeps
    the common state inside the DCP files), converted by the upcycler CLI with ``upcycle_argv``,
    then checked the way Megatron-LM's ``load_checkpoint`` would for ``moe_argv``: its own
    ``check_checkpoint_args`` on the converted ``args``, and a strict load of the DPSL MoE model's
    sharded state dict. Replaced leaves: ``args.use_cpu_initialization = True`` (the GPU run
    initialises on the device) and, for the MoE model, the allgather token dispatcher (alltoall's
    constructor makes a ``torch.cuda.Stream``; the dispatcher owns no parameters, so the state dict
    is the same).
    """
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
    from megatron.training import checkpointing, global_vars

    from megatron_dpsl.megatron_lm.args import add_dpsl_args
    from megatron_dpsl.upcycle.cli import main as upcycle_main
    from support.megatron_cpu import init_single_process

    init_single_process()

    def model_for(argv):
        args = _parse(argv, add_dpsl_args)
        args.use_cpu_initialization = True
        if getattr(args, "num_experts", None):
            args.moe_token_dispatcher_type = "allgather"  # alltoall creates a torch.cuda.Stream
        global_vars.unset_global_variables()
        with tempfile.TemporaryFile("w+") as sink, contextlib.redirect_stdout(sink):
            global_vars.set_global_variables(
                args, build_tokenizer=True
            )  # padded_vocab_size, as on the GPU
        return args, _launcher_model(args)

    report: dict = {}
    try:
        args, dense = model_for(dense_argv)
        save = Path(args.save)
        step = save / f"iter_{iteration:07d}"
        step.mkdir(parents=True, exist_ok=True)
        state = {
            "model": dense.sharded_state_dict(),
            "args": args,
            "iteration": iteration,
            "checkpoint_version": 3.0,
        }
        dist_checkpointing.save(
            state, str(step), sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1)
        )
        (save / "latest_checkpointed_iteration.txt").write_text(str(iteration))
        report["dense_files"] = sorted(p.name for p in step.iterdir())

        with tempfile.TemporaryFile("w+") as sink, contextlib.redirect_stdout(sink):
            report["upcycle_rc"] = upcycle_main(list(upcycle_argv))

        args, moe = model_for(moe_argv)
        release = Path(args.load) / "release"
        report["tracker"] = (
            (Path(args.load) / "latest_checkpointed_iteration.txt").read_text().strip()
        )
        common = dist_checkpointing.load_common_state_dict(str(release))
        checkpointing.set_checkpoint_version(
            common.get("checkpoint_version", 0)
        )  # as load_checkpoint does
        try:
            checkpointing.check_checkpoint_args(common["args"])
            report["check_checkpoint_args"] = "ok"
        except (
            AssertionError,
            AttributeError,
        ) as e:  # a differing value / an argument the checkpoint lacks
            report["check_checkpoint_args"] = f"{type(e).__name__}: {e}"
        loaded = dist_checkpointing.load({"model": moe.sharded_state_dict()}, str(release))
        missing, unexpected = moe.load_state_dict(loaded["model"], strict=False)
        report["missing"], report["unexpected"] = list(missing), list(unexpected)
        report["routers"] = _routers(moe)
        report["finite"] = all(torch.isfinite(p).all().item() for p in moe.parameters())
    finally:
        global_vars.unset_global_variables()
    for who in ("launcher", "megatron_lm"):
        if who in report:
            report[f"{who}_routers"] = report[who]["routers"]
    return report


def _launcher_model(args):
    """The model the launcher builds for ``args`` (pre and post process, one stage)."""
    from megatron_dpsl.megatron_lm import pretrain_gpt as launcher

    if "extra_args_provider" in _pretrain_parameters():  # core_v0.16.x
        return launcher.dpsl_gpt_builder(args, True, True)
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.models.gpt import GPTModelBuilder

    return GPTModelBuilder(launcher.dpsl_gpt_config(args)).build_model(
        ProcessGroupCollection.use_mpu_process_groups(), pre_process=True, post_process=True
    )


def _pretrain_parameters():
    import inspect

    from megatron.training import pretrain

    return inspect.signature(pretrain).parameters


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    use_tree(spec["tree"])
    from megatron.training import (
        arguments,
    )  # imported here, not under a case's stderr capture (faulthandler)

    stock = arguments.add_megatron_arguments
    reports = {case["name"]: run_case(spec["tree"], case, stock) for case in spec.get("cases", [])}
    if "rehearse_upcycle" in spec:
        try:
            reports["rehearse_upcycle"] = rehearse_upcycle(**spec["rehearse_upcycle"])
        except Exception:  # noqa: BLE001 - the test prints it
            reports["rehearse_upcycle"] = {"error": traceback.format_exc()[-4000:]}
    if "middle_stage" in spec:
        from support.megatron_lm_stage import middle_stage_report

        try:
            reports["middle_stage"] = middle_stage_report(**spec["middle_stage"])
        except Exception:  # noqa: BLE001 - the test prints it
            reports["middle_stage"] = {"error": traceback.format_exc()[-4000:]}
    for build in spec.get("builds", []):
        try:
            if build.get("kind") == "vlm":
                from support.megatron_lm_vlm_build import vlm_build_report

                reports[build["name"]] = vlm_build_report(build["argv"])
                continue
            reports[build["name"]] = build_report(build["argv"], spec.get("patched", False))
        except Exception:  # noqa: BLE001 - the test prints it
            reports[build["name"]] = {"error": traceback.format_exc()[-4000:]}
    print(json.dumps(reports))


if __name__ == "__main__":
    main()
