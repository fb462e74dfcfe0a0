"""patches/<tag>/ against Megatron-LM core_v0.16.1 and core_v0.19.0: hashes, clean application, set
selection, drift detection, and the patched flow.

The originals come at test time from a local Megatron-LM git directory, ``$MEGATRON_LM_GIT_DIR``
(``git show <commit>:<path>``), else from the committed snapshot of the tag's training code
(tests/fixtures/megatron_lm, pinned to the lock's commit; ``megatron_lm_tree.py``); nothing is
downloaded. The tests that need git itself (the tag resolves to the lock's commit, the lock is
re-derived from git) skip without the git dir, saying so. The patch sets of both tags are checked
in every CI leg (``patch`` only); the patched flow (Megatron-LM's own parser, config and builder,
tests/support/megatron_lm_chain.py) runs for the tag of the installed megatron-core.
"""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from megatron_dpsl.megatron_lm import patching
from megatron_dpsl.megatron_lm.patching import (
    Lock,
    PatchError,
    apply_patches,
    export_originals,
    file_states,
    patch_sets,
    sha256_of,
)

REPO = Path(__file__).resolve().parents[3]
PATCHES = REPO / "patches"
SETS = {d.name: d for d in patch_sets(PATCHES)}


def _git_dir_or_skip(lock: Lock) -> str:
    from support.megatron_lm_tree import git_dir_or_skip

    git_dir = git_dir_or_skip()
    probe = subprocess.run(
        ["git", "--git-dir", git_dir, "cat-file", "-e", f"{lock.commit}^{{commit}}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"{git_dir} lacks commit {lock.commit} ({lock.tag}); fetch that tag into it")
    return git_dir


@pytest.fixture(params=sorted(SETS))
def patch_set(request) -> tuple[Path, Lock]:
    return SETS[request.param], Lock.load(SETS[request.param])


@pytest.fixture(scope="module")
def workdir():
    # Our own directory, not tmp_path: concurrent pytest sessions of one user prune each other's
    # basetemp.
    with tempfile.TemporaryDirectory(prefix="dpsl-test-patches-") as d:
        yield Path(d)


def _snapshot_originals(lock: Lock, out: Path) -> Path:
    """The lock's original files under ``out`` from the committed snapshot, checked against the
    lock."""
    from support.megatron_lm_tree import export_tree, snapshots

    entry = snapshots().get(lock.tag)
    if entry is None or entry["commit"] != lock.commit:
        pytest.skip(
            f"no snapshot of {lock.tag} at {lock.commit[:12]} and $MEGATRON_LM_GIT_DIR is unset"
        )
    export_tree(lock.tag, out, paths=tuple(f.path for f in lock.files), snapshot=True)
    for f in lock.files:  # as export_originals checks the git blobs
        if sha256_of(out / f.path) != f.sha256:
            raise PatchError(f"{f.path}: the {lock.tag} snapshot's sha256 differs from the lock's")
    return out


def _export_originals(lock: Lock, out: Path) -> Path:
    """The lock's original files under ``out``: from the git dir, else from the committed
    snapshot."""
    from support.megatron_lm_tree import git_dir

    if git_dir() is not None:
        return export_originals(_git_dir_or_skip(lock), out, lock)
    return _snapshot_originals(lock, out)


@pytest.fixture
def originals(patch_set, workdir, request) -> Path:
    _, lock = patch_set
    return _export_originals(lock, workdir / request.node.name / "Megatron-LM")


def test_snapshots_hold_the_locked_originals(patch_set, workdir):
    """The committed snapshot (what CI uses) is the lock's commit, and its files are the lock's
    originals."""
    from support.megatron_lm_tree import snapshots

    _, lock = patch_set
    entry = snapshots()[lock.tag]
    assert entry["commit"] == lock.commit
    root = _snapshot_originals(lock, workdir / f"snapshot-check-{lock.tag}")
    assert file_states(root, lock) == {f.path: "original" for f in lock.files}


# --------------------------------------------------------------------------- the patch sets
# themselves


def test_one_patch_set_per_supported_tag():
    assert sorted(SETS) == ["core_v0.16.1", "core_v0.19.0"]
    for name, set_dir in SETS.items():
        assert Lock.load(set_dir).tag == name


def test_lock_names_every_patch_and_each_patch_explains_itself(patch_set):
    set_dir, lock = patch_set
    patch_files = sorted(p.name for p in set_dir.glob("*.patch"))
    assert patch_files == sorted(f.patch for f in lock.files)
    for f in lock.files:
        text = (set_dir / f.patch).read_text(encoding="utf-8")
        header = text.split("\n--- a/", 1)[0]
        assert "Why:" in header and f.path in header and lock.tag in header, f.patch
        assert f"--- a/{f.path}\n+++ b/{f.path}\n" in text, f.patch
        assert patching.patched_path(set_dir / f.patch) == f.path
        changed = [
            line
            for line in text.splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))
        ]
        assert 0 < len(changed) <= 12, (
            f"{f.patch}: {len(changed)} changed lines; keep patches small"
        )


