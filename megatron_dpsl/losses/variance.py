"""The variance loss of Guo et al. (arXiv 2505.22323, Eq. 7): routing scores spread out over the
batch.

Paper form (the default), for n experts and the N valid tokens of a batch, with ``s_ij`` the
post-top-k routing score (Megatron's ``probs``: zero where expert j was not selected):

    L_v = -(1/n) Σ_j (1/N) Σ_i (s_ij - s̄_j)²,    s̄_j = (1/N) Σ_i s_ij

i.e. minus the mean over experts of each expert's (population) variance across the batch's tokens.
This is Eq. 7 divided by N (the paper sums over tokens): the coefficient then does not depend on
the micro-batch size or on how the tokens are sharded (docs/regularizers.md).

Reference-code form (``form="reference_code"``, the official repository's ``modeling_deepseek.py``):

    L_v = -(1/N) Σ_i Var_j(softmax(logits)_ij)      (unbiased, ÷(n-1); the full softmax before
    top-k)

i.e. per-token sharpness across experts, not a statistic over the batch.

Both losses are functions of per-rank partial sums, so a batch sharded over ranks needs only the sum
of those sums (``megatron_dpsl.router_losses`` does that reduction): ``*_sums`` return a float64
vector for one shard, ``*_from_sums`` turn the (summed) vector into the loss. float64 keeps the
one-pass variance ``E[s²] - E[s]²`` free of cancellation at any batch size. No process groups here.
"""

from __future__ import annotations

import torch

PAPER, REFERENCE_CODE = "paper", "reference_code"
FORMS = (PAPER, REFERENCE_CODE)


def _valid(num_tokens: int, padding_mask: torch.Tensor | None, device) -> torch.Tensor:
    """``[num_tokens, 1]`` float64 weights: 1 for a valid token, 0 for padding (True = padding)."""
    if padding_mask is None:
        return torch.ones(num_tokens, 1, dtype=torch.float64, device=device)
    return (~padding_mask.reshape(-1, 1).bool()).to(torch.float64)


def variance_sums(probs: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Partial sums of the paper form over this shard's tokens.

    Args:
        probs: ``[num_tokens, num_experts]`` post-top-k scores ``s_ij`` (differentiable).
        padding_mask: ``[num_tokens]`` bool, True = padding (left out), or None.

    Returns:
        ``[2 * num_experts + 1]`` float64: ``Σ_i s_ij`` (E values), ``Σ_i s_ij²`` (E values), ``N``.
    """
    w = _valid(probs.shape[0], padding_mask, probs.device)
    s = probs.to(torch.float64) * w
    return torch.cat([s.sum(0), (s * s).sum(0), w.sum(0)])


def variance_loss_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """The paper-form loss (a 0-dim float64 tensor) from :func:`variance_sums` added over the
    batch's shards.

    A batch with no valid token gives 0 (and a zero gradient).
    """
    num_experts = (sums.shape[0] - 1) // 2
    first, second, count = sums[:num_experts], sums[num_experts : 2 * num_experts], sums[-1]
    n = count.clamp(min=1.0)
    mean = first / n
    # per-expert population variance over tokens; its gradient is 2(s_ij - s̄_j)/N, the s̄ terms
    # cancel
    var = second / n - mean * mean
    return -var.mean()


def variance_loss(probs: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Paper form of L_v on one unsharded batch (no coefficient): ``[num_tokens, num_experts]`` ->
    0-dim float32."""
    return variance_loss_from_sums(variance_sums(probs, padding_mask)).to(torch.float32)


def sharpness_sums(logits: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Partial sums of the reference-code form over this shard's tokens.

    Args:
        logits: ``[num_tokens, num_experts]`` router logits (the softmax over all experts is taken
            here, in fp32, or
            float64 for float64 logits).
        padding_mask: ``[num_tokens]`` bool, True = padding (left out), or None.

    Returns:
        ``[2]`` float64: ``Σ_i Var_j(softmax(logits)_ij)`` (unbiased across experts) and ``N``.
    """
    if logits.shape[-1] < 2:
        raise ValueError(
            f"the reference-code variance loss needs >= 2 experts, got {logits.shape[-1]}"
        )
    w = _valid(logits.shape[0], padding_mask, logits.device)[:, 0]
    scores = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).to(
        torch.float64
    )
    var = scores.var(dim=-1, correction=1)  # [num_tokens], unbiased as in the reference code
    return torch.stack([(var * w).sum(), w.sum()])


def sharpness_loss_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """The reference-code loss (0-dim float64) from :func:`sharpness_sums` added over the batch's
    shards."""
    return -sums[0] / sums[1].clamp(min=1.0)


def variance_loss_reference_code(
    logits: torch.Tensor, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference-code form of L_v on one unsharded batch: ``[num_tokens, num_experts]`` logits ->
    0-dim float32."""
    return sharpness_loss_from_sums(sharpness_sums(logits, padding_mask)).to(torch.float32)
