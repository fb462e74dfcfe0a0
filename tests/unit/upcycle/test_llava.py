"""Upcycling a dense Megatron-Core LLaVA: only the language model becomes MoE; the ViT and the
projector are copied bit for bit. Dense LLaVAs are built and saved by Megatron itself (torch_dist in
the Megatron-LM layout; the legacy per-rank torch format); the converted checkpoint is loaded by an
MoE LLaVAModel through its own sharded state dict, as Megatron-LM's --load does."""

import os

import pytest
import torch
from support.llava import (
    build_llava,
    build_plugin_llava,
    llava_args,
    llava_logits,
    prompts,
    save_legacy,
    vision_state,
)
from support.upcycle import load_megatron_lm, save_megatron_lm, sharded_shapes

# fp32 on CPU: the MoE path sums k weighted expert outputs whose probabilities sum to one up to
# rounding; measured <= 1.7e-6 on logits up to 3.9 (weights of std 0.2), so 1e-5 leaves a 6x margin
# while a wrong shard, scale or key moves logits by O(1) (the negative control: 2.3).
EXACT_ATOL = 1e-5


@pytest.fixture(scope="module")
def megatron():
    from support.megatron_cpu import init_single_process

    init_single_process()
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def dense_llava(megatron, tmp_path_factory):
    torch.manual_seed(0)
    args = llava_args()
    model = build_llava(args)
    root = tmp_path_factory.mktemp("llava_dist")
    save_megatron_lm(model, str(root / "dist"), args)
    save_legacy(model, str(root / "legacy"), args)  # --ckpt-format torch, TP=1
    images, tokens = prompts()
    return root, args, model, llava_logits(model, images, tokens)


def _upcycle(src, dst, **kw):
    from megatron_dpsl.upcycle import upcycle

    kw.setdefault("progress", False)
    return upcycle(src, dst, **kw)


def _load_moe(path):
    args = torch.load(os.path.join(path, "release", "common.pt"), weights_only=False)["args"]
    model = build_llava(args)
    load_megatron_lm(model, str(path))
    return model


def _assert_vision_bitwise(model, reference):
    got, want = vision_state(model), vision_state(reference)
    assert sorted(got) == sorted(want) and len(got) > 10
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("fmt,G,E,k", [("dist", 1, 4, 2), ("dist", 2, 8, 4), ("legacy", 2, 8, 4)])
def test_dense_llava_exact_upcycling(dense_llava, tmp_path, fmt, G, E, k):
    """torch_dist and the legacy torch format: ViT and projector bitwise, logits with images
    equal."""
    root, _, dense, ref = dense_llava
    out = tmp_path / "moe"
    _upcycle(
        root / fmt, out, num_experts=E, granularity=G, moe_router_topk=k, weight_scaling="exact"
    )
    moe = _load_moe(out)
    args = torch.load(out / "release" / "common.pt", weights_only=False)["args"]
    assert getattr(args, "ckpt_format", "torch_dist") == "torch_dist"  # whatever the source's
    assert type(moe.language_model.decoder.layers[0].mlp).__name__ == "MoELayer"
    assert type(moe.vision_model.decoder.layers[0].mlp).__name__ == "MLP"
    _assert_vision_bitwise(moe, dense)
    images, tokens = prompts()
    assert (llava_logits(moe, images, tokens) - ref).abs().max().item() <= EXACT_ATOL


def test_dense_llava_negative_control(dense_llava, tmp_path):
    """Without the exact scaling a granular MoE computes 1/G of the dense FFN: the logits move."""
    root, _, dense, ref = dense_llava
    _upcycle(root / "dist", tmp_path / "moe", num_experts=8, granularity=2, moe_router_topk=4)
    moe = _load_moe(tmp_path / "moe")
    _assert_vision_bitwise(moe, dense)
    images, tokens = prompts()
    assert (llava_logits(moe, images, tokens) - ref).abs().max().item() > 0.5


@pytest.mark.parametrize("fmt", ["dist", "legacy"])
def test_written_keys_and_shapes_are_the_moe_llavas(dense_llava, tmp_path, fmt):
    """Every tensor and object the MoE LLaVAModel asks for, with its global shape; beyond them only
    the norms' other names."""
    from megatron_dpsl.upcycle.dcp_io import DcpReader

    root = dense_llava[0]
    _upcycle(root / fmt, tmp_path / "moe", num_experts=4, moe_router_topk=2)
    model = build_llava(
        torch.load(tmp_path / "moe" / "release" / "common.pt", weights_only=False)["args"]
    )
    reader = DcpReader(tmp_path / "moe" / "release")
    written = {k: tuple(s) for k, (s, _) in reader.tensor_entries().items()}
    written.update({k: None for k in reader.object_entries()})
    wanted = sharded_shapes(model)
    assert {k: written[k] for k in wanted} == wanted
    # the other names a LLaVA language spec gives the same norms (llava.norm_aliases)
    aliases = ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")
    assert {k.rsplit("layers.", 1)[1] for k in set(written) - set(wanted)} == set(aliases)


