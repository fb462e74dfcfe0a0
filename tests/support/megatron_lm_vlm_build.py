"""The VLM launcher's model on one gloo rank (CPU), inside the chain child: what its provider
builds.

``vlm_build_report(argv, ...)`` parses ``argv`` the way the launcher does (Megatron-LM's
``parse_args`` with the launcher's provider, then ``validate_args``), sets the globals, and builds
- the stock ``pretrain_vlm.model_provider`` (reported: the exception it dies with), and
- the launcher's ``dpsl_vlm_model_provider``: its routers, MoE layers, projector, tie, RoPE inverse
  frequencies against a reference ``RotaryEmbedding``, the ViT's widths, frozen parts, and one
  training forward on ``pretrain_vlm``'s own mock sample, recording the token groups each router
  saw.

Replaced leaves (CUDA-only or CPU-incompatible, none in the package): the ``megatron_cpu`` shims
(``torch.cuda.current_device``, the RNG tracker; ``llava_construction``: ``CLIPViTModel``'s
``.cuda()`` of its position ids a no-op, its default ``torch.nn.LayerNorm`` norms replaced by
``WrappedTorchNorm``, which accepts ``config=``), and an explicit ``[1, 1, S, S]`` causal mask for
the language model (``get_batch`` passes ``None``, for which the local attention builds a CUDA
mask).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile


def _parse(argv):
    from megatron.training import arguments

    from megatron_dpsl.megatron_lm import pretrain_vlm as launcher

    sys.argv = ["pretrain_vlm.py", *argv]
    with tempfile.TemporaryFile("w+") as sink, contextlib.redirect_stdout(sink):
        args = arguments.parse_args(extra_args_provider=launcher.extra_args_provider)
        arguments.validate_args(args)
    args.padded_vocab_size = args.vocab_size
    return args


def _inv_freq_error(model, args) -> dict:
    """Max |Δ| of the language model's RoPE inverse frequencies against ``RotaryEmbedding`` with the
    flags' base and factor, and against stock pretrain_vlm's (base 10000, factor 8)."""
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    got = model.language_model.rotary_pos_emb.inv_freq
    kv = model.language_model.config.kv_channels

    def ref(base, factor):
        emb = RotaryEmbedding(
            kv, 1.0, rotary_base=base, rope_scaling=True, rope_scaling_factor=factor
        )
        return float((emb.inv_freq - got).abs().max())

    assert got.dtype == torch.float32
    return {
        "flags": ref(args.rotary_base, args.rope_scaling_factor),
        "stock": ref(10000, 8.0),
    }


def _router_groups(model) -> list:
    """Register a pre-hook on each router that records the token groups set when it runs."""
    from megatron_dpsl.parallel.token_groups import get_dpsl_token_groups

    seen = []

    def hook(module, inputs):
        groups = get_dpsl_token_groups()
        seen.append(None if groups is None else groups.group_ids.tolist())

    for m in model.modules():
        if type(m).__name__.endswith("Router"):
            m.register_forward_pre_hook(hook)
    return seen


def _mock_batch(pretrain_vlm, args):
    """``pretrain_vlm``'s own mock sample (its dataset config, ``_preprocess_data_for_llava``),
    batch
    of 2."""
    import torch
    from megatron.core.datasets.multimodal_dataset import MockMultimodalDataset

    datasets = pretrain_vlm.train_valid_test_datasets_provider([2, 0, 0])
    samples = [datasets[0][i] for i in range(2)]
    assert isinstance(datasets[0], MockMultimodalDataset), type(datasets[0])
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}


def _forward(model, batch, img_seq_len) -> dict:
    import torch

    tokens = batch["tokens"].long()
    seq = tokens.shape[1] - 1 + img_seq_len
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(
        1
    )  # True = masked (Megatron's convention)
    seen = _router_groups(model)
    model.train()
    loss, _ = model(
        batch["image"].float(),
        tokens,
        batch["position_ids"].long(),
        mask,
        batch["labels"].long(),
        batch["loss_mask"].float(),
    )
    loss.float().sum().backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    return {
        "finite": bool(torch.isfinite(loss).all()),
        "router_groups": seen,
        "tokens": tokens.tolist(),
        "grads_in_vision_model": any(n.startswith("vision_model.") for n in trained),
        "grads_in_projection": any(n.startswith("vision_projection.") for n in trained),
    }


def vlm_build_report(argv: list) -> dict:
    import pretrain_vlm
    from megatron.training import global_vars

    from megatron_dpsl.megatron_lm.vlm_provider import dpsl_vlm_model_provider
    from support.megatron_cpu import init_single_process, llava_construction

    init_single_process()
    report: dict = {}
    args = _parse(argv)
    global_vars.unset_global_variables()
    with tempfile.TemporaryFile("w+") as sink, contextlib.redirect_stdout(sink):
        global_vars.set_global_variables(args, build_tokenizer=True)
    try:
        with llava_construction(), contextlib.redirect_stdout(sys.stderr):
            try:
                pretrain_vlm.model_provider()
                report["stock"] = "built"
            except Exception as e:  # noqa: BLE001 - what stock pretrain_vlm dies with, for the test
                report["stock"] = f"{type(e).__name__}: {e}"
            global_vars.set_args(_reparsed(argv, args))
            model = dpsl_vlm_model_provider()
        names = [type(m).__name__ for m in model.modules()]
        lm = model.language_model
        report.update(
            routers=[n for n in names if n.endswith("Router")],
            lm_routers=[
                type(m).__name__ for m in lm.modules() if type(m).__name__.endswith("Router")
            ],
            projection=type(model.vision_projection.encoder).__name__,
            projection_fc1=type(model.vision_projection.encoder.linear_fc1).__name__,
            projection_shape=_projection(model),
            tied=bool(lm.share_embeddings_and_output_weights),
            output_weight_is_none=lm.output_layer.weight is None,
            inv_freq_error=_inv_freq_error(model, global_vars.get_args()),
            vision_hidden=model.vision_model.config.hidden_size,
            vision_moe=model.vision_model.config.num_moe_experts,
            projection_moe=model.vision_projection.config.num_moe_experts,
            lm_layers=len(lm.decoder.layers),
            vit_layers=len(model.vision_model.decoder.layers),
            vision_frozen=all(not p.requires_grad for p in model.vision_model.parameters()),
            lm_frozen=all(not p.requires_grad for p in lm.parameters()),
            img_seq_len=model.img_seq_len,
        )
        report["torch_dist"] = _torch_dist_round_trip(model)
        report["forward"] = _forward(model, _mock_batch(pretrain_vlm, args), model.img_seq_len)
        # stage I, and pretrain_vlm's own ViT (no --vision-model-type): stock's dense projector
        stock_vit = [a for a in argv if a not in ("--vision-model-type", "clip")]
        report["stage_one"] = _stage_one([*stock_vit, "--freeze-LM"], args)
    finally:
        global_vars.unset_global_variables()
    return report


def _projection(model) -> dict:
    config = model.vision_projection.config
    return {
        "fc1": type(model.vision_projection.encoder.linear_fc1).__name__,
        "ffn_hidden_size": config.ffn_hidden_size,
        "gated_linear_unit": config.gated_linear_unit,
        "bias": model.vision_projection.encoder.linear_fc1.bias is not None,
        "language_ffn_hidden_size": model.language_model.config.ffn_hidden_size,
        "vision_hidden": model.vision_model.config.hidden_size,
    }


def _stage_one(argv: list, args) -> dict:
    """The model the launcher builds for ``argv`` (stage I of LLaVA-1.5: ``--freeze-LM
    --freeze-ViT``): its top-level parts with trainable parameters, and its projector."""
    from megatron.training import global_vars

    from megatron_dpsl.megatron_lm.vlm_provider import dpsl_vlm_model_provider
    from support.megatron_cpu import llava_construction

    global_vars.set_args(_reparsed(argv, args))
    with llava_construction(), contextlib.redirect_stdout(sys.stderr):
        model = dpsl_vlm_model_provider()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    return {"trainable": sorted(trainable), "projection": _projection(model)}


def _torch_dist_round_trip(model) -> dict:
    """The model's ``sharded_state_dict`` saved as torch_dist (what ``--ckpt-format torch_dist``
    writes under ``model``) and loaded into a perturbed copy of the same model: tensors saved, max
    |Δ| after the load."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    reference = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with tempfile.TemporaryDirectory() as tmp:
        dist_checkpointing.save(
            {"model": model.sharded_state_dict()},
            tmp,
            sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1),
        )
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the load must overwrite every parameter
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, tmp)
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    state = model.state_dict()
    return {
        "tensors": len(reference),
        "missing": list(missing),
        "unexpected": list(unexpected),
        "max_abs_diff": max(
            float((state[k] - v).abs().max()) for k, v in reference.items() if v.numel()
        ),
    }


def _reparsed(argv, args):
    # stock model_provider rewrote args (seq_length, decoder_seq_length, ...): the launcher's
    # provider
    # gets a fresh parse, as in a run
    fresh = _parse(argv)
    fresh.padded_vocab_size = args.padded_vocab_size
    return fresh
