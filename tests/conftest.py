import os
import sys

import pytest
import torch

# One place puts tests/ on sys.path, so test modules import the helpers beside them
# (megatron_cpu, _support, workers/...) without path manipulation of their own.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

if not torch.cuda.is_available():
    # CPU-only machine: Triton kernels (megatron_dpsl/fused_loss.py) run under Triton's interpreter, which
    # must be chosen before Triton is imported (tests/test_fused_loss.py); with a GPU they compile.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine: scripts/run_gpu_tests.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def free_port():
    """``free_port()`` -> a TCP port on 127.0.0.1 for a torchrun launch."""
    from _support import free_port as _free_port

    return _free_port


@pytest.fixture(scope="session")
def megatron_lm_trees(tmp_path_factory):
    """Megatron-LM at the tag of the installed megatron-core, exported from $MEGATRON_LM_GIT_DIR:
    ``{"tag", "git_dir", "unpatched", "patched", "work"}`` (skips when the variable is unset)."""
    from megatron_lm_tree import export_tree, git_dir_or_skip, tag_for_installed_core

    from megatron_dpsl.megatron_lm.patching import apply_patches

    git_dir = git_dir_or_skip()
    tag = tag_for_installed_core()
    work = tmp_path_factory.mktemp("megatron-lm")
    unpatched = export_tree(tag, work / "unpatched-tree", git_dir)
    patched = export_tree(tag, work / "patched-tree", git_dir)
    apply_patches(patched)
    return {"tag": tag, "git_dir": git_dir, "unpatched": str(unpatched), "patched": str(patched), "work": work}


@pytest.fixture(scope="session")
def megatron_lm_reports(megatron_lm_trees):
    """What tests/megatron_lm_chain.py reports for every case and build, per tree (megatron_lm_cases.py)."""
    from megatron_lm_cases import run_reports

    return run_reports(megatron_lm_trees, megatron_lm_trees["work"])
