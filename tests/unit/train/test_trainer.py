"""The embedded trainer (megatron_dpsl.train): flags, config, schedule, optimizer, checkpoints,
logging, data, and the multi-node torchrun path.

In-process tests run the real trainer in a one-rank gloo world (``pretrain`` creates it, or reuses
the suite's). The multi-node test launches two torchrun agents joined by the c10d rendezvous.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from support.common import REPO, WORKERS, child_env, free_port
from support.trainer_argv import GROUP_PRIORS, SMALL_MOE
from support.trainer_argv import TINY as TINY_ARGV

from megatron_dpsl.train.arguments import parse_args, validate_args

TINY = TINY_ARGV
# Megatron's aux loss and DPSL (modality priors from per-token group ids) together, list form
MOE = [
    *SMALL_MOE,
    "--moe-router-load-balancing-type",
    "aux_loss",
    "dpsl",
    "--moe-aux-loss-coeff",
    "0.01",
    "0.0",
    "--moe-dpsl-coeff",
    "0.1",
    *GROUP_PRIORS,
    "--moe-dpsl-log-interval",
    "1",
]


def _args(*extra, world_size=1):
    return validate_args(parse_args([*TINY, *extra]), world_size)


# ---------------------------------------------------------------------------------------------
# flags


def test_megatron_flag_names_parse_and_derive():
    args = validate_args(
        parse_args(
            [
                "--num-layers",
                "4",
                "--hidden-size",
                "64",
                "--ffn-hidden-size",
                "256",
                "--num-attention-heads",
                "8",
                "--seq-length",
                "128",
                "--max-position-embeddings",
                "256",
                "--num-experts",
                "8",
                "--moe-router-topk",
                "2",
                "--moe-ffn-hidden-size",
                "128",
                "--moe-router-load-balancing-type",
                "dpsl",
                "--moe-aux-loss-coeff",
                "0",
                "--moe-z-loss-coeff",
                "1e-3",
                "--moe-token-dispatcher-type",
                "allgather",
                "--tensor-model-parallel-size",
                "2",
                "--sequence-parallel",
                "--expert-model-parallel-size",
                "2",
                "--context-parallel-size",
                "1",
                "--lr",
                "1e-3",
                "--min-lr",
                "1e-4",
                "--lr-decay-style",
                "cosine",
                "--lr-warmup-iters",
                "10",
                "--train-iters",
                "100",
                "--micro-batch-size",
                "2",
                "--global-batch-size",
                "16",
                "--seed",
                "3",
                "--save",
                "/tmp/x",
                "--load",
                "/tmp/y",
                "--save-interval",
                "50",
                "--tensorboard-dir",
                "/tmp/tb",
                "--log-interval",
                "5",
                "--eval-interval",
                "20",
                "--eval-iters",
                "2",
                "--disable-bias-linear",
                "--moe-dpsl-alpha",
                "0.75",
                "--moe-dpsl-gather",
                "global_batch",
                "--mock-data",
                "--transformer-impl",
                "transformer_engine",
            ]
        ),
        world_size=8,
    )
    assert args.data_parallel_size == 4  # 8 ranks / TP 2
    assert args.num_microbatches == 2  # 16 / (2 x 4)
    assert args.padded_vocab_size == 256  # 256 rounded up to a multiple of 128 x TP 2
    assert args.expert_tensor_parallel_size == 1
    assert args.lr_decay_iters == 100
    assert args.moe_router_load_balancing_type == ["dpsl"]
    assert args.moe_dpsl_alpha == [0.75] and args.moe_dpsl_gather == "global_batch"


@pytest.mark.parametrize(
    "extra, world, flag",
    [
        (["--global-batch-size", "5"], 1, "--global-batch-size"),
        (
            ["--num-experts", "4", "--expert-model-parallel-size", "3"],
            3,
            "--expert-model-parallel-size",
        ),
        (["--num-experts", "4", "--moe-router-topk", "5"], 1, "--moe-router-topk"),
        (["--context-parallel-size", "2"], 2, "--context-parallel-size"),
        (["--pipeline-model-parallel-size", "2"], 3, "--pipeline-model-parallel-size"),
        (["--pipeline-model-parallel-size", "4"], 4, "--pipeline-model-parallel-size"),  # 2 layers
        (
            # 2 micro-batches per global batch: the interleaved schedule needs a multiple of PP 4
            ["--num-layers", "8", "--pipeline-model-parallel-size", "4"]
            + ["--num-layers-per-virtual-pipeline-stage", "1"],
            4,
            "--global-batch-size",
        ),
        (
            ["--llava", "--pipeline-model-parallel-size", "2"],
            2,
            "--llava trains on one pipeline stage",
        ),
        (["--tensor-model-parallel-size", "3"], 2, "--tensor-model-parallel-size"),
        (["--num-attention-heads", "5"], 1, "--num-attention-heads"),
        (["--seq-length", "64", "--max-position-embeddings", "32"], 1, "--seq-length"),
        (["--tensor-model-parallel-size", "2", "--num-experts", "4"], 2, "--sequence-parallel"),
        pytest.param(
            ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
            2,
            "--sequence-parallel",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("apex") is not None, reason="apex norm supports SP"
            ),
        ),
        (["--expert-model-parallel-size", "2"], 2, "--expert-model-parallel-size"),
        (["--min-lr", "1"], 1, "--min-lr"),
    ],
)
def test_bad_flags_name_the_flag(extra, world, flag):
    with pytest.raises(ValueError, match=flag):
        _args(*extra, world_size=world)


def test_moe_needs_disable_bias_linear():
    argv = [a for a in TINY if a != "--disable-bias-linear"]
    with pytest.raises(ValueError, match="--disable-bias-linear"):
        validate_args(parse_args([*argv, "--num-experts", "4"]), 1)


def test_missing_data_names_flag():
    argv = [a for a in TINY if a != "--mock-data"]
    with pytest.raises(ValueError, match="--data-path"):
        validate_args(parse_args(argv), 1)


# ---------------------------------------------------------------------------------------------
# model, schedule, optimizer (one-rank world)


def _setup(argv):
    """args, config, model for ``argv`` after Megatron's model-parallel init in a one-rank world."""
    from megatron.core import parallel_state

    from megatron_dpsl.train.model import build_model, config_from_args
    from megatron_dpsl.train.trainer import _set_random_seed, initialize_distributed

    args = parse_args(argv)
    initialize_distributed(args)  # --device cpu: gloo + cpu_platform
    validate_args(args, 1)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel()
    _set_random_seed(args.seed)
    config = config_from_args(args, use_cpu_initialization=True)
    return args, config, build_model(args, config)