def test_upcycled_llava_trains_in_the_plugins_builder(dense_llava, tmp_path):
    """The output loads into ``build_llava_model`` (the GPT local spec, DPSLRouter, modality ids on
    every forward, priors on the two modalities) with the dense logits, and trains a step."""
    root, _, _, ref = dense_llava
    _upcycle(
        root / "dist", tmp_path / "moe", num_experts=4, moe_router_topk=2, weight_scaling="exact"
    )
    args = torch.load(tmp_path / "moe" / "release" / "common.pt", weights_only=False)["args"]
    model = build_plugin_llava(
        args, moe_dpsl_num_groups=2, moe_dpsl_alpha_base=0.75, moe_dpsl_alpha_shift=0.5
    )
    load_megatron_lm(model, str(tmp_path / "moe"))
    assert type(model.language_model.decoder.layers[0].mlp.router).__name__ == "DPSLRouter"
    images, tokens = prompts()
    assert (llava_logits(model, images, tokens) - ref).abs().max().item() <= EXACT_ATOL
    model.train()
    s = ref.shape[1]
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(tokens.shape)
    loss, _ = model(
        images, tokens, torch.arange(s).expand(2, s), mask, labels=labels, loss_mask=loss_mask
    )
    loss.float().mean().backward()
    router = model.language_model.decoder.layers[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def _nothing_written(tmp_path, name="out"):
    return not (tmp_path / name).exists() and not [p for p in tmp_path.iterdir() if name in p.name]


@pytest.mark.parametrize(
    "flags,match",
    [
        (dict(img_h=32, img_w=32), "--img-h 32 contradicts the checkpoint"),
        (dict(patch_dim=4), "--patch-dim 4 contradicts the checkpoint"),
        (dict(encoder_num_layers=3), "--encoder-num-layers 3 contradicts"),
        (dict(disable_vision_class_token=False), "--disable-vision-class-token False contradicts"),
    ],
)
def test_vision_flags_the_checkpoint_contradicts(dense_llava, tmp_path, flags, match):
    from megatron_dpsl.upcycle import UpcycleError

    for fmt in ("dist", "legacy"):
        with pytest.raises(UpcycleError, match=match):
            _upcycle(dense_llava[0] / fmt, tmp_path / "out", num_experts=4, **flags)
        assert _nothing_written(tmp_path)


def test_vision_flags_that_agree_are_accepted(dense_llava, tmp_path):
    _upcycle(
        dense_llava[0] / "dist",
        tmp_path / "out",
        num_experts=4,
        img_h=16,
        img_w=16,
        patch_dim=8,
        encoder_num_layers=2,
        disable_vision_class_token=True,
    )
    assert (tmp_path / "out" / "release" / "common.pt").is_file()


def test_bad_llava_checkpoints_are_refused(megatron, dense_llava, tmp_path, capsys):
    """One-line errors naming the cause; nothing written."""
    import argparse

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from megatron_dpsl.upcycle import UpcycleError
    from megatron_dpsl.upcycle.cli import main

    root, args, dense, _ = dense_llava
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    cases = {}
    # the checkpoint's own args contradict its ViT (a 14-pixel patch, 8x8 conv1)
    bad_args = argparse.Namespace(**{**vars(args), "patch_dim": 14})
    cases["bad_args"] = (
        {"model": dense.sharded_state_dict(), "args": bad_args},
        "args.patch_dim=14 contradicts",
    )
    # a LLaVA without its vision tower (a language-model-only state dict under language_model.)
    lm_only = {
        k: v for k, v in dense.sharded_state_dict().items() if k.startswith("language_model.")
    }
    cases["no_vision"] = ({"model": lm_only, "args": args}, "without a vision tower")
    no_proj = {
        k: v
        for k, v in dense.sharded_state_dict().items()
        if not k.startswith("vision_projection.")
    }
    cases["no_projector"] = ({"model": no_proj, "args": args}, "without its vision projection")
    for name, (state, match) in cases.items():
        (tmp_path / name).mkdir()
        dist_checkpointing.save(state, str(tmp_path / name), sharded_strategy=strategy)
        with pytest.raises(UpcycleError, match=match):
            _upcycle(tmp_path / name, tmp_path / "out", num_experts=4)
        assert (
            main(
                [
                    "--source",
                    str(tmp_path / name),
                    "--output",
                    str(tmp_path / "out"),
                    "--num-experts",
                    "4",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert match.split()[0] in err and len(err.splitlines()) == 1
        assert _nothing_written(tmp_path)


def test_vision_flags_on_a_text_only_checkpoint_are_refused(megatron, tmp_path):
    from support.upcycle import build_gpt, dense_args

    from megatron_dpsl.upcycle import UpcycleError

    args = dense_args()
    save_megatron_lm(build_gpt(args), str(tmp_path / "gpt"), args)
    with pytest.raises(UpcycleError, match="--img-h describes a vision encoder, but .* has none"):
        _upcycle(tmp_path / "gpt", tmp_path / "out", num_experts=4, img_h=16)
    assert _nothing_written(tmp_path)


def test_legacy_layouts_this_reader_refuses(dense_llava, tmp_path):
    """Pipeline/expert-parallel legacy shards and a missing TP rank: named, nothing written."""
    import shutil

    from megatron_dpsl.upcycle import UpcycleError

    step = dense_llava[0] / "legacy" / "iter_0000003"
    for name, renamed, match in [
        ("pp", "mp_rank_00_001", "pipeline- or expert-parallel"),
        ("gap", "mp_rank_01", "TP ranks \\[1\\] are not 0..0"),
    ]:
        src = tmp_path / name / "iter_0000003"
        shutil.copytree(step / "mp_rank_00", src / renamed)
        with pytest.raises(UpcycleError, match=match):
            _upcycle(src, tmp_path / "out", num_experts=4)
        assert _nothing_written(tmp_path)
