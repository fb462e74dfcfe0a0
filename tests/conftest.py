import os
import sys

import pytest
import torch

# The one place that sets up import paths: tests/ for the helpers beside the test modules
# (the ``support`` package: megatron_cpu, common, upcycle, workers/...) and scripts/ for
# megatron_lm_story (the GPU story's argv, which the Megatron-LM tests run on CPU). Child
# interpreters get the same through support.common.child_env's PYTHONPATH.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.join(os.path.dirname(TESTS_DIR), "scripts"), TESTS_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

if not torch.cuda.is_available():
    # CPU-only machine: Triton kernels (megatron_dpsl/losses/dpsl_triton.py) run under Triton's
    # interpreter, which must be chosen before Triton is imported
    # (tests/unit/losses/test_dpsl_triton.py); with a GPU they compile.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(
        reason="needs a CUDA GPU (run on the device machine: scripts/run_gpu_tests.sh)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _aux_loss_scale_per_test():
    """No test inherits another's aux-loss backward scale: ``MoEAuxLossAutoScaler`` keeps it as
    class state for the whole process, and a 0-dim scale left behind breaks the next
    ``set_loss_scale`` of Megatron's own shape ([1]) with a broadcast error far from its cause."""
    yield
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None


@pytest.fixture
def fresh_moe_losses():
    """An empty MoE metrics tracker and an aux-loss backward scale of 1 for one test; the scale
    (class state
    shared by the whole pytest process) is left as found, the tracker empty."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from support.common import reset_moe_tracker

    reset_moe_tracker()
    previous = MoEAuxLossAutoScaler.main_loss_backward_scale
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = previous
    reset_moe_tracker()


@pytest.fixture(scope="session")
def megatron_lm_trees(tmp_path_factory):
    """Megatron-LM at the tag of the installed megatron-core, from $MEGATRON_LM_GIT_DIR or the
    committed
    snapshot (megatron_lm_tree.py): ``{"tag", "git_dir" (None: snapshot), "unpatched", "patched",
        "work"}``."""
    from support.megatron_lm_tree import export_tree, source_or_skip, tag_for_installed_core

    from megatron_dpsl.megatron_lm.patching import apply_patches

    tag = tag_for_installed_core()
    git_dir = source_or_skip(tag)
    work = tmp_path_factory.mktemp("megatron-lm")
    unpatched = export_tree(tag, work / "unpatched-tree", git_dir)
    patched = export_tree(tag, work / "patched-tree", git_dir)
    apply_patches(patched)
    return {
        "tag": tag,
        "git_dir": git_dir,
        "unpatched": str(unpatched),
        "patched": str(patched),
        "work": work,
    }


@pytest.fixture(scope="session")
def megatron_lm_reports(megatron_lm_trees):
    """What tests/support/megatron_lm_chain.py reports for every case and build, per tree
    (megatron_lm_cases.py)."""
    from support.megatron_lm_cases import run_reports

    return run_reports(megatron_lm_trees, megatron_lm_trees["work"])
