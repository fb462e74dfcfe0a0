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
    # (Router.gating's weight move is DPSLRouter's own concern: it follows the input's device.)


@contextlib.contextmanager
def llava_construction():
    """While ``LLaVAModel`` is built (``--llava``): ``CLIPViTModel.__init__`` moves its position ids
    with ``.cuda()``: a no-op here (everything is on the CPU). Undone on exit. (CLIP's norms without
    Transformer Engine are the builder's own fix, ``models.vlm.clip_norms_without_te``.)
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
