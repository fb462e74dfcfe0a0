"""torchrun worker: group priors under Megatron's pipeline schedules vs one stage (forward loss and
every gradient).

Launched by tests/distributed/test_token_groups_pipeline.py; by hand:

    PYTHONPATH=.:tests python -m torch.distributed.run --nproc-per-node 2 --master-port 29621 \
        tests/support/workers/pipeline_token_groups_worker.py --out /tmp/pp_groups.json

Every rank first builds the whole ``GPTModel`` (the plugin's decoder spec, group priors) under one
pipeline stage and runs the reference: micro-batch after micro-batch, each forward inside
``dpsl_token_groups(ids)``, the loss scaled as Megatron's schedule scales it. Then, for every
layout, Megatron's state is rebuilt with two pipeline stages (and two virtual chunks per stage), the
stage's model chunks get the reference's weights (layer by layer number), and Megatron's own
schedule (``get_forward_backward_func()``: 1F1B, or interleaved with virtual chunks) runs the
embedded trainer's ``forward_step`` (``megatron_dpsl.train.schedule.make_forward_step``): every
stage reads its micro-batch from its own data iterator, the group ids included, exactly as
Megatron-LM's stages do with the patched ``pretrain_gpt.py``. Replaced leaf: the schedules' token
counter ``torch.zeros([], device="cuda")`` is made on the CPU (the only CUDA-only call on this path
besides those of tests/support/megatron_cpu.py).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist

from support.megatron_cpu import install_recompute_shims
from support.workers import _exactness as exactness

S, B, V, H = 8, 2, 32, 16  # sequence, micro-batch, vocabulary, hidden
NUM_LAYERS, NUM_MICROBATCHES = 4, 4
ALPHAS = [[2.0, 2.0, 0.5, 0.5], [0.5, 0.5, 2.0, 2.0]]

FULL = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
CASES = {
    2: [
        dict(name="pp2_1f1b", vpp=None),
        dict(name="pp2_vpp2_interleaved", vpp=2),
        dict(name="pp2_1f1b_full_recompute", vpp=None, recompute=FULL),
        dict(
            name="pp2_vpp2_selective_moe_recompute",
            vpp=2,
            recompute=dict(recompute_granularity="selective", recompute_modules=["moe"]),
        ),
    ]
}


class _TorchOnCPU(types.ModuleType):
    """``torch`` for the schedules module, with ``zeros(device="cuda")`` made on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    def zeros(self, *args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def _setup() -> None:
    from megatron.core.pipeline_parallel import schedules

    install_recompute_shims()
    schedules.torch = _TorchOnCPU()


def _config(pp=1, vpp=None, **over):
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    kw = dict(
        num_layers=NUM_LAYERS,
        hidden_size=H,
        ffn_hidden_size=8,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_router_load_balancing_type="dpsl",
        moe_aux_loss_coeff=0.0,
        moe_dpsl_coeff=1.0,
        moe_dpsl_log_interval=0,
        moe_dpsl_group_alphas=ALPHAS,
        moe_token_dispatcher_type="allgather",
        use_cpu_initialization=True,
        add_bias_linear=False,
        # spread-out routing probabilities: a DPSL gradient well above rounding
        init_method_std=0.5,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=torch.float32,
        batch_p2p_comm=False,  # isend/irecv pairs (gloo has no batched p2p)
    )
    kw.update(over)
    return DPSLTransformerConfig(**kw)


def _gpt(cfg, pre=True, post=True, **vp):
    from megatron.core.models.gpt import GPTModel

    from megatron_dpsl.models.specs import get_dpsl_decoder_block_spec

    return GPTModel(
        config=cfg,
        transformer_layer_spec=get_dpsl_decoder_block_spec(cfg, **vp),
        vocab_size=V,
        max_sequence_length=S,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=False,  # no embedding-group all-reduce to reproduce
        **vp,
    )


def _micro_batches():
    """The global batch, the same on every rank and stage: Megatron-LM's micro-batch dicts plus
    ``group_ids``."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, V, (B, S + 1), generator=gen)
        out.append(
            dict(
                tokens=tokens[:, :-1],
                labels=tokens[:, 1:],
                position_ids=torch.arange(S).unsqueeze(0).expand(B, S),
                attention_mask=torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), 1),
                loss_mask=torch.ones(B, S),
                group_ids=torch.randint(0, 2, (B, S), generator=gen),
            )
        )
    return out


def _forward_step():
    from megatron_dpsl.parallel.token_groups import dpsl_token_groups
    from megatron_dpsl.train.schedule import make_forward_step

    return make_forward_step(dpsl_token_groups)


def _dpsl_logged():
    from support.common import moe_tracked, reset_moe_tracker

    values = moe_tracked("dpsl_loss")
    reset_moe_tracker()
    return values


def _reference():
    """Losses, DPSL per layer and gradients of the whole model, one micro-batch after the other."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from support.common import reset_moe_tracker

    reset_moe_tracker()
    torch.manual_seed(0)
    model = _gpt(_config())
    step = _forward_step()
    batches = iter(_micro_batches())
    losses = []
    # as Megatron's forward_step: loss / num_microbatches, the aux losses' backward scaled alike
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / NUM_MICROBATCHES)
    for _ in range(NUM_MICROBATCHES):
        output, loss_fn = step(batches, model)
        loss, reported = loss_fn(output)
        losses.append(reported["lm loss"].item())
        (loss / NUM_MICROBATCHES).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return dict(model=model, losses=losses, grads=grads, dpsl=_dpsl_logged())


