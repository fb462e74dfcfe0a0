"""The embedded trainer: GPT / MoE-with-DPSL pretraining on megatron-core, Megatron-LM's flag names.

Single process (CPU laptop)::

    python -m megatron_dpsl.train.trainer --data-path outputs/corpus --num-experts 8
    --moe-router-topk 2 \\
        --moe-router-load-balancing-type dpsl --moe-dpsl-alpha 1.0 --train-iters 100
        --micro-batch-size 4

Several ranks, one node / several nodes (see examples/pretrain_gpt_dpsl.sh)::

    torchrun --nproc-per-node 2 -m megatron_dpsl.train.trainer ... --expert-model-parallel-size 2
    torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT -m megatron_dpsl.train.trainer ...

What is Megatron's and what is not (docs/trainer.md has the measured reasons): the model
(``GPTModel`` + ``get_dpsl_layer_spec``), ``initialize_model_parallel``, ``DistributedDataParallel``
+ ``finalize_model_grads``, ``OptimizerParamScheduler``, ``dist_checkpointing`` and the aux-loss
tracker are Megatron-Core's everywhere. The optimizer and the micro-batch schedule are Megatron's on
GPU and plain-torch reproductions on CPU (``optimizer.py``, ``schedule.py``), where megatron-core
allocates on "cuda". On CPU, ``cpu_platform.enable()`` answers Megatron's remaining CUDA-only calls.

This module's top level imports nothing heavy: ``dist_checkpointing`` spawns helper processes that
re-import the main module.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class TrainResult:
    """What ``pretrain`` returns (for the quickstart and tests)."""

    args: argparse.Namespace
    model: object  # the unwrapped GPTModel (this rank's first model chunk under pipelining)
    iteration: int
    train_losses: list[float] = field(default_factory=list)  # lm loss per iteration (DP mean)
    valid_losses: list[tuple] = field(default_factory=list)  # (iteration, lm loss)
    aux_losses: dict = field(default_factory=dict)  # name -> [(iteration, value)]
    routing_history: list = field(
        default_factory=list
    )  # rank 0: per evaluation, routing_stats.summarize()
    step_seconds: list[float] = field(
        default_factory=list
    )  # wall time of each train_step on this rank
    step_cpu_seconds: list[float] = field(
        default_factory=list
    )  # CPU time of this process in each train_step
    optimizer_impl: str = ""
    schedule_impl: str = ""
    model_chunks: list = field(default_factory=list)  # this rank's unwrapped model chunks


@dataclass(kw_only=True)
class TrainingRun:
    """The state of one ``pretrain`` call, built by ``setup`` (the trainer keeps nothing at module
    level)."""

    args: argparse.Namespace
    device: object  # torch.device
    model_chunks: list  # this rank's unwrapped models: one per virtual pipeline stage (else one)
    ddp_chunks: list  # Megatron's DistributedDataParallel around each
    optimizer: object
    scheduler: object  # Megatron's OptimizerParamScheduler
    train_sampler: object  # data.BatchSampler
    valid_sampler: object
    forward_backward: object  # the micro-batch schedule (schedule.get_forward_backward)
    forward_step: object
    stats: object | None  # routing_stats.RoutingStats (MoE models) or None
    stats_prior: object | None  # the prior routing distances are measured to, [E] or [G, E]
    num_groups: int  # rows of the per-group expert-usage table
    writer: object | None  # TensorBoard SummaryWriter on rank 0 with --tensorboard-dir, else None
    result: TrainResult  # result.iteration counts the iterations done


@dataclass
class IntervalLog:
    """What Megatron-LM's console line averages: losses summed since the last line was printed."""

    t_last: float  # time.time() when the interval started
    totals: dict = field(default_factory=dict)  # name -> sum
    counts: dict = field(default_factory=dict)  # name -> iterations that reported it
    iters: int = 0

    def add(self, name: str, value: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the rendezvous of a one-rank world, the quickstart's
    torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_rank_0(message: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def initialize_distributed(args: argparse.Namespace):
    """torch.distributed from torchrun's environment (or a one-rank world); returns (device,
    backend)."""
    import torch
    import torch.distributed as dist

    on_cuda = {"auto": torch.cuda.is_available(), "cuda": True, "cpu": False}[args.device]
    if on_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if not on_cuda:
        from megatron_dpsl.train import cpu_platform

        cpu_platform.enable()
    backend = args.distributed_backend or ("nccl" if on_cuda else "gloo")
    if backend == "nccl" and not on_cuda:
        raise ValueError("--distributed-backend nccl: needs --device cuda")
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m ...`: a one-rank world
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        if on_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    return device, backend


def _set_random_seed(seed: int) -> None:
    """Megatron-LM's ``_set_random_seed``: each pipeline stage draws from ``seed + 100 *
    pp_rank``."""
    import numpy as np
    import torch
    from megatron.core import parallel_state, tensor_parallel

    seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _last_stage_mean(total: float, count: int, device) -> float:
    """``total / count`` of the last pipeline stage (the only one with losses), on every rank of
    the pipeline group, then averaged over data-parallel ranks."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
    return _reduce_dp_mean([(t[0] / t[1].clamp(min=1)).item()], device)[0]


def data_iterators(sampler, iteration: int, num_chunks: int):
    """The data iterator Megatron's schedules take: one per model chunk with the interleaved
    schedule (each chunk reads the whole global batch, its group ids included), else one."""
    if num_chunks == 1:
        return sampler.iterator(iteration)
    return [sampler.iterator(iteration) for _ in range(num_chunks)]


def _reduce_dp_mean(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    t = torch.tensor(values, dtype=torch.float64, device=device)
    group = parallel_state.get_data_parallel_group()
    dist.all_reduce(t, group=group)
    return (t / dist.get_world_size(group=group)).tolist()


def _group_context(model_config):
    import contextlib

    if getattr(model_config, "num_moe_experts", None) is None:
        return lambda group_ids: contextlib.nullcontext()
    from megatron_dpsl.parallel.token_groups import dpsl_token_groups

    return dpsl_token_groups


def _stats_prior(config):
    """The prior distances are measured to: the run's DPSL prior, else the symmetric Dir(1)
    reference."""
    import torch

    if getattr(config, "moe_dpsl_enabled", False):
        return config.dpsl_alpha()
    return torch.ones(config.num_moe_experts, dtype=torch.float64)


def evaluate(
    args, ddp_chunks, sampler, forward_backward, forward_step, device, stats=None
) -> float:
    """Mean validation lm loss over ``--eval-iters`` global batches (DP mean), Megatron-LM's
    ``evaluate``."""
    import torch

    from megatron_dpsl.tracking import moe_tracker

    for chunk in ddp_chunks:
        chunk.eval()
    if stats is not None:
        stats.reset()
        stats.enabled = True
    total, count = 0.0, 0
    with torch.no_grad():
        for it in range(args.eval_iters):
            out = forward_backward(
                forward_step_func=forward_step,
                data_iterator=data_iterators(sampler, it, len(ddp_chunks)),
                model=ddp_chunks,
                num_microbatches=sampler.num_microbatches,
                seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size,
                forward_only=True,
            )
            total += sum(float(d["lm loss"]) for d in out)
            count += len(out)
    if stats is not None:
        stats.enabled = False
    if args.num_experts is not None:
        moe_tracker.clear_tracker()  # eval-time router losses are not training losses
    for chunk in ddp_chunks:
        chunk.train()
    return _last_stage_mean(total, count, device)


def initialize(args: argparse.Namespace):
    """torch.distributed, flag checks, Megatron's model-parallel state, seeds; returns (device,
    backend)."""
    import torch.distributed as dist

    from megatron_dpsl.train.arguments import validate_args

    device, backend = initialize_distributed(args)
    validate_args(args, dist.get_world_size())
    args.batch_p2p_comm = args.batch_p2p_comm and backend == "nccl"  # gloo has no batched p2p
    if (
        backend == "gloo"
        and args.moe_token_dispatcher_type != "allgather"
        and args.num_experts is not None
    ):
        raise ValueError(
            f"--moe-token-dispatcher-type {args.moe_token_dispatcher_type}: only allgather "
            "runs on CPU/gloo "
            "(megatron-core's alltoall dispatcher creates a torch.cuda.Stream)"
        )

    from megatron.core import parallel_state

    from megatron_dpsl.tracking import moe_tracker

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )
    _set_random_seed(args.seed)
    moe_tracker.reset_tracker()
    return device, backend


def _build_model(args: argparse.Namespace, device):
    """The config, this rank's model chunks on ``device`` and Megatron's DDP around each (wired
    into the config as Megatron-LM's ``get_model`` and ``train`` wire them)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_dpsl.train.model import build_model_chunks, config_from_args

    config = config_from_args(args, use_cpu_initialization=device.type == "cpu")
    chunks = [chunk.to(device) for chunk in build_model_chunks(args, config)]
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    ddp_chunks = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return config, chunks, ddp_chunks


def _resume(args: argparse.Namespace, model_chunks, optimizer, scheduler) -> int:
    """Load ``--load`` (if given); returns the iteration to start at."""
    from megatron_dpsl.train import checkpoint

    if not args.load:
        return 0
    iteration, loaded_from = checkpoint.load_checkpoint(args, model_chunks, optimizer, scheduler)
    print_rank_0(f" loaded checkpoint from {loaded_from} (resuming at iteration {iteration})")
    if iteration:
        scheduler.step(increment=0)
    return iteration


def _samplers(args: argparse.Namespace, device, model):
    """This data-parallel rank's train and validation samplers (``VLMBatchSampler``: --llava)."""
    from megatron.core import parallel_state

    from megatron_dpsl.train.data import BatchSampler, ByteCorpus

    if args.llava:
        return _vlm_samplers(args, device, model.img_seq_len)
    if args.mock_data:
        vocab = min(args.vocab_size, 256)  # byte tokens
        train_data = ByteCorpus.mock(1 << 20, args.seed, vocab)
        valid_data = ByteCorpus.mock(1 << 16, args.seed + 1, vocab)
    else:
        train_data = ByteCorpus.load(args.data_path, "train")
        valid_data = ByteCorpus.load(args.data_path, "valid")
    for split, data in (("train", train_data), ("valid", valid_data)):
        top = int(data.tokens.max()) if data.tokens.size else 0
        if top >= args.vocab_size:  # the embedding lookup would fail deep inside torch
            raise ValueError(
                f"--vocab-size: the {split} data holds token id {top}; give at least {top + 1}, "
                f"got {args.vocab_size}"
            )
    kw = dict(
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        seed=args.seed,
        device=device,
    )
    return BatchSampler(train_data, "train", **kw), BatchSampler(valid_data, "valid", **kw)


def _vlm_samplers(args: argparse.Namespace, device, img_seq_len: int):
    """This data-parallel rank's train and validation samplers of the procedural shapes data."""
    from megatron.core import parallel_state

    from megatron_dpsl.train.vlm_data import VLMBatchSampler

    kw = dict(
        img_seq_len=img_seq_len,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        seed=args.seed,
        device=device,
    )
    return VLMBatchSampler("train", **kw), VLMBatchSampler("valid", **kw)


def _open_writer(args: argparse.Namespace):
    """A TensorBoard ``SummaryWriter`` on rank 0 when ``--tensorboard-dir`` is given, else None."""
    import torch.distributed as dist

    if not args.tensorboard_dir or dist.get_rank() != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)


def setup(args: argparse.Namespace) -> TrainingRun:
    """Everything ``pretrain`` needs before the first step: model, optimizer, resumed state, data,
    logging."""
    from megatron_dpsl.tracking.routing_stats import RoutingStats
    from megatron_dpsl.train.optimizer import build_optimizer, build_scheduler
    from megatron_dpsl.train.schedule import (
        get_forward_backward,
        make_forward_step,
        make_llava_forward_step,
    )

    device, backend = initialize(args)
    on_cuda = device.type == "cuda"
    config, chunks, ddp_chunks = _build_model(args, device)
    optimizer, optimizer_impl = build_optimizer(args, ddp_chunks, chunks, on_cuda=on_cuda)
    scheduler = build_scheduler(args, optimizer)
    iteration = _resume(args, chunks, optimizer, scheduler)
    train_sampler, valid_sampler = _samplers(args, device, chunks[0])
    pipelined = args.pipeline_model_parallel_size > 1
    forward_backward = get_forward_backward(on_cuda=on_cuda, pipelined=pipelined)
    # LLaVA computes each position's modality itself (a forward pre-hook): no group-id context
    llava_step = make_llava_forward_step() if args.llava else None
    forward_step = llava_step or make_forward_step(_group_context(config))
    stats = RoutingStats(chunks) if args.num_experts is not None else None
    stats_prior = _stats_prior(config) if stats is not None else None
    # a DPSL group prior has one row per token group; the usage table has at least code and prose
    groups = stats is not None and config.moe_dpsl_enabled and config.moe_dpsl_uses_groups
    run = TrainingRun(
        args=args,
        device=device,
        model_chunks=chunks,
        ddp_chunks=ddp_chunks,
        optimizer=optimizer,
        scheduler=scheduler,
        train_sampler=train_sampler,
        valid_sampler=valid_sampler,
        forward_backward=forward_backward,
        forward_step=forward_step,
        stats=stats,
        stats_prior=stats_prior,
        num_groups=max(2, int(stats_prior.shape[0])) if groups else 2,
        writer=_open_writer(args),
        result=TrainResult(
            args=args,
            model=chunks[0],
            model_chunks=chunks,
            iteration=iteration,
            optimizer_impl=optimizer_impl,
            schedule_impl="megatron" if on_cuda or pipelined else "torch",
        ),
    )
    _print_banner(run, backend)
    return run


def _print_banner(run: TrainingRun, backend: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    args, result = run.args, run.result
    print_rank_0(
        f" > megatron-dpsl trainer: world {dist.get_world_size()} ({backend}, "
        f"{run.device.type}) | TP {args.tensor_model_parallel_size}"
        f" PP {args.pipeline_model_parallel_size}"
        f"{_virtual_stages(args)} EP {args.expert_model_parallel_size} DP "
        f"{parallel_state.get_data_parallel_world_size()} | micro-batches "
        f"{args.num_microbatches} | "
        f"parameters on rank 0: {_num_parameters(run.model_chunks)} | optimizer "
        f"{result.optimizer_impl} | "
        f"schedule {result.schedule_impl}"
    )


def _virtual_stages(args: argparse.Namespace) -> str:
    vpp = args.virtual_pipeline_model_parallel_size
    return "" if vpp is None else f" x VPP {vpp}"


def _num_parameters(chunks) -> int:
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())


def train_step(run: TrainingRun):
    """One global batch: forward/backward over the micro-batches, optimizer and LR steps; (lm loss,
    grad norm)."""
    args = run.args
    for chunk in run.ddp_chunks:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    out = run.forward_backward(
        forward_step_func=run.forward_step,
        data_iterator=data_iterators(run.train_sampler, run.result.iteration, len(run.ddp_chunks)),
        model=run.ddp_chunks,
        num_microbatches=args.num_microbatches,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=False,
    )
    _, grad_norm, _ = run.optimizer.step()
    run.scheduler.step(increment=1)
    run.result.iteration += 1
    lm_loss = _last_stage_mean(sum(float(d["lm loss"]) for d in out), len(out), run.device)
    if not math.isfinite(lm_loss):
        raise FloatingPointError(f"lm loss is {lm_loss} at iteration {run.result.iteration}")
    return lm_loss, grad_norm


def _router_losses(run: TrainingRun) -> dict:
    """Megatron's aux-loss tracker reduced and cleared (TensorBoard included): name -> value this
    step."""
    from megatron_dpsl.tracking import moe_tracker

    args = run.args
    if args.num_experts is None:
        return {}
    moe_dict: dict = {}
    moe_tracker.track_moe_metrics(
        loss_scale=1.0 / args.num_microbatches,
        iteration=run.result.iteration,
        writer=run.writer,
        total_loss_dict=moe_dict,
        per_layer_logging=args.moe_per_layer_logging,
        num_layers=args.num_layers,
    )
    # diagnostics (dpsl_cov, ...) are tracked only every --moe-dpsl-log-interval calls: 0 = not this
    # step
    return {name: float(value) for name, value in moe_dict.items() if float(value) != 0.0}


def log_step(run: TrainingRun, log: IntervalLog, lm_loss: float, grad_norm: float) -> None:
    """Record the step's losses, write its TensorBoard scalars, print the console line every
    --log-interval."""
    args, result, writer = run.args, run.result, run.writer
    iteration = result.iteration
    result.train_losses.append(lm_loss)
    log.add("lm loss", lm_loss)
    for name, value in _router_losses(run).items():
        result.aux_losses.setdefault(name, []).append((iteration, value))
        log.add(name, value)
    log.iters += 1
    lr = run.optimizer.param_groups[0]["lr"]
    if writer is not None:
        writer.add_scalar("lm loss", lm_loss, iteration)
        writer.add_scalar("learning-rate", lr, iteration)
        writer.add_scalar("grad-norm", grad_norm, iteration)
    if iteration % args.log_interval == 0 or iteration == args.train_iters:
        _print_interval(run, log, lr, grad_norm)


def _print_interval(run: TrainingRun, log: IntervalLog, lr: float, grad_norm: float) -> None:
    """Megatron-LM's ``training_log`` line for the iterations since the last one; starts a new
    interval."""
    args, iteration = run.args, run.result.iteration
    now = time.time()
    ms = 1000.0 * (now - log.t_last) / log.iters
    line = (
        f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{args.train_iters:8d} |"
        f" consumed samples: {iteration * args.global_batch_size:12d} |"
        f" elapsed time per iteration (ms): {ms:.1f} | learning rate: {lr:.6E} |"
        f" global batch size: {args.global_batch_size:5d} |"
    )
    for name, value in log.totals.items():
        # mean over the iterations that reported it (Megatron-LM prints the non-zero entries)
        line += f" {name}: {value / log.counts[name]:.6E} |"
    line += f" grad norm: {grad_norm:.3f} |"
    print_rank_0(line)
    if run.writer is not None:
        run.writer.add_scalar("iteration-time", ms / 1000.0, iteration)
    log.totals, log.counts, log.iters, log.t_last = {}, {}, 0, now


def validate(run: TrainingRun) -> None:
    """Evaluate at the current iteration; print, record and write the loss and the routing
    statistics."""
    it = run.result.iteration
    loss = evaluate(
        run.args,
        run.ddp_chunks,
        run.valid_sampler,
        run.forward_backward,
        run.forward_step,
        run.device,
        run.stats,
    )
    run.result.valid_losses.append((it, loss))
    ppl = math.exp(min(20.0, loss))
    print_rank_0(
        f" validation loss at iteration {it} | lm loss value: {loss:.6E} | lm loss PPL: "
        f"{ppl:.6E} | "
    )
    if run.writer is not None:
        run.writer.add_scalar("lm loss validation", loss, it)
        run.writer.add_scalar("lm loss validation ppl", ppl, it)
    if run.stats is not None:
        _log_routing_stats(run, it)


def _log_routing_stats(run: TrainingRun, it: int) -> None:
    """Summarise the evaluation's routing on rank 0: history, TensorBoard ``routing/*``,
    --routing-stats-path."""
    import torch

    from megatron_dpsl.tracking.routing_stats import summarize

    layers = run.stats.gather()  # collective; None off rank 0
    if layers is None:
        return
    result = run.result
    summary = summarize(layers, run.stats_prior, run.num_groups)
    summary["iteration"] = it
    result.routing_history.append(summary)
    if run.writer is not None:
        for key in ("cov", "entropy", "prior_distance", "ks_distance"):
            run.writer.add_scalar(f"routing/{key}", summary[key], it)
    if run.args.routing_stats_path:
        torch.save(
            {
                "history": result.routing_history,
                "prior": run.stats_prior,
                "valid_losses": result.valid_losses,
            },
            run.args.routing_stats_path,
        )


def save(run: TrainingRun) -> None:
    """A ``torch_dist`` checkpoint of the current iteration in ``--save`` (Megatron-LM's layout)."""
    from megatron_dpsl.train import checkpoint

    checkpoint.save_checkpoint(
        run.args, run.result.iteration, run.model_chunks, run.optimizer, run.scheduler
    )
    print_rank_0(f" saved checkpoint at iteration {run.result.iteration} to {run.args.save}")


def finish(run: TrainingRun) -> None:
    """The final evaluation and checkpoint (unless the last iteration had them); closes the writer
    and hooks."""
    args, iteration = run.args, run.result.iteration
    if not run.result.valid_losses or run.result.valid_losses[-1][0] != iteration:
        validate(run)
    if args.save and not (args.save_interval and iteration % args.save_interval == 0):
        save(run)
    if run.writer is not None:
        run.writer.flush()
        run.writer.close()
    if run.stats is not None:
        run.stats.remove()


def pretrain(args: argparse.Namespace) -> TrainResult:
    """Train per ``args`` (parsed by ``arguments.parse_args``); callable several times in one
    process."""
    run = setup(args)
    log = IntervalLog(t_last=time.time())
    while run.result.iteration < args.train_iters:
        t0, cpu0 = time.perf_counter(), time.process_time()
        lm_loss, grad_norm = train_step(run)
        run.result.step_seconds.append(time.perf_counter() - t0)
        run.result.step_cpu_seconds.append(time.process_time() - cpu0)
        log_step(run, log, lm_loss, grad_norm)
        if args.eval_interval and run.result.iteration % args.eval_interval == 0:
            validate(run)
        if args.save and args.save_interval and run.result.iteration % args.save_interval == 0:
            save(run)
    finish(run)
    return run.result


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``megatron-dpsl-train``: parse Megatron-LM-style flags and train."""
    from megatron_dpsl.train.arguments import parse_args, validate_args

    args = parse_args(argv)
    try:
        # the flags first, on a copy, before torch.distributed and Megatron are set up (seconds)
        validate_args(argparse.Namespace(**vars(args)), int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as err:
        _flag_error(err)
    try:
        pretrain(args)
    except ValueError as err:  # flags only the config or the data can judge
        _flag_error(err)
    finally:
        shutdown()


def _flag_error(err: ValueError) -> None:
    """A flag error as argparse reports one: one line naming the flag, exit code 2."""
    print(f"megatron-dpsl-train: error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def shutdown() -> None:
    """Tear down Megatron's model-parallel state and the process group."""
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except ImportError:
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
