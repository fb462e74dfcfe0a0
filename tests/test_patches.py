"""patches/ against Megatron-LM core_v0.16.1: hashes, clean application, drift detection, and the patched flow.

Megatron-LM's files are never stored in this repository: the originals come at test time from a
local Megatron-LM git directory (``$MEGATRON_LM_GIT_DIR``, default: the mirror the project's
``fetch`` tool leaves under /work/.mirror) with ``git show <commit>:<path>``; nothing is
downloaded. Without such a directory the tests that need it are skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from megatron_dpsl.megatron_lm import patching
from megatron_dpsl.megatron_lm.patching import Lock, PatchError, apply_patches, export_originals, file_states, sha256_of

REPO = Path(__file__).resolve().parents[1]
LOCK = Lock.load(REPO / "patches")
# Megatron-LM's training package and what it imports from megatron/legacy; needed to import the patched files.
TREES = ("megatron/training", "megatron/legacy")


def _git_dir_or_skip() -> str:
    git_dir = patching.default_git_dir()
    if not Path(git_dir).is_dir():
        pytest.skip(
            f"no Megatron-LM git directory at {git_dir}: set MEGATRON_LM_GIT_DIR to a clone (or mirror) of "
            f"https://github.com/NVIDIA/Megatron-LM holding {LOCK.tag} ({LOCK.commit[:12]})"
        )
    probe = subprocess.run(["git", "--git-dir", git_dir, "cat-file", "-e", f"{LOCK.commit}^{{commit}}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{git_dir} lacks commit {LOCK.commit} ({LOCK.tag}); fetch that tag into it")
    return git_dir


@pytest.fixture(scope="module")
def git_dir() -> str:
    return _git_dir_or_skip()


@pytest.fixture(scope="module")
def workdir():
    # Our own directory, not tmp_path: concurrent pytest sessions of one user prune each other's basetemp.
    with tempfile.TemporaryDirectory(prefix="dpsl-test-patches-") as d:
        yield Path(d)


@pytest.fixture
def originals(git_dir, workdir, request) -> Path:
    return export_originals(git_dir, workdir / request.node.name / "Megatron-LM", LOCK)


@pytest.fixture(scope="module")
def child_reports(git_dir, workdir) -> dict:
    """One interpreter (Megatron's import costs ~8 s) reporting on a patched and an unpatched tree."""
    if importlib.util.find_spec("six") is None:
        pytest.skip("Megatron-LM's megatron/training imports six: pip install -e '.[test]'")
    patched = export_originals(git_dir, workdir / "patched" / "Megatron-LM", LOCK, extra_paths=TREES)
    apply_patches(patched, REPO / "patches")
    unpatched = export_originals(git_dir, workdir / "unpatched" / "Megatron-LM", LOCK, extra_paths=TREES)
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, __file__, str(patched), str(unpatched)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    reports["roots"] = {"patched": str(patched), "unpatched": str(unpatched)}
    return reports


# --------------------------------------------------------------------------- the patch set itself


def test_lock_names_every_patch_and_each_patch_explains_itself():
    patch_files = sorted(p.name for p in (REPO / "patches").glob("*.patch"))
    assert patch_files == sorted(f.patch for f in LOCK.files)
    for f in LOCK.files:
        text = (REPO / "patches" / f.patch).read_text(encoding="utf-8")
        header = text.split("\n--- a/", 1)[0]
        assert "Why:" in header and f.path in header, f.patch
        assert f"--- a/{f.path}\n+++ b/{f.path}\n" in text, f.patch
        changed = [l for l in text.splitlines() if l[:1] in "+-" and not l.startswith(("+++", "---"))]
        assert 0 < len(changed) <= 12, f"{f.patch}: {len(changed)} changed lines; keep patches small"


def test_originals_match_the_lock(git_dir, workdir):
    tag = subprocess.run(["git", "--git-dir", git_dir, "rev-parse", f"{LOCK.tag}^{{commit}}"],
                         capture_output=True, text=True)
    if tag.returncode == 0:  # a mirror without tags still has the commit
        assert tag.stdout.strip() == LOCK.commit
    root = export_originals(git_dir, workdir / "lock-check", LOCK)  # raises PatchError on a hash mismatch
    assert file_states(root, LOCK) == {f.path: "original" for f in LOCK.files}


def test_patches_apply_cleanly_compile_and_are_idempotent(originals):
    assert apply_patches(originals, REPO / "patches", check_only=True) == {f.path: "would apply" for f in LOCK.files}
    assert file_states(originals, LOCK) == {f.path: "original" for f in LOCK.files}  # --check changed nothing
    assert apply_patches(originals, REPO / "patches") == {f.path: "applied" for f in LOCK.files}
    for f in LOCK.files:
        assert sha256_of(originals / f.path) == f.patched_sha256
        py_compile.compile(str(originals / f.path), cfile=str(originals / (f.path + ".pyc")), doraise=True)
    assert apply_patches(originals, REPO / "patches") == {f.path: "already applied" for f in LOCK.files}


def test_drift_fails_naming_the_file_and_touches_nothing(originals):
    drifted = LOCK.files[1].path
    with open(originals / drifted, "a", encoding="utf-8") as fh:
        fh.write("# a local change\n")
    with pytest.raises(PatchError) as info:
        apply_patches(originals, REPO / "patches")
    message = str(info.value)
    assert f"{drifted}: drift" in message and LOCK.tag in message
    assert all(f.path not in message for f in LOCK.files if f.path != drifted)
    # no other file was patched before the failure
    states = file_states(originals, LOCK)
    assert states.pop(drifted) == "drift" and set(states.values()) == {"original"}


def test_missing_file_fails_naming_it(originals):
    (originals / "pretrain_gpt.py").unlink()
    with pytest.raises(PatchError, match="pretrain_gpt.py: missing"):
        apply_patches(originals, REPO / "patches")


def test_apply_script_fails_loudly_on_drift(originals):
    script = REPO / "scripts" / "apply_megatron_patches.sh"
    (originals / "megatron/training/training.py").write_text("drifted\n")
    proc = subprocess.run(["bash", str(script), str(originals)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode != 0
    assert "megatron/training/training.py: drift" in proc.stderr


# --------------------------------------------------------------------------- Megatron-LM's own code, patched


CMDLINE = [
    "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
    "--max-position-embeddings", "8", "--micro-batch-size", "1", "--num-experts", "4",
    "--transformer-impl", "local", "--use-cpu-initialization", "--no-gradient-accumulation-fusion",
    "--no-persist-layer-norm",
    "--moe-router-load-balancing-type", "aux_loss", "dpsl", "--moe-aux-loss-coeff", "0.01", "0",
    "--moe-dpsl-alpha", "0.75", "--moe-dpsl-coeff", "0.02", "--moe-dpsl-gather", "global_batch",
    "--moe-dpsl-log-interval", "5",
]


def _child(root: str, patched: bool) -> dict:
    """Runs in a child interpreter with the Megatron-LM tree ``root`` first on sys.path; returns a report."""
    import contextlib
    import io
    import types

    # A previous tree's Megatron-LM modules (megatron.core, from the wheel, stays).
    for name in [n for n in sys.modules if n.startswith(("megatron.training", "megatron.legacy"))
                 or n in ("gpt_builders", "model_provider", "pretrain_gpt")]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not p.endswith("Megatron-LM")]
    sys.path[:0] = [root, str(REPO), str(REPO / "tests")]
    import megatron  # namespace package: megatron.core from the wheel, megatron/training from ``root``

    # megatron/training/__init__.py imports initialize.py, which needs triton (GPU only). Register the
    # package without running it and bind the few names its submodules import from it.
    pkg = types.ModuleType("megatron.training")
    pkg.__path__ = [os.path.join(root, "megatron", "training")]
    sys.modules["megatron.training"] = megatron.training = pkg
    from megatron.training import global_vars

    for name in ("get_args", "get_timers", "get_adlr_autoresume", "get_tokenizer", "get_tensorboard_writer",
                 "get_wandb_writer", "get_one_logger", "get_signal_handler"):
        setattr(pkg, name, getattr(global_vars, name))
    from megatron.training import utils

    pkg.print_rank_0 = utils.print_rank_0
    from megatron.training import arguments

    from megatron_dpsl.megatron_lm.args import add_dpsl_args, megatron_lm_config_from_args
    from megatron_dpsl.megatron_lm import pretrain_gpt as launcher

    report: dict = {"arguments_file": arguments.__file__}

    def parse(argv, provider):
        sys.argv = ["pretrain_gpt.py", *argv]
        try:
            args = arguments.parse_args(extra_args_provider=provider)
        except SystemExit:
            return None
        with contextlib.redirect_stdout(io.StringIO()):
            arguments.validate_args(args)
        return args

    report["parses_dpsl_without_provider"] = parse(CMDLINE, None) is not None
    args = parse(CMDLINE, add_dpsl_args)
    config = arguments.core_transformer_config_from_args(args)
    report["core_config"] = type(config).__name__
    config = megatron_lm_config_from_args(args)
    report["dpsl_config"] = {
        "class": type(config).__name__,
        **{k: getattr(config, k) for k in ("moe_dpsl_alpha", "moe_dpsl_coeff", "moe_dpsl_gather",
                                           "moe_dpsl_log_interval", "moe_router_load_balancing_type",
                                           "moe_aux_loss_coeff", "num_moe_experts")},
    }
    bad = parse([*CMDLINE, "--moe-dpsl-alpha", "1", "2", "3"], add_dpsl_args)
    try:
        arguments.core_transformer_config_from_args(bad)
        report["bad_alpha_error"] = None
    except ValueError as e:
        report["bad_alpha_error"] = str(e)

    # Build the model the way pretrain() does (model_provider -> builder) on CPU, one gloo rank.
    from megatron_cpu import init_single_process

    init_single_process()
    args.padded_vocab_size = 32
    global_vars._GLOBAL_ARGS = args  # what initialize_megatron's set_global_variables does
    import gpt_builders

    def routers(model):
        return [type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Router")]

    report["launcher_routers"] = routers(launcher.dpsl_gpt_builder(args, True, True))
    if patched:
        report["gpt_builder_routers"] = routers(gpt_builders.gpt_builder(args, True, True))
    return report


EXPECTED_CONFIG = {
    "class": "DPSLTransformerConfig", "moe_dpsl_alpha": 0.75, "moe_dpsl_coeff": 0.02,
    "moe_dpsl_gather": "global_batch", "moe_dpsl_log_interval": 5,
    "moe_router_load_balancing_type": ["aux_loss", "dpsl"], "moe_aux_loss_coeff": [0.01, 0.0], "num_moe_experts": 4,
}


def test_patched_megatron_lm_parses_dpsl_and_builds_dpsl_routers(child_reports):
    report = child_reports["patched"]
    assert report["arguments_file"].startswith(child_reports["roots"]["patched"])
    # patch 1: Megatron-LM's own parser has the flags, and its config function builds the DPSL config
    assert report["parses_dpsl_without_provider"]
    assert report["core_config"] == "DPSLTransformerConfig"
    assert report["dpsl_config"] == EXPECTED_CONFIG
    assert report["bad_alpha_error"].startswith("--moe-dpsl-alpha: expected 1 or 4 values (num experts), got 3")
    # patch 2: gpt_builder picks the DPSL spec; the launcher defers to it
    assert report["gpt_builder_routers"] == ["DPSLRouter", "DPSLRouter"]
    assert report["launcher_routers"] == ["DPSLRouter", "DPSLRouter"]


def test_unpatched_megatron_lm_with_the_launcher(child_reports):
    report = child_reports["unpatched"]
    assert report["arguments_file"].startswith(child_reports["roots"]["unpatched"])
    # stock Megatron-LM rejects 'dpsl'; add_dpsl_args (the launcher's provider) widens the choices
    assert not report["parses_dpsl_without_provider"]
    assert report["core_config"] == "TransformerConfig"
    assert report["dpsl_config"] == EXPECTED_CONFIG
    assert report["bad_alpha_error"] is None  # stock config ignores DPSL fields; the launcher's path checks them
    assert report["launcher_routers"] == ["DPSLRouter", "DPSLRouter"]


def test_launcher_names_the_env_var_when_megatron_lm_is_missing(tmp_path, monkeypatch):
    from megatron_dpsl.megatron_lm import pretrain_gpt as launcher

    monkeypatch.setenv(launcher.PATH_ENV, str(tmp_path))
    with pytest.raises(SystemExit, match=f"{launcher.PATH_ENV}={tmp_path}: no pretrain_gpt.py there"):
        launcher.import_pretrain_gpt()
    monkeypatch.delenv(launcher.PATH_ENV)
    if "megatron.training" in sys.modules or Path("pretrain_gpt.py").exists():
        pytest.skip("Megatron-LM's training package is importable in this interpreter")
    with pytest.raises(SystemExit, match=f"Set {launcher.PATH_ENV}=/path/to/Megatron-LM"):
        launcher.import_pretrain_gpt()


# --------------------------------------------------------------------------- hooks the patches call


def test_dataset_token_groups_follow_the_blend_index():
    import torch
    from megatron_cpu import init_single_process

    from megatron_dpsl.megatron_lm.hooks import DatasetTokenGroups
    from megatron_dpsl.token_groups import get_dpsl_token_groups

    init_single_process()
    args = type("Args", (), dict(moe_router_load_balancing_type="dpsl", moe_dpsl_group_alphas=None,
                                 moe_dpsl_num_groups=2, overlap_moe_expert_parallel_comm=False))()
    batches = iter([{"dataset_id": torch.tensor([1, 0, 1]), "tokens": torch.zeros(3, 5)}])
    groups = DatasetTokenGroups(args, batches)
    batch = next(groups.data_iterator)  # what get_batch_on_this_tp_rank does on TP rank 0
    tokens = batch["tokens"][:, :4]  # this CP rank's slice
    assert get_dpsl_token_groups() is None
    with groups.context(tokens):
        seen = get_dpsl_token_groups()
        assert seen.cp_sliced
        assert seen.group_ids.tolist() == [[1] * 4, [0] * 4, [1] * 4]
    assert get_dpsl_token_groups() is None

    # no dataset_id (a single dataset instead of a blend) -> the error says how to give groups
    groups = DatasetTokenGroups(args, iter([{"tokens": torch.zeros(2, 4)}]))
    next(groups.data_iterator)
    with pytest.raises(ValueError, match="--data-path as a blend"):
        groups.context(torch.zeros(2, 4)).__enter__()
    # more datasets than groups
    groups = DatasetTokenGroups(args, iter([{"dataset_id": torch.tensor([2, 0])}]))
    next(groups.data_iterator)
    with pytest.raises(ValueError, match="index 2"):
        groups.context(torch.zeros(2, 4)).__enter__()
    # middle pipeline stage: no tokens; any pipeline parallelism: refused up front
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size 1"):
        DatasetTokenGroups(args, None).context(None)
    args.pipeline_model_parallel_size = 2
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size 1"):
        DatasetTokenGroups(args, None).context(torch.zeros(2, 4))


def test_dataset_token_groups_are_a_no_op_without_group_priors():
    args = type("Args", (), dict(moe_router_load_balancing_type=["aux_loss", "dpsl"], moe_dpsl_group_alphas=None,
                                 moe_dpsl_num_groups=None))()
    from megatron_dpsl.megatron_lm.hooks import DatasetTokenGroups

    data = iter([{"tokens": 0}])
    groups = DatasetTokenGroups(args, data)
    assert groups.data_iterator is data  # the iterator is not even wrapped
    with groups.context(None):
        pass


if __name__ == "__main__":
    patched_root, unpatched_root = sys.argv[1:3]  # _child rewrites sys.argv for Megatron-LM's parser
    print(json.dumps({"patched": _child(patched_root, patched=True), "unpatched": _child(unpatched_root, patched=False)}))