def _reference_name(chunk, name: str) -> str:
    """The whole model's name of ``chunk``'s parameter ``name`` (layers by their global number)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _stage_chunks(case, ref_model):
    from megatron.core import parallel_state

    vpp = case["vpp"]
    cfg = _config(pp=2, vpp=vpp, **case.get("recompute", {}))
    chunks = []
    for v in range(vpp or 1):
        vp = {} if vpp is None else {"vp_stage": v}
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=vpp is None, **vp)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=vpp is None, **vp)
        chunk = _gpt(cfg, pre=first, post=last, **vp)
        reference = dict(ref_model.named_parameters())
        with torch.no_grad():
            for name, p in chunk.named_parameters():
                p.copy_(reference[_reference_name(chunk, name)])
        chunks.append(chunk)
    return cfg, chunks


def run_case(case, _singleton_pg):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ref = REFERENCE
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=case["vpp"]
    )
    try:
        cfg, chunks = _stage_chunks(case, ref["model"])
        _dpsl_logged()  # empty tracker
        iterators = [iter(_micro_batches()) for _ in chunks]  # each chunk reads its own stream
        vpp = case["vpp"]
        store = get_forward_backward_func()(
            forward_step_func=_forward_step(),
            data_iterator=iterators if vpp else iterators[0],
            model=chunks if vpp else chunks[0],
            num_microbatches=NUM_MICROBATCHES,
            seq_length=S,
            micro_batch_size=B,
            forward_only=False,
        )
        dpsl = _dpsl_logged()
        grad_diff, ref_max, compared = 0.0, 0.0, 0
        own_layers = set()
        for chunk in chunks:
            own_layers.update(layer.layer_number for layer in chunk.decoder.layers)
            for name, p in chunk.named_parameters():
                ref_grad = ref["grads"][_reference_name(chunk, name)]
                assert p.grad is not None, f"{name} got no gradient"
                grad_diff = max(grad_diff, (p.grad - ref_grad).abs().max().item())
                ref_max = max(ref_max, ref_grad.abs().max().item())
                compared += 1
        layers = sorted(own_layers)
        dpsl_diff = max(abs(dpsl[n - 1].item() - ref["dpsl"][n - 1].item()) for n in layers)
        losses = [r["lm loss"].item() for r in store]  # the last stage's, one per micro-batch
        loss_diff = max(abs(a - b) for a, b in zip(losses, ref["losses"])) if losses else 0.0
        stats = torch.tensor([grad_diff, loss_diff, dpsl_diff, ref_max])
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        counts = torch.tensor([float(compared), float(len(losses)), float(len(layers))])
        dist.all_reduce(counts)
        return dict(
            name=case["name"],
            world=dist.get_world_size(),
            max_grad_diff=stats[0].item(),
            max_loss_diff=stats[1].item(),
            max_dpsl_diff=stats[2].item(),
            ref_grad_max=stats[3].item(),
            params_compared=int(counts[0].item()),
            params_total=len(ref["grads"]),
            losses_compared=int(counts[1].item()),
            layers_compared=int(counts[2].item()),
            ref_dpsl_min=min(v.item() for v in ref["dpsl"]),
        )
    finally:
        parallel_state.destroy_model_parallel()


REFERENCE: dict = {}


def _setup_and_reference() -> None:
    _setup()
    REFERENCE.update(_reference())


if __name__ == "__main__":
    exactness.main(__doc__, CASES, run_case, setup=_setup_and_reference)
