"""CPU shims for megatron-core's CUDA-only calls. Test helpers only: never imported by the package.

megatron-core 0.16.1 calls ``torch.cuda.current_device()`` for buffers and in ``Router.gating``,
``torch.cuda.synchronize()`` in a few places, and forks the CUDA RNG tracker in dropout regions.
On a CPU-only machine these raise, so tests (and torchrun workers launched by tests) call
:func:`install` before building Megatron modules.
"""

from __future__ import annotations

import contextlib
import os

import torch


def install() -> None:
    """Make megatron-core's CUDA-only calls work on CPU (idempotent)."""
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    # megatron-core 0.19's DDP grad sync asks for the current stream to wait on CUDA-graph events
    # (there are none on CPU)
    torch.cuda.current_stream = lambda *a, **k: _CpuStream()
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    mpu_random.CudaRNGStatesTracker.add = lambda self, name, seed: None
    from megatron.core.transformer.moe import moe_utils

    # without Transformer Engine the name is never bound (NameError in router_gating_linear)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _CpuStream:
    """Stands for ``torch.cuda.current_stream()`` on CPU: nothing to wait for."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


def init_single_process(**parallel_kwargs) -> None:
    """A one-rank gloo process group plus Megatron's model-parallel state (for in-process tests)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    install()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # this process hosts the store: an inherited MASTER_PORT is a parent pytest's, already listening
        os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 2000)
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**parallel_kwargs)


def init_torchrun(**parallel_kwargs) -> None:
    """gloo process group from torchrun's environment plus Megatron's model-parallel state."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    install()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**parallel_kwargs)
