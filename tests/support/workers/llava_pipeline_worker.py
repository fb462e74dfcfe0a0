"""torchrun worker: an MoE ``LLaVAModel`` with modality priors under Megatron's 1F1B pipeline
schedule vs one stage (LM loss, per-layer DPSL loss, every gradient).

Launched by tests/distributed/test_llava_pipeline.py; by hand:

    PYTHONPATH=.:tests python -m torch.distributed.run --nproc-per-node 2 \
        tests/support/workers/llava_pipeline_worker.py --out /tmp/llava_pp.json

Every rank first builds the whole model (``build_llava_model``, one stage) and runs the reference:
micro-batch after micro-batch through the same ``forward_step``. Then Megatron's state is rebuilt
with two pipeline stages; stage 0 holds the ViT, the projector, the embeddings and language layer
1, stage 1 language layer 2 and the output layer (``pre_process``/``post_process``/``add_encoder``
as Megatron-LM's ``pretrain_vlm.py`` sets them), each copied from the reference. Megatron's own
schedule (``get_forward_backward_func()``, 1F1B, several micro-batches in flight) runs a
``forward_step`` that passes every stage its micro-batch's images, ``input_ids`` and tiles, as
``pretrain_vlm.py``'s ``get_batch`` broadcasts them: the modality hook computes the ids on each
stage (padded to ``language_max_sequence_length``, as ``LLaVAModel`` pads under pipeline
parallelism) and they travel with the micro-batch under recompute. No code of the test sets ids.
Replaced leaf: the schedules' ``torch.zeros(device="cuda")`` is made on the CPU
(pipeline_token_groups_worker._setup), besides tests/support/megatron_cpu.py.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from support.megatron_cpu import llava_construction
from support.workers import _exactness as exactness
from support.workers.pipeline_token_groups_worker import _setup

IMG, IMG_SIZE, PATCH = -200, 16, 8  # 4 image rows per tile (class token dropped)
V, H, S_MAX, B = 48, 16, 24, 2  # vocabulary, LM hidden, language max length, micro-batch
NUM_MICROBATCHES = 3
FULL = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
CASES = {
    2: [
        dict(name="pp2_1f1b"),
        dict(name="pp2_1f1b_full_recompute", recompute=FULL),
    ]
}


def _lm_config(pp=1, **over):
    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig

    return DPSLTransformerConfig(
        num_layers=2,
        hidden_size=H,
        ffn_hidden_size=32,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_router_load_balancing_type="dpsl",
        moe_aux_loss_coeff=0.0,
        moe_dpsl_coeff=1.0,
        moe_dpsl_log_interval=0,
        moe_dpsl_alpha_base=0.75,
        moe_dpsl_alpha_shift=1.5,
        moe_dpsl_num_groups=2,
        moe_token_dispatcher_type="allgather",
        use_cpu_initialization=True,
        add_bias_linear=False,
        init_method_std=0.5,  # spread-out routing: a DPSL gradient well above rounding
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        batch_p2p_comm=False,  # isend/irecv pairs (gloo has no batched p2p)
        **over,
    )


def _llava(lm, first=True, last=True):
    from megatron_dpsl.models.vlm import build_llava_model, clip_vision_config

    vision = clip_vision_config(
        lm, hf_num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16
    )
    with llava_construction():
        return build_llava_model(
            lm,
            vision,
            vocab_size=V,
            max_sequence_length=S_MAX,
            img_h=IMG_SIZE,
            img_w=IMG_SIZE,
            patch_dim=PATCH,
            language_position_embedding_type="rope",
            pre_process=first,
            post_process=last,
            add_encoder=first,
        )


def _micro_batches():
    """Uneven images (2 tiles mid-row, text only, one image first, none), the same on every rank."""
    gen = torch.Generator().manual_seed(5)
    rows = [
        ([7, IMG, 8, 9, 10, 11], [[2], []]),
        ([IMG, 12, 13, 14, 15, 16], [[1], [1]]),
        ([17, 18, IMG, 19, 20, 21], [[1], [2]]),
    ]
    out = []
    for first_row, tiles in rows:
        second = torch.randint(1, V, (6,), generator=gen).tolist()
        if tiles[1]:
            second[3] = IMG
        input_ids = torch.tensor([first_row, second])
        num_tiles = torch.tensor(tiles[0] + tiles[1], dtype=torch.int)
        out.append(
            dict(
                images=torch.randn(int(num_tiles.sum()), 3, IMG_SIZE, IMG_SIZE, generator=gen),
                input_ids=input_ids,
                num_image_tiles=num_tiles,
                labels=torch.randint(1, V, input_ids.shape, generator=gen),
                loss_mask=torch.ones(input_ids.shape),
            )
        )
    return out


def _loss(loss_mask, output):
    loss = (output.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides loss in place


def _forward_step(data_iterator, model):
    """``pretrain_vlm.py``'s forward_step: every stage gets its micro-batch (no ids passed)."""
    batch = next(data_iterator)
    pp = model.language_model.config.pipeline_model_parallel_size > 1
    length = S_MAX if pp else _combined_length(model, batch)
    mask = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), 1)
    output, loss_mask = model(
        batch["images"],
        batch["input_ids"],
        None,
        mask,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
        num_image_tiles=batch["num_image_tiles"],
    )
    return output, functools.partial(_loss, loss_mask)


