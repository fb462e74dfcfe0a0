import os

import pytest
import torch

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
