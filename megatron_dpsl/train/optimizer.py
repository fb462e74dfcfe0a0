"""The optimizer: ``megatron.core.optimizer`` where it runs, else ``torch.optim.AdamW`` with
Megatron's rules.

On a GPU the trainer uses Megatron's own ``get_megatron_optimizer(OptimizerConfig(...))``. On a CPU
that is not possible: megatron-core 0.16.1's ``FP32Optimizer`` and ``clip_grads`` allocate with
``device='cuda'`` literals. :class:`TorchAdamW` reproduces what Megatron's non-distributed FP32
optimizer does for this trainer's models:

* parameter groups: no weight decay on biases and 1-D parameters (``_get_param_groups``), with
  ``wd_mult``/``lr_mult`` keys so ``OptimizerParamScheduler`` drives them unchanged;
* gradients are DDP's ``main_grad`` buffers (``param.grad = param.main_grad``, as
  ``FP32Optimizer``);
* the global gradient norm of ``get_grad_norm_fp32`` + ``ChainedOptimizer``: squared norms of the
  dense parameters that are neither tensor-parallel duplicates nor shared (a tied output layer on
  the last pipeline stage), summed over the model-parallel group (pipeline stages included),
  plus those of the expert parameters summed over the expert-tensor-model-pipeline group; clipping
  by ``clip_grad / (norm + 1e-6)`` when below 1;
* ``sharded_state_dict``: the Adam moments as ``ShardedTensor``s keyed like the model parameters
  (``dist_checkpointing.optimizer.optim_state_to_sharding_state``), so a checkpoint reloads under
  any TP/EP layout.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.distributed as dist


def _param_groups(model_chunks: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    named = itertools.chain.from_iterable(chunk.named_parameters() for chunk in model_chunks)
    for name, param in named:
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(param)
    groups = []
    for params, wd_mult in ((decay, 1.0), (no_decay, 0.0)):
        if params:
            groups.append(
                {
                    "params": params,
                    "wd_mult": wd_mult,
                    "lr_mult": 1.0,
                    "weight_decay": weight_decay * wd_mult,
                }
            )
    return groups


def grad_norm_fp32(params: list[torch.nn.Parameter]) -> float:
    """Megatron's global grad norm (``get_grad_norm_fp32`` over the dense and expert optimizers of
    ``ChainedOptimizer``) from ``param.grad``; see the module docstring."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    dense_sq = torch.zeros((), dtype=torch.float32)
    expert_sq = torch.zeros((), dtype=torch.float32)
    for p in params:
        # a tied output layer on the last pipeline stage is the first stage's embedding (shared):
        # its gradient, all-reduced across the embedding group, counts once
        if p.grad is None or not param_is_not_tensor_parallel_duplicate(p):
            continue
        if not param_is_not_shared(p):
            continue
        sq = p.grad.detach().float().pow(2).sum().cpu()
        if getattr(p, "allreduce", True):
            dense_sq += sq
        else:
            expert_sq += sq
    buf = torch.stack([dense_sq, expert_sq]).to(params[0].device)
    # gloo cannot reduce two groups in one call: each sum goes over its own group
    dense, expert = buf[0:1].clone(), buf[1:2].clone()
    dist.all_reduce(dense, group=parallel_state.get_model_parallel_group())
    dist.all_reduce(expert, group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return float((dense + expert).sqrt().item())


class TorchAdamW:
    """``torch.optim.AdamW`` behind the slice of ``MegatronOptimizer``'s interface the trainer
    uses."""

    def __init__(self, model_chunks: list[torch.nn.Module], args: argparse.Namespace):
        self.clip_grad = args.clip_grad
        self.optimizer = torch.optim.AdamW(
            _param_groups(model_chunks, args.weight_decay),
            lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps,
            foreach=False,
        )

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _params(self) -> list[torch.nn.Parameter]:
        return list(itertools.chain.from_iterable(g["params"] for g in self.optimizer.param_groups))

    def zero_grad(self) -> None:
        for p in self._params():
            p.grad = None

    def step(self) -> tuple[bool, float, int | None]:
        """Returns ``(update_successful, grad_norm, num_zeros_in_grad)`` like
        ``MegatronOptimizer.step``."""
        params = self._params()
        for p in params:
            main_grad = getattr(p, "main_grad", None)
            if main_grad is not None:
                p.grad = main_grad  # DDP accumulates into main_grad (fp32, same shape)
        norm = grad_norm_fp32(params)
        if self.clip_grad > 0:
            coeff = self.clip_grad / (norm + 1.0e-6)
            if coeff < 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coeff)
        self.optimizer.step()
        return True, norm, None

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False):
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        if is_loading:
            self._init_state()
        state_dict = self.optimizer.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self._params())
        steps = {float(s["step"]) for s in state_dict["state"].values() if "step" in s}
        optim_state_to_sharding_state(state_dict, id_map, exclude_keys=("step",))
        if steps:
            # one shared step, as Megatron's FP32Optimizer saves it ("common_step")
            state_dict["state"]["common_step"] = torch.tensor(steps.pop())
        return state_dict

    def load_state_dict(self, state_dict) -> None:
        state = dict(state_dict["state"])
        step = state.pop("common_step", None)
        if step is not None:
            for s in state.values():
                s["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
        self.optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})

    def _init_state(self) -> None:
        # allocate exp_avg/exp_avg_sq so the loading state dict has tensors to fill
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not self.optimizer.state[p]:
                    self.optimizer.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }


def build_optimizer(args: argparse.Namespace, ddp_chunks: list, model_chunks: list, on_cuda: bool):
    """Megatron's optimizer (``--optimizer-impl megatron``, the default on GPU) or
    :class:`TorchAdamW`, over every model chunk of this rank."""
    impl = args.optimizer_impl
    if impl == "auto":
        impl = "megatron" if on_cuda else "torch"
    if impl == "megatron":
        if not on_cuda:
            raise ValueError(
                "--optimizer-impl megatron: megatron.core.optimizer needs CUDA (it allocates "
                "on 'cuda'); use torch"
            )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        config = OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            params_dtype=torch.float32,
            use_distributed_optimizer=False,
        )
        return get_megatron_optimizer(config, ddp_chunks), "megatron"
    return TorchAdamW(model_chunks, args), "torch"


def build_scheduler(args: argparse.Namespace, optimizer):
    """Megatron's ``OptimizerParamScheduler`` (pure Python: works on CPU and GPU alike)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        # on --load, checkpoint.check_schedule has already refused a schedule that differs from
        # this run's unless one of the two flags says which wins (Megatron-LM's rule)
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )
