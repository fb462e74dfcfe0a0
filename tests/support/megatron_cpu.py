"""CPU shims for megatron-core's CUDA-only calls. Test helpers only: never imported by the package.

megatron-core 0.16.1 calls ``torch.cuda.current_device()`` for buffers and in ``Router.gating``,
``torch.cuda.synchronize()`` in a few places, forks the CUDA RNG tracker in dropout regions and
saves the CUDA RNG state for activation recompute; 0.19's DDP also asks for
``torch.cuda.current_stream()``.
On a CPU-only machine these raise, so tests (and torchrun workers launched by tests) call
:func:`install` before building Megatron modules.
"""

from __future__ import annotations

import contextlib

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
    # activation recompute (tensor_parallel.checkpoint) saves/restores the CUDA generator too; the
    # CPU generator it also saves is the one CPU runs draw from
    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mpu_random._set_cuda_rng_state = lambda *a, **k: None
    from megatron.core.transformer.moe import moe_utils

    # without Transformer Engine the name is never bound (NameError in router_gating_linear)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _HostStream:
    """Stands in for ``torch.cuda.Stream`` (a class, so annotations like ``torch.cuda.Stream |
    None``
    elsewhere keep working) and its events on CPU, where every copy is already synchronous."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None):
        return self

    def synchronize(self) -> None:
        pass


def _patch(changes):
    """Apply ``[(owner, name, value)]``; returns a function that puts the old values back."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in changes]
    for owner, name, value in changes:
        setattr(owner, name, value)

    def undo() -> None:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)

    return undo


def install_alltoall_shims():
    """Let ``MoEAlltoAllTokenDispatcher`` run on CPU; returns a function that undoes it (call it
    when done:
    other libraries read ``torch.cuda.Stream``). The dispatcher makes a ``torch.cuda.Stream`` when
    built and moves split sizes to the host on it; on CPU the sizes already are host tensors, so the
    stream, ``torch.cuda.stream(...)`` and ``current_stream()`` become no-ops, and the sizes become
    NumPy arrays as the CUDA path makes them (what ``all_to_all_single`` takes)."""
    install()
    if torch.cuda.is_available():
        return lambda: None
    from megatron.core.transformer.moe import token_dispatcher

    to_host = token_dispatcher.maybe_move_tensor_to_cpu

    def host_splits(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return to_host(tensor, as_numpy=as_numpy, record_stream=record_stream)

    stream = _HostStream()
    undo = _patch(
        [
            (torch.cuda, "Stream", _HostStream),
            (torch.cuda, "current_stream", lambda *a, **k: stream),
            (torch.cuda, "stream", lambda s=None: contextlib.nullcontext()),
            (token_dispatcher, "maybe_move_tensor_to_cpu", host_splits),
        ]
    )

    def undo_all() -> None:
        undo()
        token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = (
            None  # the class caches its stream
        )

    return undo_all


def install_recompute_shims():
    """Let Megatron's activation recompute (``tensor_parallel.checkpoint``) run on CPU; returns the
    undo.
    It saves and restores the CUDA RNG state; on CPU there is none (the CPU state is still
    restored)."""
    install()
    if torch.cuda.is_available():
        return lambda: None
    from megatron.core.tensor_parallel import random as mpu_random

    return _patch(
        [
            (mpu_random, "_get_cuda_rng_state", lambda *a, **k: torch.empty(0, dtype=torch.uint8)),
            (mpu_random, "_set_cuda_rng_state", lambda *a, **k: None),
        ]
    )


def init_single_process(**parallel_kwargs) -> None:
    """A one-rank gloo process group plus Megatron's model-parallel state (for in-process tests)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    install()
    if not dist.is_initialized():
        # an in-memory store: no port to collide with, and no MASTER_PORT left in os.environ for
        # subprocesses (test_patches.py's child) to inherit and find already bound by this process
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
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


@contextlib.contextmanager
def clip_cuda_noop():
    """``CLIPViTModel.__init__`` moves its position ids to CUDA (``clip_vit_model.py``): a no-op on
    a CPU-only machine (the one CUDA-only call of a ``LLaVAModel``'s construction)."""
    install()
    undo = _patch(
        [(torch.Tensor, "cuda", lambda self, *a, **k: self)]
        if not torch.cuda.is_available()
        else []
    )
    try:
        yield
    finally:
        undo()


@contextlib.contextmanager
def llava_construction():
    """Build a megatron-core ``LLaVAModel`` on CPU (VLM_NOTES §6.2): ``clip_cuda_noop`` plus the
    package's fix for CLIP's norms without Transformer Engine (``models.vlm.clip_norms_without_te``,
    which ``build_llava_model`` applies itself), for tests that build a stock ``LLaVAModel``."""
    from megatron_dpsl.models.vlm import clip_norms_without_te

    with clip_cuda_noop(), clip_norms_without_te():
        yield