def test_config_by_field_name_and_dpsl_spec():
    from megatron_dpsl.routing.router import DPSLRouter

    args, config, model = _setup([*TINY, *MOE, "--moe-z-loss-coeff", "1e-3"])
    assert type(config).__name__ == "DPSLTransformerConfig"
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (2, 32, 64)
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (
        4,
        2,
        32,
    )
    assert config.moe_z_loss_coeff == 1e-3 and config.moe_dpsl_coeff == 0.1
    assert (
        config.moe_dpsl_alpha_base,
        config.moe_dpsl_alpha_shift,
        config.moe_dpsl_num_groups,
    ) == (0.75, 0.5, 2)
    assert config.add_bias_linear is False
    routers = [m for m in model.modules() if isinstance(m, DPSLRouter)]
    assert len(routers) == 2 and all(r.dpsl_enabled for r in routers)


@pytest.mark.parametrize("ac", [False, True], ids=["dpsl_router", "ac_router"])
def test_routing_stats_hook_records_what_the_routers_saw(ac):
    """The recorded probabilities are those of the logits routing() got: for the AC router (layer 2)
    they come from AC gating, which needs the previous layer's assignment and differs from plain
    gating."""
    from megatron_dpsl.parallel.token_groups import dpsl_token_groups
    from megatron_dpsl.tracking.routing_stats import RoutingStats

    args, config, model = _setup([*TINY, *MOE, *(["--moe-ac-layers", "2"] if ac else [])])
    stats = RoutingStats(model)
    # reference: each router's logits and routing_map, captured at routing() on the instance
    seen = {}
    for index, router in enumerate(stats.routers):

        def spy(logits, *a, _routing=router.routing, _index=index, **k):
            probs, routing_map = _routing(logits, *a, **k)
            seen.setdefault(_index, []).append(
                (torch.softmax(logits.reshape(-1, 4).float(), -1), routing_map)
            )
            return probs, routing_map

        router.routing = spy
    batch = next(_sampler(args).iterator(0))

    def forward():
        with torch.no_grad(), dpsl_token_groups(batch["group_ids"]):
            model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

    model.eval()
    forward()
    assert stats._local() == {}  # disabled: nothing recorded
    stats.enabled = True
    forward()
    local = stats._local()
    assert sorted(local) == [1, 2]  # keyed by the routers' (global) layer numbers
    for index, layer in enumerate(local[n] for n in sorted(local)):
        probs, routing_map = seen[index][-1]
        assert torch.equal(layer["probs"], probs) and torch.equal(layer["routing_map"], routing_map)
        # group ids follow the router's s-major flattening of [s, b]
        assert torch.equal(layer["group_ids"], batch["group_ids"].t().reshape(-1))
    stats.remove()
    forward()
    assert [len(stats._records[i]) for i in range(2)] == [1, 1]  # the hooks are gone
    if ac:  # the check can fail: the AC layer's logits are not plain gating's of its input
        from megatron_dpsl.routing.router import DPSLRouter

        router = stats.routers[1]
        assert router.ac_enabled
        hidden = {}
        handle = router.register_forward_pre_hook(
            lambda module, args: hidden.setdefault("input", args[0])
        )
        forward()
        handle.remove()
        plain = torch.softmax(
            DPSLRouter.gating(router, hidden["input"]).reshape(-1, 4).float(), -1
        )  # no AC
        assert not torch.allclose(plain, seen[1][-1][0])


