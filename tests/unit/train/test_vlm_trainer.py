"""The embedded trainer's LLaVA path (``--llava``) and the demonstration's held-out metrics.

In-process: the real trainer in a one-rank gloo world, a real Megatron-Core ``LLaVAModel`` (CLIP
ViT, projector, MoE language model with DPSL modality priors).
"""

from __future__ import annotations

import pytest
import torch

from megatron_dpsl.train.arguments import parse_args, validate_args
from megatron_dpsl.train.vlm_data import collate, make_sample

LLAVA = [
    "--llava", "--device", "cpu", "--num-layers", "2", "--hidden-size", "32",
    "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--position-embedding-type", "rope",
    "--disable-bias-linear", "--seq-length", "32", "--vocab-size", "64",
    "--encoder-num-layers", "1", "--vision-hidden-size", "16", "--patch-dim", "8",
    "--disable-vision-class-token", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "1e-2", "--log-interval", "1",
    "--eval-iters", "1", "--seed", "4",
]  # fmt: skip
MOE_MODALITY = [
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "dpsl",
    "--moe-dpsl-coeff", "0.1", "--moe-dpsl-alpha-base", "0.75", "--moe-dpsl-alpha-shift", "0.5",
    "--moe-dpsl-num-groups", "2",
]  # fmt: skip


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--patch-dim", "5"], "--patch-dim"),
        (["--seq-length", "24"], "--seq-length"),  # 16 text + 16 image rows - 1 = 31 positions
        (["--mock-data"], "--llava"),
        (["--vision-hidden-size", "18"], "--vision-hidden-size"),
    ],
)
def test_llava_flag_errors_name_the_flag(extra, flag):
    with pytest.raises(ValueError, match=f"^{flag}: "):
        validate_args(parse_args([*LLAVA, *extra]), 1)


def test_vision_flags_need_llava():
    with pytest.raises(ValueError, match="^--freeze-ViT: needs --llava"):
        validate_args(parse_args(["--mock-data", "--freeze-ViT"]), 1)


def test_llava_moe_trains_and_held_out_loss_matches_llavas_own_labels(tmp_path):
    """Train a few steps through the trainer, then check ``vlm_eval``'s position bookkeeping: its
    caption loss from the logits must equal the loss LLaVAModel computes from its own label
    splice."""
    from megatron_dpsl.train.trainer import pretrain
    from megatron_dpsl.train.vlm_eval import held_out_metrics

    stats = tmp_path / "routing.pt"
    result = pretrain(
        parse_args([*LLAVA, *MOE_MODALITY, "--train-iters", "3", "--freeze-ViT",
                    "--routing-stats-path", str(stats)])
    )  # fmt: skip
    model = result.model
    assert all(not p.requires_grad for p in model.vision_model.parameters())
    assert "dpsl_loss" in result.aux_losses and all(
        map(torch.isfinite, map(torch.tensor, result.train_losses))
    )
    n = 24
    metrics = held_out_metrics(
        model,
        seed=4,
        num_samples=n,
        micro_batch_size=n,
        img_seq_len=model.img_seq_len,
        device="cpu",
    )
    samples = [make_sample(4, "valid", i) for i in range(n)]
    batch = collate(samples, model.img_seq_len)
    caption = torch.tensor([s.kind == "caption" for s in samples], dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        loss, loss_mask = model(
            batch["images"], batch["tokens"], batch["position_ids"], batch["attention_mask"],
            labels=batch["labels"], loss_mask=batch["loss_mask"] * caption[:, None],
            num_image_tiles=batch["num_image_tiles"],
        )  # fmt: skip
    reference = float((loss * loss_mask).sum() / loss_mask.sum())
    assert metrics["captions"] == int(caption.sum()) > 0
    assert metrics["caption_loss"] == pytest.approx(
        reference, rel=1e-5
    )  # fp32 sums in another order
    assert 0.0 <= metrics["answer_accuracy"] <= 1.0
    # the validation routing statistics carry each position's modality (0 = image rows, 1 = text)
    # and
    # leave LLaVA's right padding out: the final evaluation's one global batch is valid rows 0-7
    rows = [make_sample(4, "valid", i) for i in range(8)]
    images = sum(s.image is not None for s in rows)
    assert 0 < images < len(rows)  # a text-only row: the others' image rows pad it
    for layer in torch.load(stats, weights_only=False)["history"][-1]["layers"]:
        ids = layer["group_ids_sample"]
        assert int((ids == 0).sum()) == images * model.img_seq_len
        assert int((ids == 1).sum()) == len(rows) * 16 - images  # the image token is no text row
        assert ids.numel() == layer["probs_sample"].shape[0] == int(layer["load"].sum()) // 2
