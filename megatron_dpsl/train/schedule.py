"""One training step's forward/backward over the micro-batches of a global batch.

On a GPU, and with pipeline stages on any device, the trainer calls Megatron's own schedule
(``get_forward_backward_func()``: ``forward_backward_no_pipelining``, 1F1B, or interleaved with
virtual stages); on a CPU ``cpu_platform`` answers the pipelined schedules' one CUDA-only call.
Without pipeline stages on a CPU the trainer keeps its reproduction of the no-pipelining schedule
(megatron-core 0.16.1 allocates that schedule's token counter with ``device="cuda"`` too).
:func:`forward_backward_no_pipelining` reproduces the path this trainer takes through it, step for
step:

* ``MoEAuxLossAutoScaler.set_loss_scale(loss_scale * cp / num_microbatches)`` after each forward, so
  the router aux losses (Megatron's and DPSL) are averaged over micro-batches exactly like the LM
  loss;
* the loss returned by ``loss_func`` (the 2-tuple form) times ``cp`` divided by ``num_microbatches``
  (DDP averages over dp×cp), then ``backward()``;
* every micro-batch but the last under DDP's ``no_sync`` (the grad all-reduce fires once);
* ``finalize_model_grads`` (DDP grad sync, layernorm/embedding grads) after the last backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial

import torch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM ``pretrain_gpt.loss_func`` (per-micro-batch mean form): mean LM loss over
    unmasked tokens.

    ``output_tensor`` ``[b, s]`` per-token cross entropy; returns ``(loss, {"lm loss":
    loss.detach()})``.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def make_forward_step(group_ids_context: Callable):
    """``forward_step(data_iterator, model)`` as Megatron's schedules call it.

    ``group_ids_context(group_ids [b, s])`` returns the context that hands per-token group ids to
    the DPSL router (``megatron_dpsl.parallel.token_groups.dpsl_token_groups``) or a null context.
    """

    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model):
        batch = next(data_iterator)
        with group_ids_context(batch["group_ids"]):
            output_tensor = model(
                batch["tokens"],
                batch["position_ids"],
                batch["attention_mask"],
                labels=batch["labels"],
            )
        return output_tensor, partial(loss_func, batch["loss_mask"])

    return forward_step


def make_llava_forward_step():
    """``forward_step(data_iterator, model)`` for ``LLaVAModel`` on ``train.vlm_data`` batches.

    The loss mask is the one ``LLaVAModel`` returns, expanded to the combined text + image sequence.
    """

    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model):
        batch = next(data_iterator)
        output_tensor, loss_mask = model(
            batch["images"],
            batch["tokens"],
            batch["position_ids"],
            batch["attention_mask"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
            num_image_tiles=batch["num_image_tiles"],
        )
        return output_tensor, partial(loss_func, loss_mask)

    return forward_step


def forward_backward_no_pipelining(
    *,
    forward_step_func,
    data_iterator,
    model,
    num_microbatches: int,
    forward_only: bool = False,
    **_ignored,
) -> list[dict]:
    """CPU reproduction of Megatron's ``forward_backward_no_pipelining`` (see module docstring)."""
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler
    from megatron.core.utils import get_model_config

    if isinstance(model, list):
        (model,) = model
    config = get_model_config(model)
    no_sync = config.no_sync_func or contextlib.nullcontext
    loss_scale = (
        1.0  # fp32 training: no grad scaler (Megatron uses config.grad_scale_func(1) when set)
    )
    from megatron.core import parallel_state

    cp = parallel_state.get_context_parallel_world_size()  # Megatron's cp_group_size
    forward_data_store = []

    def one(microbatch: int):
        output_tensor, loss_fn = forward_step_func(data_iterator, model)
        loss, reduced = loss_fn(output_tensor)
        forward_data_store.append(reduced)
        if getattr(config, "num_moe_experts", None) is not None:
            # as Megatron's forward_step: the aux losses' backward is scaled like the main loss
            MoEAuxLossAutoScaler.set_loss_scale(
                torch.ones(1, device=loss.device) * loss_scale * cp / num_microbatches
            )
        if not forward_only:
            (loss * cp / num_microbatches).backward()

    with no_sync():
        for m in range(num_microbatches - 1):
            one(m)
    one(num_microbatches - 1)
    if config.finalize_model_grads_func is not None and not forward_only:
        config.finalize_model_grads_func([model], None)
    return forward_data_store


def get_forward_backward(on_cuda: bool, pipelined: bool = False):
    """Megatron's schedule on GPU and with pipeline stages (1F1B, or interleaved with virtual
    stages; on CPU ``cpu_platform`` makes their token counter on the host), the CPU reproduction of
    ``forward_backward_no_pipelining`` otherwise; all take Megatron's keywords."""
    if on_cuda or pipelined:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()
    return forward_backward_no_pipelining
