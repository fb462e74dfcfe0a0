"""The upcycler against real Megatron-Core GPTModels on CPU (single process, gloo).

Dense models are built and saved by Megatron itself (Megatron-LM layout, or a bare
dist_checkpointing dir); the converted checkpoint is loaded by an MoE GPTModel through its own
sharded state dict, as Megatron-LM's --load does.
"""

import json
import os

import pytest
import torch
from support.upcycle import (
    build_gpt,
    dense_args,
    gpt_logits,
    load_megatron_lm,
    save_megatron_lm,
    sharded_shapes,
)

# fp32 on CPU: the MoE path sums k weighted expert outputs whose probabilities sum to one up to
# rounding; measured differences are ~1e-7 on logits of magnitude ~1, so 1e-5 leaves a 100x margin
# while any real mismatch (a wrong shard, scale or key) moves logits by >1e-2.
EXACT_ATOL = 1e-5


@pytest.fixture(scope="module")
def megatron():
    from support.megatron_cpu import init_single_process

    init_single_process()
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _upcycle(src, dst, **kw):
    from megatron_dpsl.upcycle import upcycle

    kw.setdefault("progress", False)
    return upcycle(src, dst, **kw)


def _args_of(path):
    return torch.load(os.path.join(path, "release", "common.pt"), weights_only=False)["args"]


@pytest.fixture(scope="module")
def swiglu_ckpt(megatron, tmp_path_factory):
    torch.manual_seed(0)
    args = dense_args()  # SwiGLU, RMSNorm, GQA (4 heads, 2 groups), untied output layer
    model = build_gpt(args)
    root = tmp_path_factory.mktemp("dense_swiglu")
    save_megatron_lm(model, str(root), args)
    return root, args, model


@pytest.fixture(scope="module")
def gelu_ckpt(megatron, tmp_path_factory):
    torch.manual_seed(1)
    args = dense_args(
        glu=False, activation="gelu", bias=True, tied=True, normalization="LayerNorm", groups=4
    )
    model = build_gpt(args)
    for p in model.parameters():  # non-zero biases so that bias handling is exercised
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.1)
    root = tmp_path_factory.mktemp("dense_gelu")
    save_megatron_lm(model, str(root), args)
    return root, args, model


TOKENS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("G,E,k", [(1, 4, 2), (2, 8, 4), (4, 16, 8)])
def test_exact_upcycling_swiglu_matches_dense_logits(swiglu_ckpt, tmp_path, G, E, k):
    src, _, dense = swiglu_ckpt
    _upcycle(
        src,
        tmp_path / "moe",
        num_experts=E,
        granularity=G,
        moe_router_topk=k,
        weight_scaling="exact",
    )
    moe = build_gpt(_args_of(tmp_path / "moe"))
    load_megatron_lm(moe, str(tmp_path / "moe"))
    diff = (gpt_logits(moe, TOKENS) - gpt_logits(dense, TOKENS)).abs().max().item()
    print(f"swiglu G={G} E={E} k={k}: max |logit diff| = {diff:.3e}")
    assert diff <= EXACT_ATOL


def test_exact_upcycling_gelu_bias_tied_matches_dense_logits(gelu_ckpt, tmp_path):
    src, _, dense = gelu_ckpt
    _upcycle(
        src,
        tmp_path / "moe",
        num_experts=8,
        granularity=2,
        moe_router_topk=4,
        weight_scaling="exact",
    )
    moe = build_gpt(_args_of(tmp_path / "moe"))
    load_megatron_lm(moe, str(tmp_path / "moe"))
    diff = (gpt_logits(moe, TOKENS) - gpt_logits(dense, TOKENS)).abs().max().item()
    print(f"gelu+bias G=2: max |logit diff| = {diff:.3e}")
    assert diff <= EXACT_ATOL