def test_originals_match_the_lock(patch_set, workdir):
    _, lock = patch_set
    git_dir = _git_dir_or_skip(lock)
    tag = subprocess.run(
        ["git", "--git-dir", git_dir, "rev-parse", f"{lock.tag}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if tag.returncode == 0:  # a mirror without tags still has the commit
        assert tag.stdout.strip() == lock.commit
    root = export_originals(
        git_dir, workdir / f"lock-check-{lock.tag}", lock
    )  # raises PatchError on a mismatch
    assert file_states(root, lock) == {f.path: "original" for f in lock.files}


def test_lock_is_reproducible_from_git(patch_set, workdir):
    set_dir, lock = patch_set
    git_dir = _git_dir_or_skip(lock)
    copy = workdir / f"relock-{lock.tag}"
    copy.mkdir()
    for f in set_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert patching.write_lock(git_dir, copy) == lock


def test_patches_apply_cleanly_compile_and_are_idempotent(patch_set, originals):
    _, lock = patch_set
    # patches/ as a whole: the set is picked by the tree's hashes
    assert apply_patches(originals, PATCHES, check_only=True) == {
        f.path: "would apply" for f in lock.files
    }
    assert file_states(originals, lock) == {
        f.path: "original" for f in lock.files
    }  # --check changed nothing
    assert apply_patches(originals, PATCHES) == {f.path: "applied" for f in lock.files}
    for f in lock.files:
        assert sha256_of(originals / f.path) == f.patched_sha256
        py_compile.compile(
            str(originals / f.path), cfile=str(originals / (f.path + ".pyc")), doraise=True
        )
    assert apply_patches(originals, PATCHES) == {f.path: "already applied" for f in lock.files}


def test_drift_fails_naming_the_file_and_touches_nothing(patch_set, originals):
    _, lock = patch_set
    drifted = lock.files[1].path
    with open(originals / drifted, "a", encoding="utf-8") as fh:
        fh.write("# a local change\n")
    with pytest.raises(PatchError) as info:
        apply_patches(originals, PATCHES)
    message = str(info.value)
    closest = message.split("\n  core_v")[1]  # the closest release comes first: this tree's
    assert closest.startswith(lock.tag[len("core_v") :]) and f"{drifted}: drift" in closest
    assert all(f.path not in closest for f in lock.files if f.path != drifted)
    # no other file was patched before the failure
    states = file_states(originals, lock)
    assert states.pop(drifted) == "drift" and set(states.values()) == {"original"}


def test_missing_file_fails_naming_it(patch_set, originals):
    (originals / "pretrain_gpt.py").unlink()
    with pytest.raises(PatchError, match="pretrain_gpt.py: missing"):
        apply_patches(originals, PATCHES)


def test_apply_script_fails_loudly_on_drift(patch_set, originals):
    script = REPO / "scripts" / "apply_megatron_patches.sh"
    (originals / "megatron/training/training.py").write_text("drifted\n")
    proc = subprocess.run(
        ["bash", str(script), str(originals)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode != 0
    assert "megatron/training/training.py: drift" in proc.stderr


def test_git_dir_comes_from_the_environment_only(monkeypatch, capsys):
    monkeypatch.delenv(patching.GIT_DIR_ENV, raising=False)
    assert patching.default_git_dir() is None
    with pytest.raises(SystemExit):
        patching.main(["lock", "--tag", "core_v0.19.0"])
    assert (
        "--git-dir: give a local Megatron-LM git directory (or set $MEGATRON_LM_GIT_DIR)"
        in capsys.readouterr().err
    )
    monkeypatch.setenv(patching.GIT_DIR_ENV, "/some/clone")
    assert patching.default_git_dir() == "/some/clone"


def test_package_code_names_no_machine_path():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "megatron_dpsl").rglob("*.py")
        if "/work/" in p.read_text(encoding="utf-8") or ".mirror" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []


# --------------------------------------------------------------------------- Megatron-LM's own
# code, patched (tests/support/megatron_lm_chain.py builds: Megatron-LM's parse_args +
# validate_args, its config function, and the routers of the GPT model built by its builder and by
# the launcher's, on one gloo rank)


EXPECTED_CONFIG = {
    "class": "DPSLTransformerConfig",
    "moe_dpsl_alpha": 0.75,
    "moe_dpsl_coeff": 0.02,
    "moe_dpsl_gather": "global_batch",
    "moe_dpsl_log_interval": 5,
    "moe_router_load_balancing_type": ["aux_loss", "dpsl"],
    "moe_aux_loss_coeff": [0.01, 0.0],
    "num_moe_experts": 4,
}


def _build(reports, flavor) -> dict:
    report = reports[flavor]["build"]
    assert "error" not in report, report.get("error")
    return report


def test_patched_megatron_lm_parses_dpsl_and_builds_dpsl_routers(
    megatron_lm_reports, megatron_lm_trees
):
    report = _build(megatron_lm_reports, "patched")
    assert report["arguments_file"].startswith(megatron_lm_trees["patched"])
    # patch 1: Megatron-LM's own parser has the flags, and its config function builds the DPSL
    # config
    assert report["parses_dpsl_without_provider"]
    assert report["core_config"] == "DPSLTransformerConfig"
    assert report["dpsl_config"] == EXPECTED_CONFIG
    assert report["bad_alpha_error"].startswith(
        "--moe-dpsl-alpha: expected 1 or 4 values (num experts), got 3"
    )
    # the spec patch: Megatron-LM's builder picks the DPSL spec; the launcher's agrees
    assert report["megatron_lm_routers"] == ["DPSLRouter", "DPSLRouter"]
    assert report["launcher_routers"] == ["DPSLRouter", "DPSLRouter"]


def test_unpatched_megatron_lm_with_the_launcher(megatron_lm_reports, megatron_lm_trees):
    report = _build(megatron_lm_reports, "unpatched")
    assert report["arguments_file"].startswith(megatron_lm_trees["unpatched"])
    # stock Megatron-LM rejects 'dpsl'; add_dpsl_args (the launcher's provider) widens the choices
    assert not report["parses_dpsl_without_provider"]
    assert report["core_config"] == "TransformerConfig"
    assert report["dpsl_config"] == EXPECTED_CONFIG
    assert (
        report["bad_alpha_error"] is None
    )  # stock config ignores DPSL fields; the launcher's path checks them
    assert report["launcher_routers"] == ["DPSLRouter", "DPSLRouter"]


def test_baselines_without_dpsl_get_the_plugin_modules(megatron_lm_reports):
    # variance + orthogonality losses and the AC router, no 'dpsl': the patched tree's own config
    # function and builder, and the launcher on both trees, build the plugin's config and modules
    patched = megatron_lm_reports["patched"]["build_baselines"]
    unpatched = megatron_lm_reports["unpatched"]["build_baselines"]
    assert "error" not in patched and "error" not in unpatched, (
        patched.get("error"),
        unpatched.get("error"),
    )
    assert patched["core_config"] == "DPSLTransformerConfig"  # patch 1 (core_v0.19.0: patch 2)
    assert unpatched["core_config"] == "TransformerConfig"
    # every MoE layer gets ACRouter (layer 1 routes as TopKRouter and hands its assignment to layer
    # 2)
    expected = {"routers": ["ACRouter", "ACRouter"], "moe_layers": ["DPSLMoELayer", "DPSLMoELayer"]}
    assert patched["megatron_lm"] == expected
    assert patched["launcher"] == expected and unpatched["launcher"] == expected


def test_launcher_names_the_env_var_when_megatron_lm_is_missing(tmp_path, monkeypatch):
    from megatron_dpsl.megatron_lm import pretrain_gpt as launcher

    monkeypatch.setenv(launcher.PATH_ENV, str(tmp_path))
    with pytest.raises(
        SystemExit, match=f"{launcher.PATH_ENV}={tmp_path}: no pretrain_gpt.py there"
    ):
        launcher.import_pretrain_gpt()
    monkeypatch.delenv(launcher.PATH_ENV)
    if "megatron.training" in sys.modules or Path("pretrain_gpt.py").exists():
        pytest.skip("Megatron-LM's training package is importable in this interpreter")
    with pytest.raises(SystemExit, match=f"Set {launcher.PATH_ENV}=/path/to/Megatron-LM"):
        launcher.import_pretrain_gpt()


# --------------------------------------------------------------------------- hooks the patches call


def _group_args(**over):
    """What ``DatasetTokenGroups`` reads of Megatron-LM's ``args`` (two groups, micro-batch 3,
    CP 2)."""
    fields = dict(
        moe_router_load_balancing_type="dpsl",
        moe_dpsl_group_alphas=None,
        moe_dpsl_num_groups=2,
        overlap_moe_expert_parallel_comm=False,
        micro_batch_size=3,
        seq_length=8,
        context_parallel_size=2,
        pipeline_model_parallel_size=4,
    )
    fields.update(over)
    return type("Args", (), fields)()


def test_dataset_token_groups_follow_the_blend_index():
    import torch
    from support.megatron_cpu import init_single_process

    from megatron_dpsl.megatron_lm.hooks import DatasetTokenGroups
    from megatron_dpsl.parallel.token_groups import get_dpsl_token_groups

    init_single_process()
    args = _group_args()
    batches = iter([{"dataset_id": torch.tensor([1, 0, 1]), "tokens": torch.zeros(3, 8)}])
    groups = DatasetTokenGroups(args, batches)
    next(groups.data_iterator)  # what get_batch_on_this_tp_rank does on TP rank 0
    assert get_dpsl_token_groups() is None
    with groups.context(torch.zeros(3, 4)):
        seen = get_dpsl_token_groups()
        # [micro_batch, seq / cp]: this CP rank's slice, like get_batch's tokens
        assert seen.cp_sliced
        assert seen.group_ids.tolist() == [[1] * 4, [0] * 4, [1] * 4]
    assert get_dpsl_token_groups() is None

    # no dataset_id (a single dataset instead of a blend) -> the error says how to give groups
    groups = DatasetTokenGroups(args, iter([{"tokens": torch.zeros(3, 8)}]))
    next(groups.data_iterator)
    with pytest.raises(ValueError, match="--data-path as a blend"):
        groups.context(None).__enter__()
    # more datasets than groups
    groups = DatasetTokenGroups(args, iter([{"dataset_id": torch.tensor([2, 0, 0])}]))
    next(groups.data_iterator)
    with pytest.raises(ValueError, match="index 2"):
        groups.context(None).__enter__()


def test_every_pipeline_stage_reads_its_own_micro_batches_ids():
    """A middle stage, whose get_batch reads nothing, reads the sample itself, once per
    micro-batch; a first or last stage, whose get_batch read it, does not read again."""
    import torch
    from support.megatron_cpu import init_single_process

    from megatron_dpsl.megatron_lm.hooks import DatasetTokenGroups, dataset_on_every_stage
    from megatron_dpsl.parallel.token_groups import get_dpsl_token_groups

    init_single_process()
    args = _group_args()
    assert dataset_on_every_stage(args)
    assert not dataset_on_every_stage(_group_args(moe_dpsl_num_groups=None))
    samples = [{"dataset_id": torch.tensor([i % 2] * 3)} for i in range(4)]
    middle, outer = iter(samples), iter(samples)
    for i in range(4):
        on_middle = DatasetTokenGroups(args, middle)  # get_batch returned Nones: nothing read
        on_outer = DatasetTokenGroups(args, outer)
        next(on_outer.data_iterator)  # get_batch read this micro-batch's sample
        for stage in (on_middle, on_outer):
            with stage.context(None):
                assert get_dpsl_token_groups().group_ids.tolist() == [[i % 2] * 4] * 3
    for stream in (middle, outer):  # each stage read exactly one sample per micro-batch
        assert next(stream, None) is None


def test_dataset_token_groups_are_a_no_op_without_group_priors():
    args = type(
        "Args",
        (),
        dict(
            moe_router_load_balancing_type=["aux_loss", "dpsl"],
            moe_dpsl_group_alphas=None,
            moe_dpsl_num_groups=None,
        ),
    )()
    from megatron_dpsl.megatron_lm.hooks import DatasetTokenGroups

    data = iter([{"tokens": 0}])
    groups = DatasetTokenGroups(args, data)
    assert groups.data_iterator is data  # the iterator is not even wrapped
    with groups.context(None):
        pass
