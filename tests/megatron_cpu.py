"""CPU shims for megatron-core's CUDA-only calls. Test helpers only: never imported by the package.

megatron-core 0.16.1 calls ``torch.cuda.current_device()`` for buffers and in ``Router.gating``,
``torch.cuda.synchronize()`` in a few places, forks the CUDA RNG tracker in dropout regions and saves
the CUDA RNG state for activation recompute; 0.19's DDP also asks for ``torch.cuda.current_stream()``.
On a CPU-only machine these raise, so tests (and torchrun workers launched by tests) call
:func:`install` before building Megatron modules.
"""

from __future__ import annotations

import contextlib
import socket

import torch


class _NoStream:
    """The current "stream" on a CPU: work is already in order, nothing to wait for."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


def install() -> None:
    """Make megatron-core's CUDA-only calls work on CPU (idempotent)."""
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    # megatron-core 0.19's DDP grad sync waits on the current stream for CUDA-graph events
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    mpu_random.CudaRNGStatesTracker.add = lambda self, name, seed: None
    # activation recompute (tensor_parallel.checkpoint) saves/restores the CUDA generator too; the CPU
    # generator it also saves is the one CPU runs draw from
    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mpu_random._set_cuda_rng_state = lambda *a, **k: None
    from megatron.core.transformer.moe import moe_utils

    # without Transformer Engine the name is never bound (NameError in router_gating_linear)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def init_single_process(**parallel_kwargs) -> None:
    """A one-rank gloo process group plus Megatron's model-parallel state (for in-process tests)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    install()
    if not dist.is_initialized():
        # a free port passed directly, not through MASTER_PORT: subprocesses that tests start inherit
        # os.environ and would try to bind the same port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
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
