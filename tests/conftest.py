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
