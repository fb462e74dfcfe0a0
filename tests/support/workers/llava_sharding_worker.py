"""torchrun worker: ``LLaVAModel``'s own SP/CP sharding of marker embeddings vs the router's
sharding of the modality hook's ids.

Launched by tests/distributed/test_llava_sharding.py; by hand:

    PYTHONPATH=.:tests python -m torch.distributed.run --nproc-per-node 2 \
        tests/support/workers/llava_sharding_worker.py --out /tmp/llava_2.json

Per layout: a real ``LLaVAModel`` is built with SP and CP off (its constructor asserts Transformer
Engine attention for them), then given the layout's ``sequence_parallel_lm``,
``context_parallel_lm``, ``tensor_model_parallel_size_lm`` and ``cp_group``. Marker embeddings (text
1, image 2) go through its ``_preprocess_data`` (splice, right padding) and
``_process_embedding_token_parallel`` (0.19's shard padding, ``get_batch_on_this_cp_rank``,
``scatter_to_sequence_parallel_region``): the rows this rank keeps say which positions it holds. The
ids come from the hook ``build_llava_model`` attaches (called with the forward's arguments), sharded
by ``shard_token_group_ids`` / ``shard_token_padding`` as ``DPSLRouter`` does. At megatron-core 0.16
CP needs ``megatron.training`` (not in the wheel): the committed Megatron-LM snapshot supplies it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from support.megatron_cpu import init_torchrun, llava_construction
from support.workers import _exactness as exactness

IMG, IMG_SIZE, PATCH = -200, 16, 8  # 4 rows per tile (class token dropped)
TEXT_MARK, IMAGE_MARK = 1.0, 2.0

CASES = {
    2: [dict(name="tp2_sp", tp=2, cp=1, sp=True), dict(name="cp2", tp=1, cp=2, sp=False)],
    4: [dict(name="tp2_cp2_sp", tp=2, cp=2, sp=True)],
}


def inputs(even: bool):
    """Uneven images (2 + 1 tiles mid-row, text only, one at the start): 16 combined rows when
    ``even`` (divisible by every shard factor here), else 15 (0.19 pads, 0.16 asserts)."""
    tail = [17] if even else []
    ids = [[5, IMG, 6, IMG, 7, *tail], [8, 9, 10, 11, 12, *tail], [IMG, 13, 14, 15, 16, *tail]]
    return torch.tensor(ids), torch.tensor([2, 1, 1], dtype=torch.int)


def _megatron_training_on_path() -> None:
    """megatron-core 0.16's LLaVA imports ``get_batch_on_this_cp_rank`` from
    ``megatron.training``."""
    try:
        import megatron.training.utils  # noqa: F401  (0.19.2 ships it)
    except ImportError:
        from support.megatron_lm_tree import export_tree, tag_for_installed_core

        out = (
            Path(sys.argv[sys.argv.index("--out") + 1]).parent
            / f"megatron-lm-rank{dist.get_rank()}"
        )
        sys.path.insert(0, str(export_tree(tag_for_installed_core(), out)))


def _build(case):
    from megatron.core import parallel_state

    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig
    from megatron_dpsl.models.llava_token_groups import attach_llava_token_groups
    from megatron_dpsl.models.vlm import build_llava_model, clip_vision_config

    lm = DPSLTransformerConfig(
        num_layers=1,
        hidden_size=16,
        ffn_hidden_size=32,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_router_load_balancing_type="dpsl",
        moe_aux_loss_coeff=0.0,
        moe_dpsl_alpha_base=0.75,
        moe_dpsl_alpha_shift=0.5,
        moe_dpsl_num_groups=2,
        use_cpu_initialization=True,
        add_bias_linear=False,
        tensor_model_parallel_size=case["tp"],
    )
    vision = clip_vision_config(
        lm, hf_num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16
    )
    with llava_construction():
        model = build_llava_model(
            lm,
            vision,
            vocab_size=64,
            max_sequence_length=64,
            img_h=IMG_SIZE,
            img_w=IMG_SIZE,
            patch_dim=PATCH,
            language_position_embedding_type="rope",
            token_groups=None,
        )
    model.sequence_parallel_lm = case["sp"]
    model.tensor_model_parallel_size_lm = case["tp"]
    model.context_parallel_lm = case["cp"]
    model.cp_group = parallel_state.get_context_parallel_group() if case["cp"] > 1 else None
    return model, attach_llava_token_groups(model)  # after the layout: the hook reads it


def _llava_rows(model, input_ids, tiles):
    """``[S_local * b]`` markers of the rows this rank keeps (s-major, as the router flattens)."""
    image = torch.full((model.img_seq_len, int(tiles.sum()), 1), IMAGE_MARK)
    text = torch.full((*input_ids.shape, 1), TEXT_MARK)
    combined, _, _ = model._preprocess_data(
        image, text, input_ids, None, None, False, None, IMG, tiles
    )
    local = model._process_embedding_token_parallel(combined, None, None, None)[
        0
    ]  # [S_local, b, 1]
    return local[..., 0].reshape(-1)


def _router_ids(model, handle, input_ids, tiles, case):
    """The hook's ids and padding for this forward, sharded as ``DPSLRouter`` shards them."""
    from megatron.core import parallel_state

    from megatron_dpsl.parallel.token_groups import (
        get_dpsl_token_groups,
        shard_token_group_ids,
        shard_token_padding,
    )

    images = torch.zeros(int(tiles.sum()), 3, IMG_SIZE, IMG_SIZE)
    # the pre-hook as the forward calls it (the forward itself needs TE for SP/CP)
    handle.hook.before(model, (images, input_ids, None, None), {"num_image_tiles": tiles})
    groups = get_dpsl_token_groups()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    shard = dict(tp_group=tp_group, cp_group=model.cp_group, sequence_parallel=case["sp"])
    return shard_token_group_ids(groups, **shard), shard_token_padding(groups, **shard)


def run_case(case, _singleton_pg):
    init_torchrun(tensor_model_parallel_size=case["tp"], context_parallel_size=case["cp"])
    _megatron_training_on_path()
    torch.manual_seed(0)
    model, handle = _build(case)
    rec = dict(name=case["name"], world=dist.get_world_size())
    for variant in ("even", "uneven"):
        input_ids, tiles = inputs(variant == "even")
        try:
            rows = _llava_rows(model, input_ids, tiles)
        except AssertionError as err:
            # megatron-core 0.16: "Sequence length should be divisible by ..." (0.19 pads)
            rec[variant] = dict(megatron_asserts=str(err).split("\n")[0])
            continue
        ids, pad = _router_ids(model, handle, input_ids, tiles, case)
        counts = torch.tensor(
            [
                rows.numel(),
                ids.numel(),
                int((rows == IMAGE_MARK).sum()),
                int((rows == 0).sum()),
                int(((ids == 0) != (rows == IMAGE_MARK)).sum())
                if ids.numel() == rows.numel()
                else -1,
                int((pad != (rows == 0)).sum()) if pad.numel() == rows.numel() else -1,
            ]
        )
        gathered = [torch.zeros_like(counts) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, counts)
        keys = (
            "llava_rows",
            "router_ids",
            "image_rows",
            "pad_rows",
            "id_mismatches",
            "pad_mismatches",
        )
        rec[variant] = {k: [int(g[i]) for g in gathered] for i, k in enumerate(keys)}
    return rec


if __name__ == "__main__":
    exactness.main(__doc__, CASES, run_case)
