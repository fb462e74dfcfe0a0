"""CPU stand-ins for the few CUDA-only calls megatron-core 0.16 makes while building and running a
GPTModel.

Why this module exists: the embedded trainer must run on a laptop CPU (the quickstart, CI), but
megatron-core 0.16.1 asks CUDA for a device or an RNG state in a handful of places even when every
tensor lives on the CPU. :func:`enable` answers exactly those calls. Only the trainer calls it, and
only when it runs on CPU (``--device cpu``, or ``auto`` without a GPU); the library modules (router,
loss, upcycle) never import it. It changes process-wide ``torch.cuda`` functions, so a process that
enabled it must not also use a GPU. The test suite has its own copy of the
shims (``tests/support/megatron_cpu.py``) so library tests never depend on this file.

Each adaptation below names the Megatron call it answers.
"""

from __future__ import annotations

import contextlib

import torch

_ENABLED = False


def enable() -> None:
    """Install the CPU stand-ins (idempotent)."""
    global _ENABLED
    if _ENABLED:
        return
    _ENABLED = True

    # Buffers in Router/MoE/DDP are allocated with device=torch.cuda.current_device()
    # (e.g. Router.__init__'s expert-bias buffers, param_and_grad_buffer's grad buffer).
    torch.cuda.current_device = lambda: torch.device("cpu")
    # torch.cuda.synchronize() around timers/checkpoint saves: nothing to wait for on CPU.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # megatron-core 0.19's DDP grad sync (param_and_grad_buffer.start_grad_sync) has the current
    # stream wait for CUDA-graph events: on CPU the work is already in order.
    torch.cuda.current_stream = lambda *args, **kwargs: _HostStream()

    from megatron.core.tensor_parallel import random as mpu_random

    # model_parallel_cuda_manual_seed -> CudaRNGStatesTracker.add reads torch.cuda.get_rng_state(),
    # and every dropout inside a tensor-parallel region runs under CudaRNGStatesTracker.fork(). On
    # CPU the tracker keeps CPU generator states instead, so forked regions still get their own
    # seeded stream.
    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name=mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    mpu_random.CudaRNGStatesTracker.add = add
    mpu_random.CudaRNGStatesTracker.fork = fork
    # Activation recompute (tensor_parallel.checkpoint, --recompute-granularity) saves and restores
    # the CUDA generator next to the CPU one; on CPU there is none (the CPU one is still restored).
    mpu_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mpu_random._set_cuda_rng_state = lambda *args, **kwargs: None
    _schedules_count_tokens_on_cpu()
    # (Router.gating's weight move is DPSLRouter's own concern: it follows the input's device.)


class _HostStream:
    """The current "stream" on a CPU: nothing to wait for."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


class _TorchForSchedules:
    """``torch`` as Megatron's pipeline schedules see it: ``torch.zeros(..., device="cuda")`` (the
    schedules' token counter, ``total_num_tokens``) is made on the CPU; everything else is torch."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def _schedules_count_tokens_on_cpu() -> None:
    """Megatron's ``forward_backward_pipelining_{with,without}_interleaving`` allocate their token
    counter with ``device="cuda"`` (megatron-core 0.16 and 0.19); the trainer runs them on CPU for
    ``--pipeline-model-parallel-size > 1``."""
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchForSchedules()


@contextlib.contextmanager
def model_construction():
    """While a model is built: ``.cuda()`` is a no-op (everything is on the CPU). Undone on exit.

    Two Megatron calls need it: ``CLIPViTModel.__init__`` moves its position ids with ``.cuda()``
    (``--llava``), and under pipeline parallelism with tied embeddings
    ``LanguageModule.setup_embeddings_and_output_layer`` moves the shared weight with ``.cuda()``
    before it all-reduces it over the embedding group. (CLIP's norms without Transformer Engine are
    the builder's own fix, ``models.vlm.clip_norms_without_te``.)
    """
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


def is_enabled() -> bool:
    """Whether :func:`enable` installed the stand-ins in this process."""
    return _ENABLED
