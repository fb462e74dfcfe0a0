"""The orthogonality loss of Guo et al. (arXiv 2505.22323, Eq. 6): one token's k experts answer
differently.

Input: the *unweighted* outputs of each token's k selected experts, ``x_ia`` (``[num_tokens, k,
hidden]``; a slot whose expert was dropped is a zero vector and contributes nothing).

Paper form (the default), normalised by k·N for the N valid tokens:

    L_o = 1/(k·N) Σ_i Σ_a Σ_{b≠a} ‖ (⟨x_ia, x_ib⟩ / (⟨x_ib, x_ib⟩ + ε)) x_ib ‖²
        = 1/(k·N) Σ_i Σ_{a≠b} G_ab² · G_bb / (G_bb + ε)²,        G = per-token Gram matrix [k, k]

i.e. the squared length of the projection of each output onto each other output of the same token.
Eq. 6 sums over tokens without normalising; dividing by k·N makes the coefficient independent of the
batch size and equal to the reference code's scale (docs/regularizers.md).

Reference-code form (``form="reference_code"``, the official ``modeling_deepseek.py``): the squared
length of the projection of each output onto the *span* of the token's other k-1 outputs, through a
modified Gram-Schmidt basis normalised by ``‖v‖ + 1e-6``, averaged over k·N. For k = 2 the two forms
agree up to ε.

Both forms are functions of the Gram matrix alone: the only pass over ``hidden`` is one batched
matmul (``O(N·k²·hidden)``, in fp32 or wider); everything after it is ``[N, k, k]`` in float64.
``*_sum`` return the un-normalised sum over one shard's tokens; no process groups here.
"""

from __future__ import annotations

import torch

PAPER, REFERENCE_CODE = "paper", "reference_code"
FORMS = (PAPER, REFERENCE_CODE)

EPS = 1e-6
"""ε of Eq. 6 (the paper gives no value): keeps a zero output (a dropped slot) at zero loss and
gradient."""

GRAM_SCHMIDT_EPS = 1e-6
"""The reference code's ``v / (‖v‖ + 1e-6)``."""


def gram(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Per-token Gram matrices ``[num_tokens, k, k]`` (float64) of ``expert_outputs`` ``[num_tokens,
    k, hidden]``.

    The matmul runs in fp32 for half-precision inputs (the inner products of bf16 vectors need fp32
    accumulation and an fp32 result) and in the input's precision otherwise.
    """
    if expert_outputs.dim() != 3:
        raise ValueError(
            "expert_outputs must be [num_tokens, k, hidden], got shape "
            f"{tuple(expert_outputs.shape)}"
        )
    x = expert_outputs.to(torch.promote_types(expert_outputs.dtype, torch.float32))
    return torch.bmm(x, x.transpose(1, 2)).to(torch.float64)


def _weights(num_tokens: int, padding_mask: torch.Tensor | None, device) -> torch.Tensor:
    """``[num_tokens]`` float64: 1 for a valid token, 0 for padding (True = padding)."""
    if padding_mask is None:
        return torch.ones(num_tokens, dtype=torch.float64, device=device)
    return (~padding_mask.reshape(-1).bool()).to(torch.float64)


def orthogonality_sum(
    expert_outputs: torch.Tensor, padding_mask: torch.Tensor | None = None, eps: float = EPS
) -> torch.Tensor:
    """Eq. 6 summed over this shard's valid tokens (no normalisation): a 0-dim float64 tensor.

    Args:
        expert_outputs: ``[num_tokens, k, hidden]`` unweighted expert outputs (differentiable).
        padding_mask: ``[num_tokens]`` bool, True = padding (left out), or None.
        eps: ε of Eq. 6.
    """
    g = gram(expert_outputs)  # [B, k, k]
    k = g.shape[-1]
    diag = g.diagonal(dim1=-2, dim2=-1)  # [B, k]: ‖x_ib‖²
    # ‖(G_ab/(G_bb+ε)) x_ib‖² = G_ab² G_bb/(G_bb+ε)², with b the column index
    terms = g.square() * (diag / (diag + eps).square()).unsqueeze(-2)  # [B, k(a), k(b)]
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=g.device)
    per_token = (terms * off_diagonal).sum(dim=(-2, -1))  # [B]
    return (per_token * _weights(g.shape[0], padding_mask, g.device)).sum()


def _inner(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """⟨Σ_c u_c x_c, Σ_d v_d x_d⟩ = uᵀ G v per token: ``[B, k]``, ``[B, k]``, ``[B, k, k]`` ->
    ``[B]``."""
    return torch.einsum("tc,tcd,td->t", u, g, v)


def span_projection_sum(
    expert_outputs: torch.Tensor, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference code's loss summed over this shard's valid tokens, times k (no normalisation):
    0-dim float64.

    For each slot a: Σ_u ‖⟨u, x_a⟩ u‖² over the Gram-Schmidt basis u of the other slots, built as
    the code does (modified Gram-Schmidt, ``v / (‖v‖ + 1e-6)``). Basis vectors are kept as
    coefficients over the token's k outputs, so every inner product is read off the Gram matrix.
    """
    g = gram(expert_outputs)  # [B, k, k]
    num_tokens, k = g.shape[0], g.shape[-1]
    unit = torch.eye(k, dtype=g.dtype, device=g.device)
    per_token = g.new_zeros(num_tokens)
    for a in range(k):
        basis = []
        for b in range(k):
            if b == a:
                continue
            v = unit[b].expand(num_tokens, k)
            for u in basis:
                v = v - _inner(u, v, g).unsqueeze(-1) * u
            # clamp: q >= 0 mathematically; a zero vector (dropped slot) gets a zero gradient, not
            # inf
            norm = _inner(v, v, g).clamp(min=1e-30).sqrt()
            basis.append(v / (norm + GRAM_SCHMIDT_EPS).unsqueeze(-1))
        x_a = unit[a].expand(num_tokens, k)
        for u in basis:
            per_token = per_token + _inner(u, x_a, g).square() * _inner(u, u, g)
    return (per_token * _weights(num_tokens, padding_mask, g.device)).sum()


def orthogonality_loss(
    expert_outputs: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    form: str = PAPER,
    eps: float = EPS,
) -> torch.Tensor:
    """L_o on one unsharded batch (no coefficient): ``[num_tokens, k, hidden]`` -> 0-dim float32.

    Args:
        expert_outputs: unweighted outputs of each token's k selected experts.
        padding_mask: ``[num_tokens]`` bool, True = padding, or None.
        form: ``"paper"`` (Eq. 6 / (k·N)) or ``"reference_code"`` (span projection / (k·N)).
        eps: ε of Eq. 6 (paper form only).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    k = expert_outputs.shape[1]
    total = (
        orthogonality_sum(expert_outputs, padding_mask, eps)
        if form == PAPER
        else span_projection_sum(expert_outputs, padding_mask)
    )
    count = (
        _weights(expert_outputs.shape[0], padding_mask, expert_outputs.device).sum().clamp(min=1.0)
    )
    return (total / (k * count)).to(torch.float32)
