"""Held-out language metrics of a trained ``LLaVAModel`` on the procedural shapes (``vlm_data``).

Both are teacher-forced on the ``valid`` split (images never seen in training):

* **caption loss**: mean cross entropy per caption token (``<eos>`` included) over the caption rows;
* **answer accuracy**: the share of question rows whose every answer word is the argmax of the
  logits at the position before it (``<eos>`` not counted).

Collective under expert parallelism: every rank must call it with the same arguments (each runs the
same rows; the experts are split over the ranks).
"""

from __future__ import annotations

import torch

from megatron_dpsl.train import vlm_data


def _row_scores(log_probs: torch.Tensor, sample: vlm_data.Sample, img_seq_len: int):
    """(target log-probabilities ``[T]``, argmax hits ``[T]`` bool) of one row's targets.

    ``log_probs`` ``[S, V]`` over the combined sequence; text token ``j`` sits at combined position
    ``j + img_seq_len - 1`` when the row starts with its image, else at ``j``; token ``j`` is
    predicted at the position of token ``j - 1``.
    """
    offset = img_seq_len - 1 if sample.image is not None else 0
    end = sample.tokens.index(vlm_data.EOS)
    targets = torch.tensor(sample.tokens[sample.target_start : end + 1], device=log_probs.device)
    positions = torch.arange(sample.target_start - 1, end, device=log_probs.device) + offset
    rows = log_probs[positions]
    return rows.gather(1, targets[:, None]).squeeze(1), rows.argmax(-1) == targets


def held_out_metrics(
    model,
    *,
    seed: int,
    num_samples: int,
    micro_batch_size: int,
    img_seq_len: int,
    device,
) -> dict[str, float]:
    """``{"caption_loss", "answer_accuracy", "captions", "questions"}`` over the first
    ``num_samples`` rows of the ``valid`` split (``model``: the unwrapped ``LLaVAModel``; left in
    train mode)."""
    nll: list[torch.Tensor] = []
    hits: list[bool] = []
    model.eval()
    with torch.no_grad():
        for first in range(0, num_samples, micro_batch_size):
            rows = range(first, min(first + micro_batch_size, num_samples))
            samples = [vlm_data.make_sample(seed, "valid", i) for i in rows]
            batch = {k: v.to(device) for k, v in vlm_data.collate(samples, img_seq_len).items()}
            logits, _ = model(
                batch["images"],
                batch["tokens"],
                batch["position_ids"],
                batch["attention_mask"],
                num_image_tiles=batch["num_image_tiles"],
            )  # [b, S, V]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            for row, sample in enumerate(samples):
                logp, hit = _row_scores(log_probs[row], sample, img_seq_len)
                if sample.kind == "caption":
                    nll.append(-logp)
                elif sample.kind == "question":
                    hits.append(bool(hit[:-1].all()))  # the answer words, not <eos>
    model.train()
    return {
        "caption_loss": float(torch.cat(nll).mean()) if nll else float("nan"),
        "answer_accuracy": sum(hits) / len(hits) if hits else float("nan"),
        "captions": len(nll),
        "questions": len(hits),
    }