def test_mixed_layers_shared_expert_and_bare_dir(megatron, swiglu_ckpt, tmp_path):
    """moe_layer_freq [0,1] (per-layer keys) + shared expert, from a bare dist_checkpointing dir
    without args."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    _, args, dense = swiglu_ckpt
    bare = tmp_path / "bare"
    bare.mkdir()
    dist_checkpointing.save(
        dense.sharded_state_dict(),
        str(bare),
        sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1),
    )
    _upcycle(
        bare,
        tmp_path / "moe",
        num_experts=4,
        granularity=2,
        moe_router_topk=2,
        weight_scaling="exact",
        shared_expert=True,
        moe_layer_freq="[0,1]",
    )
    out_args = _args_of(tmp_path / "moe")
    assert out_args.moe_layer_freq == [0, 1] and out_args.moe_shared_expert_intermediate_size == 64
    # no args in the source: what the tensors show is filled in, the head count is not guessed
    assert (out_args.position_embedding_type, out_args.add_position_embedding) == ("rope", False)
    assert (
        out_args.normalization,
        out_args.padded_vocab_size,
        out_args.untie_embeddings_and_output_weights,
    ) == ("RMSNorm", 96, True)
    assert not hasattr(out_args, "num_attention_heads") and not hasattr(out_args, "kv_channels")
    full = dense_args()  # the bare dir has no args: attention shapes come from the test's config
    for name in (
        "num_experts",
        "moe_ffn_hidden_size",
        "moe_router_topk",
        "moe_layer_freq",
        "moe_shared_expert_intermediate_size",
        "moe_router_pre_softmax",
        "moe_router_score_function",
    ):
        setattr(full, name, getattr(out_args, name))
    moe = build_gpt(full)
    load_megatron_lm(moe, str(tmp_path / "moe"))
    diff = (gpt_logits(moe, TOKENS) - gpt_logits(dense, TOKENS)).abs().max().item()
    print(f"mixed layers + shared expert G=2: max |logit diff| = {diff:.3e}")
    assert diff <= EXACT_ATOL


@pytest.mark.parametrize("extra", [{}, {"shared_expert": True, "moe_layer_freq": "[1,0]"}])
def test_written_keys_and_shapes_are_the_moe_models(swiglu_ckpt, tmp_path, extra):
    from megatron_dpsl.upcycle.dcp_io import DcpReader

    src, _, _ = swiglu_ckpt
    _upcycle(src, tmp_path / "moe", num_experts=4, moe_router_topk=2, **extra)
    model_shapes = sharded_shapes(build_gpt(_args_of(tmp_path / "moe")))
    reader = DcpReader(tmp_path / "moe" / "release")
    written = {k: tuple(s) for k, (s, _) in reader.tensor_entries().items()}
    written.update({k: None for k in reader.object_entries()})
    te_aliases = {
        k for k in written if ".pre_mlp_layernorm." in k
    }  # for the TE MoE spec (layers.py)
    assert set(written) - te_aliases == set(model_shapes)
    assert all(written[k] == model_shapes[k] for k in model_shapes)


def test_he2024_reproduces_megatron_runtime_upcycling(megatron, swiglu_ckpt, tmp_path):
    """Same dense weights through megatron.core's upcycling_utils and through the converter."""
    from megatron.core.transformer.moe import upcycling_utils

    src, args, dense = swiglu_ckpt
    E, G, k = 8, 2, 4
    _upcycle(
        src,
        tmp_path / "moe",
        num_experts=E,
        granularity=G,
        moe_router_topk=k,
        weight_scaling="he2024",
    )
    ours = build_gpt(_args_of(tmp_path / "moe"))
    load_megatron_lm(ours, str(tmp_path / "moe"))
    ours_sd = ours.state_dict()
    torch.manual_seed(3)
    runtime_model = build_gpt(_args_of(tmp_path / "moe"))
    runtime_sd = upcycling_utils._convert_to_moe_state_dict(runtime_model, dense)
    worst = 0.0
    for key, ref in runtime_sd.items():
        if key.endswith("_extra_state"):
            continue
        if key.endswith("router.weight"):
            # the runtime takes its router's first E/G rows and repeats each G times; ours draws
            # E/G rows from our seed: compare the virtual-group structure, not the random values
            for r in (ref, ours_sd[key]):
                assert torch.equal(
                    r.view(E // G, G, -1), r.view(E // G, G, -1)[:, :1].expand(-1, G, -1)
                )
            continue
        worst = max(worst, (ours_sd[key] - ref).abs().max().item())
    print(f"he2024 vs megatron.core upcycling_utils: max |diff| = {worst:.3e}")
    assert worst == 0.0  # same float32 multiply by the same factor, same slices: bitwise equal


def test_converted_checkpoint_trains_ep1(megatron, swiglu_ckpt, tmp_path):
    """Load into an MoE GPTModel with the DPSL router (TopKRouter if the plugin router is absent)
    and train."""
    from support.upcycle import moe_training_model, train_steps

    src, _, _ = swiglu_ckpt
    _upcycle(
        src,
        tmp_path / "moe",
        num_experts=8,
        granularity=2,
        moe_router_topk=4,
        expert_noise_std=0.01,
    )
    model, router_name = moe_training_model(_args_of(tmp_path / "moe"))
    load_megatron_lm(model, str(tmp_path / "moe"))
    losses = train_steps(model, TOKENS, steps=4)
    print(f"EP=1 {router_name} losses: {losses}")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_record_json_dry_run_and_hash(swiglu_ckpt, tmp_path, capsys):
    from megatron_dpsl.upcycle.cli import main
    from megatron_dpsl.upcycle.readers import MegatronDenseSource

    src, _, _ = swiglu_ckpt
    assert (
        main(
            [
                "--source",
                str(src),
                "--output",
                str(tmp_path / "moe"),
                "--num-experts",
                "16",
                "--granularity",
                "4",
                "--moe-router-topk",
                "8",
                "--dry-run",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight  [2, 16, 32, 32] float32" in out
    assert "params MoE (active/token)" in out and not (tmp_path / "moe").exists()
    assert (
        main(
            [
                "--source",
                str(src),
                "--output",
                str(tmp_path / "moe"),
                "--num-experts",
                "4",
                "--expert-noise-std",
                "0.01",
                "--drop-upcycling-ratio",
                "0.5",
                "--seed",
                "7",
                "--no-progress",
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "moe" / "upcycle_config.json").read_text())
    assert (
        record["options"]["expert_noise_std"] == 0.01
        and record["options"]["drop_upcycling_ratio"] == 0.5
    )
    assert record["options"]["seed"] == 7
    assert record["source"]["sha256"] == MegatronDenseSource(src).content_hash()
    assert (tmp_path / "moe" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no temporary directory left


def test_errors(swiglu_ckpt, tmp_path, capsys):
    from megatron_dpsl.upcycle import UpcycleError
    from megatron_dpsl.upcycle.cli import main

    src, _, _ = swiglu_ckpt
    (tmp_path / "empty").mkdir()
    with pytest.raises(UpcycleError, match="not a checkpoint"):
        _upcycle(tmp_path / "empty", tmp_path / "o1", num_experts=4)
    (tmp_path / "file.pt").write_bytes(b"x")
    with pytest.raises(UpcycleError, match="is a file"):
        _upcycle(tmp_path / "file.pt", tmp_path / "o1", num_experts=4)
    with pytest.raises(UpcycleError, match="not divisible by --granularity 3"):  # F = 64
        _upcycle(src, tmp_path / "o1", num_experts=6, granularity=3, moe_router_topk=3)
    _upcycle(src, tmp_path / "moe", num_experts=4)
    with pytest.raises(UpcycleError, match="already an MoE"):
        _upcycle(tmp_path / "moe", tmp_path / "o2", num_experts=4)
    assert (
        main(
            [
                "--source",
                str(tmp_path / "empty"),
                "--output",
                str(tmp_path / "o3"),
                "--num-experts",
                "4",
            ]
        )
        == 2
    )
    assert "not a checkpoint" in capsys.readouterr().err
    assert (
        not (tmp_path / "o1").exists()
        and not (tmp_path / "o2").exists()
        and not (tmp_path / "o3").exists()
    )


def test_atomic_write_force_and_interrupt(swiglu_ckpt, tmp_path, monkeypatch):
    from megatron_dpsl.upcycle import UpcycleError, plan

    src, _, _ = swiglu_ckpt
    dst = tmp_path / "moe"
    _upcycle(src, dst, num_experts=4, seed=1)
    first = (dst / "upcycle_config.json").read_text()
    with pytest.raises(UpcycleError, match="exists; pass --force"):
        _upcycle(src, dst, num_experts=4, seed=2)
    assert (dst / "upcycle_config.json").read_text() == first

    real = plan.layer_pieces

    def interrupted(layer_plan, w, part="all"):
        if layer_plan.layer == 1 and w.mlp["linear_fc1.weight"].device.type != "meta":
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing layer 1
        return real(layer_plan, w, part)

    monkeypatch.setattr(plan, "layer_pieces", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _upcycle(src, dst, num_experts=4, seed=3, force=True)
    assert (dst / "upcycle_config.json").read_text() == first  # old target intact
    with pytest.raises(KeyboardInterrupt):
        _upcycle(src, tmp_path / "new", num_experts=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]  # no partial output, no temp dir
    monkeypatch.setattr(plan, "layer_pieces", real)
    _upcycle(src, dst, num_experts=4, seed=4, force=True)
    assert json.loads((dst / "upcycle_config.json").read_text())["options"]["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_output_that_is_or_contains_the_source_is_refused(swiglu_ckpt, tmp_path):
    """--force on an output that is (or contains) the source would replace, i.e. delete, the
    source."""
    import shutil

    from megatron_dpsl.upcycle import UpcycleError

    src = tmp_path / "ckpts" / "dense"
    shutil.copytree(swiglu_ckpt[0], src)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for dst in (src, src.parent, tmp_path):
        with pytest.raises(UpcycleError, match="is or contains --source"):
            _upcycle(src, dst, num_experts=4, force=True)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # the source is untouched


def test_atomic_directory_dangling_symlink_and_failed_commit(tmp_path, monkeypatch):
    """A dangling symlink counts as an existing target; a failed final rename leaves the target as
    it was."""
    import os

    from megatron_dpsl.upcycle import UpcycleError
    from megatron_dpsl.upcycle.writer import atomic_directory

    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UpcycleError, match="exists; pass --force"):
        with atomic_directory(link):
            pass
    with atomic_directory(link, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (link / "new.txt").read_text() == "new" and not link.is_symlink()

    real_replace = os.replace

    def failing_replace(a, b):
        if ".upcycle-tmp-" in str(a):  # the new checkpoint's final rename fails
            raise OSError(18, "Invalid cross-device link")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(UpcycleError, match="could not move the new checkpoint into place"):
        with atomic_directory(link, force=True) as tmp:
            (tmp / "newer.txt").write_text("newer")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (link / "new.txt").read_text() == "new"  # the old target is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or aside copy left


def test_keys_under_a_model_prefix(megatron, swiglu_ckpt, tmp_path):
    """On-disk keys under a prefix (``model.decoder...``) are found; output keys are Megatron's
    own."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    _, args, dense = swiglu_ckpt
    src = tmp_path / "prefixed"
    src.mkdir()
    dist_checkpointing.save(
        {"model": dense.sharded_state_dict(prefix="model."), "args": args},
        str(src),
        sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1),
    )
    _upcycle(src, tmp_path / "moe", num_experts=4, moe_router_topk=2, weight_scaling="exact")
    moe = build_gpt(_args_of(tmp_path / "moe"))
    load_megatron_lm(moe, str(tmp_path / "moe"))
    assert (gpt_logits(moe, TOKENS) - gpt_logits(dense, TOKENS)).abs().max().item() <= EXACT_ATOL