def _combined_length(model, batch) -> int:
    """The combined length one stage sees: text tokens plus each image's rows minus its token."""
    ids = batch["input_ids"]
    images = (ids == IMG).sum(-1)
    rows = torch.zeros(ids.shape[0], dtype=torch.long)
    rows.index_add_(0, torch.where(ids == IMG)[0], batch["num_image_tiles"].long())
    return int((ids.shape[1] + rows * model.img_seq_len - images).max())


def _dpsl_logged():
    from support.common import moe_tracked, reset_moe_tracker

    values = moe_tracked("dpsl_loss")
    reset_moe_tracker()
    return values


def _reference():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from support.common import reset_moe_tracker

    reset_moe_tracker()
    torch.manual_seed(0)
    model = _llava(_lm_config())
    batches = iter(_micro_batches())
    losses = []
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / NUM_MICROBATCHES)
    for _ in range(NUM_MICROBATCHES):
        output, loss_fn = _forward_step(batches, model)
        loss, reported = loss_fn(output)
        losses.append(reported["lm loss"].item())
        (loss / NUM_MICROBATCHES).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return dict(model=model, losses=losses, grads=grads, dpsl=_dpsl_logged())


def _reference_name(stage, name: str) -> str:
    """The whole model's name of the stage's parameter ``name`` (layers by their global number)."""
    parts = name.split(".")
    if parts[:3] == ["language_model", "decoder", "layers"]:
        parts[3] = str(stage.language_model.decoder.layers[int(parts[3])].layer_number - 1)
    return ".".join(parts)


def _stage(case, ref_model):
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType

    first = parallel_state.is_pipeline_first_stage()
    stage = _llava(_lm_config(pp=2, **case.get("recompute", {})), first, not first)
    stage.model_type = (
        ModelType.encoder_or_decoder
    )  # what Megatron-LM's get_model sets (pretrain_vlm)
    reference = dict(ref_model.named_parameters())
    with torch.no_grad():
        for name, p in stage.named_parameters():
            p.copy_(reference[_reference_name(stage, name)])
    return stage


def _compare(stage, ref, store):
    grad_diff, ref_max, compared = 0.0, 0.0, 0
    for name, p in stage.named_parameters():
        ref_grad = ref["grads"][_reference_name(stage, name)]
        assert p.grad is not None, f"{name} got no gradient"
        grad_diff = max(grad_diff, (p.grad - ref_grad).abs().max().item())
        ref_max = max(ref_max, ref_grad.abs().max().item())
        compared += 1
    dpsl = _dpsl_logged()
    layers = [layer.layer_number for layer in stage.language_model.decoder.layers]
    dpsl_diff = max(abs(dpsl[n - 1].item() - ref["dpsl"][n - 1].item()) for n in layers)
    losses = [r["lm loss"].item() for r in store]  # the last stage's, one per micro-batch
    loss_diff = max((abs(a - b) for a, b in zip(losses, ref["losses"])), default=0.0)
    stats = torch.tensor([grad_diff, loss_diff, dpsl_diff, ref_max])
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    counts = torch.tensor([float(compared), float(len(losses)), float(len(layers))])
    dist.all_reduce(counts)
    keys = ("max_grad_diff", "max_loss_diff", "max_dpsl_diff", "ref_grad_max")
    rec = {k: stats[i].item() for i, k in enumerate(keys)}
    keys = ("params_compared", "losses_compared", "layers_compared")
    rec.update({k: int(counts[i].item()) for i, k in enumerate(keys)})
    return rec


def run_case(case, _singleton_pg):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_dpsl.parallel.token_groups import get_dpsl_token_groups

    ref = REFERENCE
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    try:
        stage = _stage(case, ref["model"])
        _dpsl_logged()  # empty tracker
        store = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter(_micro_batches()),
            model=stage,
            num_microbatches=NUM_MICROBATCHES,
            seq_length=S_MAX,
            micro_batch_size=B,
            forward_only=False,
        )
        rec = dict(name=case["name"], world=dist.get_world_size(), **_compare(stage, ref, store))
        rec.update(
            params_total=len(ref["grads"]),
            ref_dpsl_min=min(v.item() for v in ref["dpsl"]),
            ids_left=get_dpsl_token_groups() is not None,
        )
        return rec
    finally:
        parallel_state.destroy_model_parallel()


REFERENCE: dict = {}


def _setup_and_reference() -> None:
    _setup()
    REFERENCE.update(_reference())


if __name__ == "__main__":
    exactness.main(__doc__, CASES, run_case, setup=_setup_and_reference)