def _twin(args, config, model):
    """A second model with the same initial weights (deepcopy cannot copy process groups)."""
    from megatron_dpsl.train.model import build_model
    from megatron_dpsl.train.trainer import _set_random_seed

    _set_random_seed(args.seed)
    twin = build_model(args, config)
    twin.load_state_dict(model.state_dict())
    return twin


def _ddp(config, model):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp


def _sampler(args):
    from megatron_dpsl.train.data import BatchSampler, ByteCorpus

    return BatchSampler(
        ByteCorpus.mock(1 << 14, args.seed),
        "train",
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        dp_rank=0,
        dp_size=1,
        seed=args.seed,
        device="cpu",
    )


def test_cpu_schedule_equals_full_batch_backward_dense():
    """Two micro-batches accumulated by the CPU schedule + DDP == one backward on the whole
    batch."""
    from megatron_dpsl.train.schedule import (
        forward_backward_no_pipelining,
        loss_func,
        make_forward_step,
    )

    args, config, model = _setup([*TINY, "--global-batch-size", "4"])  # 2 micro-batches of 2
    reference = _twin(args, config, model)
    ddp = _ddp(config, model)
    sampler = _sampler(args)
    ddp.zero_grad_buffer()
    forward_backward_no_pipelining(
        forward_step_func=make_forward_step(lambda g: __import__("contextlib").nullcontext()),
        data_iterator=sampler.iterator(0),
        model=[ddp],
        num_microbatches=2,
    )
    mbs = [sampler.micro_batch(0, m) for m in range(2)]
    cat = {k: torch.cat([b[k] for b in mbs]) for k in ("tokens", "labels", "loss_mask")}
    pos = torch.arange(args.seq_length).unsqueeze(0).expand(4, -1)
    out = reference(cat["tokens"], pos, mbs[0]["attention_mask"], labels=cat["labels"])
    loss_func(cat["loss_mask"], out)[0].backward()
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        # mean of two equal halves == mean of the whole: only fp32 summation order differs
        torch.testing.assert_close(p.main_grad, ref[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_cpu_schedule_sets_aux_loss_scale_and_accumulates_router_losses():
    """MoE (aux loss + DPSL): the schedule's grads == plain autograd accumulation with the aux-loss
    scale 1/num_microbatches, and MoEAuxLossAutoScaler's scale is left at 1/num_microbatches."""
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    from megatron_dpsl.parallel.token_groups import dpsl_token_groups
    from megatron_dpsl.train.schedule import (
        forward_backward_no_pipelining,
        loss_func,
        make_forward_step,
    )

    args, config, model = _setup(
        [*TINY, *MOE, "--global-batch-size", "6", "--micro-batch-size", "2"]
    )  # 3 micro-batches
    reference = _twin(args, config, model)
    ddp = _ddp(config, model)
    sampler = _sampler(args)
    ddp.zero_grad_buffer()
    # a backward run earlier in this process without a scale set (e.g. a module-scoped fixture)
    # leaves Megatron's lazy 0-dim default, into which the [1] scale below cannot be copied
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    forward_backward_no_pipelining(
        forward_step_func=make_forward_step(dpsl_token_groups),
        data_iterator=sampler.iterator(0),
        model=[ddp],
        num_microbatches=3,
    )
    assert float(MoEAuxLossAutoScaler.main_loss_backward_scale) == pytest.approx(1 / 3)

    for m in range(3):
        b = sampler.micro_batch(0, m)
        with dpsl_token_groups(b["group_ids"]):
            out = reference(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / 3)
        (loss_func(b["loss_mask"], out)[0] / 3).backward()
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        # same micro-batches, same order; DDP's fp32 grad buffer vs autograd's .grad accumulation
        torch.testing.assert_close(p.main_grad, ref[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    router = dict(model.named_parameters())["decoder.layers.0.mlp.router.weight"]
    assert router.main_grad.abs().sum() > 0


def test_torch_adamw_param_groups_and_grad_norm():
    from megatron_dpsl.train.optimizer import TorchAdamW

    args, config, model = _setup([*TINY, "--weight-decay", "0.1", "--clip-grad", "1e-3"])
    opt = TorchAdamW([model], args)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            no_wd = names[id(p)].endswith(".bias") or p.dim() == 1
            assert group["wd_mult"] == (0.0 if no_wd else 1.0), names[id(p)]
    torch.manual_seed(0)
    for p in model.parameters():
        p.main_grad = torch.randn_like(p)
    expected = torch.sqrt(sum((p.main_grad.double() ** 2).sum() for p in model.parameters())).item()
    grad_before = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, norm, _ = opt.step()
    # float32 sum of squares vs float64: ~1e-6 relative
    assert norm == pytest.approx(expected, rel=1e-5)
    for n, p in model.named_parameters():
        # clipped to --clip-grad 1e-3, as Megatron's clip_grad_by_total_norm_fp32 scales
        torch.testing.assert_close(
            p.grad, grad_before[n] * (1e-3 / (norm + 1e-6)), rtol=1e-5, atol=0, msg=n
        )
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# end to end: logging, checkpoints (Megatron-LM layout), exact resumption, finetune loading


def _train(tmp, *extra):
    from megatron_dpsl.train.trainer import pretrain

    return pretrain(parse_args([*TINY, *MOE, *extra]))


def test_train_log_tensorboard_checkpoint_resume(tmp_path, capsys):
    from megatron.core import dist_checkpointing

    save = str(tmp_path / "ckpt")
    tb = str(tmp_path / "tb")
    sched = [
        "--lr-decay-iters",
        "6",
        "--lr-warmup-iters",
        "1",
    ]  # one schedule for the 3- and 6-iteration runs
    straight = _train(
        tmp_path, *sched, "--train-iters", "6", "--tensorboard-dir", tb, "--eval-interval", "3"
    )
    log = capsys.readouterr().out
    assert "iteration        6/       6" in log and "lm loss:" in log
    assert "dpsl_loss:" in log and "load_balancing_loss:" in log
    assert "validation loss at iteration 3" in log
    assert all(math.isfinite(x) for x in straight.train_losses)
    assert {"dpsl_loss", "load_balancing_loss"} <= set(straight.aux_losses)
    assert all(v > 0 and math.isfinite(v) for _, v in straight.aux_losses["dpsl_loss"])
    assert len(straight.routing_history) == 2 and math.isfinite(straight.routing_history[-1]["cov"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "lm loss",
        "dpsl_loss",
        "load_balancing_loss",
        "learning-rate",
        "lm loss validation",
        "routing/cov",
    } <= tags

    first = _train(tmp_path, *sched, "--train-iters", "3", "--save", save)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "3"
    step_dir = os.path.join(save, "iter_0000003")
    common = dist_checkpointing.load_common_state_dict(step_dir)
    assert {"args", "iteration", "checkpoint_version", "optimizer", "opt_param_scheduler"} <= set(
        common
    )
    assert common["iteration"] == 3 and common["checkpoint_version"] == 3.0
    assert common["args"].num_experts == 4 and common["args"].hidden_size == 32
    keys = set(dist_checkpointing.load_tensors_metadata(step_dir))
    assert "decoder.layers.mlp.router.weight" in keys  # layers stacked, as Megatron shards them
    assert any(k.startswith("optimizer.state.exp_avg.") for k in keys)

    resumed = _train(tmp_path, *sched, "--train-iters", "6", "--load", save)
    assert resumed.iteration == 6 and len(resumed.train_losses) == 3
    # same data, same ops in the same order on CPU, optimizer + scheduler restored: equal up to
    # fp32 reassociation-free determinism (observed bitwise; 1e-6 leaves room for BLAS threading)
    np.testing.assert_allclose(resumed.train_losses, straight.train_losses[3:], rtol=1e-6)
    np.testing.assert_allclose(first.train_losses, straight.train_losses[:3], rtol=1e-6)

    finetuned = _train(tmp_path, "--train-iters", "2", "--load", save, "--finetune")
    assert finetuned.iteration == 2 and len(finetuned.train_losses) == 2  # restarted at 0


def test_resume_with_another_schedule_names_the_flag(tmp_path):
    """Megatron-LM's rule: a resume whose learning-rate schedule differs from the checkpoint's is
    refused unless a flag says which wins (megatron-core's default kept the checkpoint's
    silently: one step saved with --train-iters 1, resumed with 3, trained at lr 0)."""
    save = str(tmp_path / "ckpt")
    _train(tmp_path, "--train-iters", "1", "--save", save)
    with pytest.raises(ValueError, match="--lr-decay-iters") as err:
        _train(tmp_path, "--train-iters", "3", "--load", save)
    assert "--override-opt_param-scheduler" in str(err.value)
    loaded = _train(tmp_path, "--train-iters", "1", "--load", save)  # resumes at its end: no step
    ours = _train(tmp_path, "--train-iters", "3", "--load", save, "--override-opt_param-scheduler")
    theirs = _train(
        tmp_path, "--train-iters", "3", "--load", save, "--use-checkpoint-opt_param-scheduler"
    )
    assert len(loaded.train_losses) == 0
    assert len(ours.train_losses) == len(theirs.train_losses) == 2

    def params(result):
        return [p.detach() for p in result.model.parameters()]

    # this run's schedule (linear decay over 3 iterations: lr 1e-2 x 2/3, then x 1/3) trains; the
    # checkpoint's (decay over 1 iteration) is at lr 0 from iteration 1 on: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(params(theirs), params(loaded), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(params(ours), params(loaded), strict=True))


def test_load_rejects_mismatched_model_flags(tmp_path):
    save = str(tmp_path / "ckpt")
    _train(tmp_path, "--train-iters", "1", "--save", save)
    with pytest.raises(ValueError, match="--hidden-size"):
        _train(tmp_path, "--train-iters", "1", "--load", save, "--hidden-size", "64")


# ---------------------------------------------------------------------------------------------
# data


def test_corpus_two_modalities_deterministic(tmp_path):
    from megatron_dpsl.train.corpus import EOD, build_corpus

    meta = build_corpus(str(tmp_path / "a"), bytes_per_group=30_000, seed=5)
    build_corpus(str(tmp_path / "b"), bytes_per_group=30_000, seed=5)
    for split in ("train", "valid"):
        a = np.fromfile(tmp_path / "a" / f"{split}_tokens.bin", dtype=np.uint8)
        b = np.fromfile(tmp_path / "b" / f"{split}_tokens.bin", dtype=np.uint8)
        g = np.fromfile(tmp_path / "a" / f"{split}_groups.bin", dtype=np.uint8)
        np.testing.assert_array_equal(a, b)
        assert a.shape == g.shape and set(np.unique(g)) == {0, 1}
        assert all(n > 0 for n in meta["splits"][split]["tokens_per_group"])
        # group ids change only right after a document separator
        change = np.nonzero(np.diff(g.astype(int)))[0]
        assert np.all(a[change] == EOD)


def test_data_parallel_ranks_split_the_global_batch():
    """DP ranks' micro-batches are disjoint runs of the samples one rank would see with dp=1."""
    from megatron_dpsl.train.data import BatchSampler, ByteCorpus

    corpus = ByteCorpus.mock(1 << 14, 0)
    kw = dict(seq_length=16, seed=3, device="cpu", global_batch_size=8)
    one = BatchSampler(corpus, "train", micro_batch_size=4, dp_rank=0, dp_size=1, **kw)
    two = [
        BatchSampler(corpus, "train", micro_batch_size=2, dp_rank=r, dp_size=2, **kw)
        for r in range(2)
    ]
    for it in range(2):
        full = torch.cat([one.micro_batch(it, m)["tokens"] for m in range(2)])
        split = torch.cat([two[r].micro_batch(it, m)["tokens"] for m in range(2) for r in range(2)])
        torch.testing.assert_close(split, full)
        b = one.micro_batch(it, 0)
        torch.testing.assert_close(b["labels"][:, :-1], b["tokens"][:, 1:])


# ---------------------------------------------------------------------------------------------
# multi-node: two torchrun agents (1 process each) joined by the c10d rendezvous on 127.0.0.1


def _phases(ckpt: str) -> dict:
    """phase "dp": DPSL with modality priors, experts replicated (EP 1, DP 2), saved to ``ckpt``;
    phase "ep": Megatron's aux loss + z-loss, experts split over the two nodes (EP 2), starting from
    ``ckpt`` (saved under EP 1: resharded on load; also gives the reference the same initial
        weights)."""
    return {
        "dp": [*TINY, *MOE, "--train-iters", "3", "--save", ckpt],
        "ep": [
            *TINY,
            "--num-experts",
            "4",
            "--moe-router-topk",
            "2",
            "--moe-ffn-hidden-size",
            "32",
            "--moe-aux-loss-coeff",
            "0.01",
            "--moe-z-loss-coeff",
            "0.001",
            "--expert-model-parallel-size",
            "2",
            "--train-iters",
            "3",
            "--load",
            ckpt,
            "--finetune",
        ],
    }


def _global_expert_name(name: str, ep_rank: int, local_experts: int) -> str:
    """``...local_experts.{i}...`` on EP rank r is expert ``r * local_experts + i`` of the unsharded
    model."""
    parts = name.split(".")
    if "local_experts" in parts:
        k = parts.index("local_experts") + 1
        parts[k] = str(ep_rank * local_experts + int(parts[k]))
    return ".".join(parts)


@pytest.mark.slow  # two torchrun agents, two phases, plus the one-process references: ~35 s
@pytest.mark.distributed
def test_multinode_c10d_two_agents_train_and_agree(tmp_path):
    port = free_port()
    env = child_env(PYTHONWARNINGS="ignore")
    phases = _phases(str(tmp_path / "ckpt_dp"))
    phases_path = tmp_path / "phases.json"
    phases_path.write_text(json.dumps(phases))
    worker = str(WORKERS / "trainer_phases_worker.py")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "trainer-multinode-test",
                worker,
                str(tmp_path),
                str(phases_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    from megatron_dpsl.train.trainer import pretrain

    for phase, argv in phases.items():
        ranks = [torch.load(tmp_path / f"{phase}_rank{r}.pt", weights_only=False) for r in range(2)]
        assert sorted(r["rank"] for r in ranks) == [0, 1] and all(
            r["world_size"] == 2 for r in ranks
        )
        a, b = ranks
        assert len(a["train_losses"]) == 3 and all(math.isfinite(x) for x in a["train_losses"]), (
            phase
        )
        assert a["train_losses"] == b["train_losses"], (
            phase
        )  # the DP-averaged loss is one number everywhere
        if phase == "dp":
            assert "dpsl_loss" in a["aux_losses"]
            for name in a["params"]:
                # data-parallel replicas after identical all-reduced updates: bitwise equal
                assert torch.equal(a["params"][name], b["params"][name]), name
        else:
            assert {"load_balancing_loss", "z_loss"} <= set(a["aux_losses"])
            assert sorted(r["ep_rank"] for r in ranks) == [0, 1]
            for name in a["params"]:
                if (
                    "local_experts" not in name
                ):  # the non-expert part is replicated over the 2 nodes
                    assert torch.equal(a["params"][name], b["params"][name]), name

        # one process over the same global batches (2 micro-batches instead of 2 DP ranks, all
        # experts)
        ref_argv = list(argv)
        for flag in (
            "--expert-model-parallel-size",
            "--save",
        ):  # one process; keep the agents' checkpoint
            if flag in ref_argv:
                i = ref_argv.index(flag)
                del ref_argv[i : i + 2]
        ref = pretrain(parse_args(ref_argv))
        ref_params = {n: p.detach() for n, p in ref.model.named_parameters()}
        # DP mean of per-rank means vs mean over accumulated micro-batches: fp32 reassociation only
        np.testing.assert_allclose(a["train_losses"], ref.train_losses, rtol=1e-5, err_msg=phase)
        for r in ranks:
            for name, p in r["params"].items():
                # three Adam steps (lr 1e-2) from the same grads up to fp32 reassociation. Adam
                # divides each element by sqrt(v): for a rarely routed expert whose gradient is near
                # zero, reassociated sums move m/sqrt(v) by ~1e-3 of a step; measured 1.2e-5 on such
                # an expert's fc2 (params ~0.07; the pre-wave code gives the same with today's
                # packages), so 5e-5 absolute; a wrong expert mapping is off by ~1e-2
                torch.testing.assert_close(
                    p,
                    ref_params[_global_expert_name(name, r["ep_rank"], 2)],
                    rtol=0,
                    atol=5e-5,
                    msg=f"{phase} {name}",
                )


# ---------------------------------------------------------------------------------------------
# GPU: Megatron's own optimizer and schedule (skipped without CUDA)


@pytest.mark.gpu
def test_gpu_path_uses_megatron_optimizer_and_schedule(tmp_path):
    """``--device cuda`` on one GPU: NCCL, get_megatron_optimizer, get_forward_backward_func,
    save/resume."""
    env = child_env(PYTHONWARNINGS="ignore")
    argv = [a for a in [*TINY, *MOE] if a not in ("--device", "cpu")] + [
        "--device",
        "cuda",
        "--lr-decay-iters",
        "4",
        "--save",
        str(tmp_path / "ckpt"),
        "--tensorboard-dir",
        str(tmp_path / "tb"),
    ]
    runs = []
    for iters in ("2", "4"):
        load = ["--load", str(tmp_path / "ckpt")] if iters == "4" else []
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "megatron_dpsl.train.trainer",
                *argv,
                "--train-iters",
                iters,
                *load,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-4000:]
        runs.append(proc.stdout)
    assert "optimizer megatron | schedule megatron" in runs[0] and "(nccl, cuda)" in runs[0]
    assert "dpsl_loss:" in runs[0] and "load_balancing_loss:" in runs[0]
    assert "resuming at iteration 2" in runs[1] and "iteration        4/       4" in runs[1]
