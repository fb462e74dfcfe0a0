"""Every router method from the embedded trainer's command line (``megatron-dpsl-train``), in one
real run.

One in-process ``pretrain`` (one-rank gloo world, mock data) with all of them at once: Megatron's
aux loss and z-loss, DPSL, the variance and orthogonality losses (coefficients in their
``--moe-aux-loss-coeff`` slots), the aux-loss-free expert bias (``--moe-router-enable-expert-bias``,
``--moe-router-bias-update-rate``) and the AC router (``--moe-ac-layers``). One run keeps the
default suite fast (the first call of Megatron's expert-bias update compiles it with
``torch.compile``); the comparison's slow test (tests/unit/train/test_compare_routers.py) runs each
method alone on 2 ranks.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from support.trainer_argv import SMALL_MOE
from support.trainer_argv import TINY as TINY_ARGV

from megatron_dpsl.train.arguments import parse_args, validate_args

TINY = [*TINY_ARGV, *SMALL_MOE]
RATE = 0.25  # large, so a wrong update (or none) cannot hide in float32 rounding
EVERYTHING = [
    "--moe-router-load-balancing-type",
    "aux_loss",
    "dpsl",
    "variance",
    "orthogonality",
    "--moe-aux-loss-coeff",
    "1e-2",
    "0.01",
    "1e-3",
    "1e-4",
    "--moe-z-loss-coeff",
    "1e-3",
    "--moe-router-score-function",
    "sigmoid",
    "--moe-router-enable-expert-bias",
    "--moe-router-bias-update-rate",
    str(RATE),
    "--moe-ac-layers",
    "2",
    "--moe-dpsl-log-interval",
    "1",
]


def _count_training_loads(routers):
    """Per router, the expert loads of every training forward (what Megatron's bias update
    counts)."""
    loads = {i: [] for i in range(len(routers))}

    def hook(index):
        def record(router, args, output):
            if router.training and torch.is_grad_enabled():  # as TopKRouter._apply_expert_bias
                loads[index].append(output[1].sum(dim=0).float())

        return record

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    return loads, handles


def test_every_method_from_the_command_line(monkeypatch):
    """Each loss reaches Megatron's tracker, the AC router is built, and the expert bias follows
    Megatron's update (finalize_model_grads -> _update_router_expert_bias) after every step."""
    from megatron_dpsl.routing.ac.router import ACRouter
    from megatron_dpsl.train import trainer

    iters = 2
    args = parse_args([*TINY, *EVERYTHING, "--train-iters", str(iters)])
    seen = {}
    real_setup = trainer.setup

    def setup(a):  # the trainer's own setup; the hooks only watch the routers it built
        run = real_setup(a)
        (model,) = run.model_chunks  # one stage
        seen["routers"] = [m for m in model.modules() if isinstance(m, ACRouter)]
        seen["loads"], seen["handles"] = _count_training_loads(seen["routers"])
        return run

    monkeypatch.setattr(trainer, "setup", setup)
    result = trainer.pretrain(args)
    for h in seen["handles"]:
        h.remove()

    for name in (
        "load_balancing_loss",
        "z_loss",
        "dpsl_loss",
        "variance_loss",
        "orthogonality_loss",
    ):
        values = [v for _, v in result.aux_losses.get(name, [])]
        assert len(values) == iters and all(math.isfinite(v) and v != 0 for v in values), (
            name,
            values,
        )
    assert all(v < 0 for _, v in result.aux_losses["variance_loss"])  # -γ·variance

    routers = seen["routers"]
    assert [r.ac_enabled for r in routers] == [False, True]  # AC on the MoE layer after the first
    assert all(r.score_function == "sigmoid" and r.enable_expert_bias for r in routers)
    for index, router in enumerate(routers):
        loads = seen["loads"][index]
        assert len(loads) == iters * args.num_microbatches
        expected = torch.zeros(args.num_experts)
        for step in range(iters):  # Megatron's get_updated_expert_bias, once per global batch
            tokens = sum(loads[step * args.num_microbatches : (step + 1) * args.num_microbatches])
            expected = expected + torch.sign(tokens.mean() - tokens) * RATE
        assert torch.equal(router.expert_bias, expected), (index, router.expert_bias, expected)
        assert router.expert_bias.abs().sum() > 0  # it moved
        assert not router.local_tokens_per_expert.any()  # reset after each update, as Megatron does


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--moe-router-bias-update-rate=-1e-3"], "--moe-router-bias-update-rate"),
        (["--moe-router-enable-expert-bias"], "--moe-router-score-function sigmoid"),
    ],
)
def test_expert_bias_flag_errors_name_the_flag(extra, flag):
    from megatron_dpsl.train.model import config_from_args

    with pytest.raises(ValueError, match=re.escape(flag)):
        args = validate_args(parse_args([*TINY, *extra]), 1)  # the trainer's check ...
        config_from_args(args, use_cpu_initialization=True)  # ... or Megatron's, through the config


def test_expert_bias_needs_an_moe_model():
    dense = TINY[: TINY.index("--num-experts")]
    with pytest.raises(ValueError, match="--moe-router-enable-expert-bias"):
        validate_args(parse_args([*dense, "--moe-router-enable-expert-bias"]), 1)
