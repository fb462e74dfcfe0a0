"""The embedded trainer under pipeline parallelism equals one stage (issue 21, item 2).

A 4-layer MoE GPT with Megatron's aux loss and DPSL group priors (per-token group ids from the
data, tied embeddings) trains one step in this process and saves a checkpoint (weights and Adam
state). From it, a one-process, one-stage reference trains three more steps; one torchrun launch
(2 ranks, gloo) then trains the same three steps from the same checkpoint under each pipeline layout
of ``LAYOUTS``: 1F1B, interleaved (two virtual stages per rank), each with activation recompute too.
Every iteration's LM, aux and DPSL losses, the validation loss, the routing statistics of every
layer and every parameter after the three Adam steps are compared with the reference. Finally the
checkpoints the pipelined runs wrote (``model`` / ``model0``, ``model1``) load back under one stage
and give the pipelined run's weights bit for bit.

The trainer runs as a user runs it (``pretrain`` on parsed flags; the worker is
``tests/support/workers/trainer_phases_worker.py``): Megatron's own 1F1B and interleaved
schedules, DDP and ``finalize_model_grads`` (the embedding-group all-reduce of the tied weight),
``dist_checkpointing``; on CPU the package's ``cpu_platform`` makes the schedules' token counter on
the host. About 40-60 s on 2 shared cores: marked slow (CI's slow suite and its megatron-core 0.19
leg run it).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.common import torchrun
from support.trainer_argv import GROUP_PRIORS, SMALL_MOE, TINY

from megatron_dpsl.train.arguments import parse_args

pytestmark = [pytest.mark.distributed]

BASE = [
    *TINY,
    *SMALL_MOE,
    "--num-layers",
    "4",
    "--global-batch-size",
    "8",  # 4 micro-batches of 2: the interleaved schedule needs a multiple of PP
    "--moe-router-load-balancing-type",
    "aux_loss",
    "dpsl",
    "--moe-aux-loss-coeff",
    "0.01",
    "0.0",
    "--moe-dpsl-coeff",
    "1.0",
    *GROUP_PRIORS,
    "--moe-dpsl-log-interval",
    "1",
    "--init-method-std",
    "0.2",  # spread-out routing: DPSL's gradient well above rounding
    "--clip-grad",
    "0.05",  # below the gradient norm (~0.6): the norm summed over the stages scales every step
]
PP2 = ["--pipeline-model-parallel-size", "2"]
VPP2 = [*PP2, "--num-layers-per-virtual-pipeline-stage", "1"]
FULL = ["--recompute-granularity", "full", "--recompute-method", "uniform"]
FULL += ["--recompute-num-layers", "1"]
LAYOUTS = {
    "pp2_1f1b": PP2,
    "pp2_vpp2_interleaved": VPP2,
    "pp2_1f1b_full_recompute": [*PP2, *FULL],
    "pp2_vpp2_selective_moe_recompute": [
        *VPP2,
        "--recompute-granularity",
        "selective",
        "--recompute-modules",
        "moe",
    ],
}
STEPS = 4  # the checkpoint's one step, then three compared steps
# The stages run the one-stage model's fp32 ops on the same values (p2p copies are exact) and add
# the micro-batches' gradients in the same order; what is reassociated is the gradient norm (summed
# per stage, then across stages), whose clip coefficient scales every step, and the layers' tracked
# losses (summed across stages). Measured: LM loss 0, DPSL loss 3e-8, validation loss and
# parameters 1.2e-7 (one fp32 ulp at ~1) after three Adam steps, every layout; 1e-6 leaves room for
# another summation order. A tied embedding counted twice in the norm (planted) fails every layout,
# and a chunk reading the next global batch (planted) moves the LM loss by 0.14.
LOSS_ATOL = 1e-6
PARAM_ATOL = 1e-6


def _train(*extra):
    from megatron_dpsl.train.trainer import pretrain

    return pretrain(parse_args([*BASE, *extra]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference (this process, one stage) and every layout's ranks (one torchrun launch)."""
    tmp = tmp_path_factory.mktemp("trainer_pipeline")
    start = str(tmp / "start")
    _train("--train-iters", "1", "--save", start)
    # this run's schedule (decay over STEPS), not the one-step run's (lr 0 from iteration 1 on)
    resume = ["--load", start, "--train-iters", str(STEPS), "--override-opt_param-scheduler"]
    ref = _train(*resume)
    phases = {
        name: [*BASE, *flags, *resume, "--save", str(tmp / name)] for name, flags in LAYOUTS.items()
    }
    (tmp / "phases.json").write_text(json.dumps(phases))
    proc = torchrun(
        "trainer_phases_worker.py", str(tmp), str(tmp / "phases.json"), nproc=2, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = {
        name: [torch.load(tmp / f"{name}_rank{r}.pt", weights_only=False) for r in range(2)]
        for name in LAYOUTS
    }
    return dict(ref=ref, ranks=ranks, tmp=tmp)


def _stages(runs, name):
    """Both ranks' records of one layout, by pipeline rank."""
    ranks = sorted(runs["ranks"][name], key=lambda r: r["pp_rank"])
    assert [r["pp_rank"] for r in ranks] == [0, 1]
    return ranks


def _max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipelined_losses_equal_one_stage(runs, name):
    ref, stages = runs["ref"], _stages(runs, name)
    chunks = 2 if "vpp2" in name else 1
    assert all(r["num_chunks"] == chunks for r in stages)
    assert len(ref.train_losses) == STEPS - 1 and all(map(math.isfinite, ref.train_losses))
    for r in stages:  # the last stage's losses reach every stage (the console prints rank 0's)
        lm = _max_diff(r["train_losses"], ref.train_losses)
        valid = _max_diff([v for _, v in r["valid_losses"]], [v for _, v in ref.valid_losses])
        aux = {
            key: _max_diff([v for _, v in r["aux_losses"][key]], [v for _, v in values])
            for key, values in ref.aux_losses.items()
        }
        print(f"\n{name} pp_rank {r['pp_rank']}: |Δ lm| {lm:.2e} |Δ valid| {valid:.2e} {aux}")
        assert set(r["aux_losses"]) == set(ref.aux_losses)
        assert {"dpsl_loss", "load_balancing_loss"} <= set(ref.aux_losses)
        # the same fp32 ops on the same values in the same order (p2p copies are exact): equal up
        # to a reordered sum of the layers' losses across stages (one ulp of ~5 is 5e-7)
        assert lm <= LOSS_ATOL and valid <= LOSS_ATOL
        assert max(aux.values()) <= LOSS_ATOL


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipelined_parameters_equal_one_stage(runs, name):
    ref_params = {n: p.detach() for n, p in runs["ref"].model.named_parameters()}
    stages = _stages(runs, name)
    seen, worst = set(), 0.0
    for r in stages:
        for key, value in r["params"].items():
            seen.add(key)
            worst = max(worst, (value - ref_params[key]).abs().max().item())
            torch.testing.assert_close(value, ref_params[key], rtol=0, atol=PARAM_ATOL, msg=key)
    print(f"\n{name}: max |Δ param| after {STEPS - 1} Adam steps {worst:.2e}")
    # every parameter of the model lives on one of the stages (the tied output layer twice)
    assert seen == set(ref_params)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipelined_routing_statistics_cover_every_layer(runs, name):
    ref = runs["ref"].routing_history[-1]
    mine = _stages(runs, name)[0]["routing_history"][-1]  # gathered on rank 0 from both stages
    assert len(mine["layers"]) == len(ref["layers"]) == 4
    for a, b in zip(mine["layers"], ref["layers"]):
        torch.testing.assert_close(a["load"], b["load"], rtol=0, atol=0)
        torch.testing.assert_close(a["prior_distance"], b["prior_distance"], rtol=0, atol=LOSS_ATOL)


@pytest.mark.parametrize("name", ["pp2_1f1b", "pp2_vpp2_interleaved"])
def test_pipelined_checkpoint_loads_under_one_stage(runs, name):
    """``model`` (1F1B) and ``model0``/``model1`` (interleaved) checkpoints load into one stage."""
    loaded = _train("--load", str(runs["tmp"] / name), "--train-iters", str(STEPS))
    assert loaded.iteration == STEPS and not loaded.train_losses  # resumed at the end: no step
    params = dict(loaded.model.named_parameters())
    for r in _stages(runs, name):
        for key, value in r["params"].items():
            assert torch.equal(value, params[key].detach()), key
    pipelined = _stages(runs, name)[0]["valid_losses"][-1][1]
    assert abs(loaded.valid_losses[-1][1] - pipelined) <= LOSS_ATOL
