"""Adaptive Clustering (AC) feature weights (Nielsen et al., "Tight Clusters Make Specialized
Experts", ICLR 2025): the math, free of process groups and of Megatron.

Notation: ``N`` tokens, ``H`` features (the router's input width), ``E`` experts, which are also the
clusters. ``hidden`` ``[N, H]`` is the current MoE layer's router input; ``clusters`` ``[N]``
(int64) is each token's cluster, the expert the *previous* MoE layer gave it the largest routing
weight (``-1``: no cluster, e.g. a padding token). With ``n_k`` the size of cluster k:

- ``μ_k = (1/n_k) Σ_{c(t)=k} h_t`` and ``s_k = (1/n_k) Σ_{c(t)=k} |h_t − μ_k|``: per-feature mean
  and mean absolute deviation (MAD) of each cluster, ``[E, H]``;
- ``W = 1 / (s + eps)``: large where the cluster is tight;
- ``W̄ = mean(W)`` (before the clip) and ``W = min(W, clip · W̄)``: no feature dominates because
  one cluster happens to be constant on it;
- ``W = W / norm(W)``: ``"feature"`` divides each feature by its mean over clusters after the clip
  (each column has mean 1; the official language-model code), ``"cluster"`` each cluster by its
  mean over features after the clip (each ``M_k`` has mean 1), ``"global"`` everything by the
  pre-clip ``W̄`` (the official Swin code's ``compute_cosa``: mean 1 only when the clip is inactive);
- ``m_t = W[c(t)]`` ``[N, H]`` (``1`` for tokens without a cluster): the router scores ``m_t ⊙
  h_t``.

Means, the clip and the normalisation run over the *non-empty* clusters only (docs/ac_router.md:
the official code also averages the constant ``1/eps`` rows of empty clusters). Everything here
is statistics: call it under ``torch.no_grad()`` (the router does); no host synchronisation.

The two token passes (sums, then absolute deviations about the mean) are separate functions so
that a caller can all-reduce the partial sums of each pass over the ranks holding other tokens of
the batch (``all_reduce`` argument of :func:`adaptive_clustering_weights`); the result then equals
a single process that holds every token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_dpsl.config.ac import WEIGHT_NORMS


def _rows(clusters: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Row index per token ``[N]``: its cluster, or ``num_experts`` (a discarded spare row) for
    -1."""
    return torch.where(clusters >= 0, clusters, torch.full_like(clusters, num_experts))


def cluster_sums(
    hidden: torch.Tensor, clusters: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """First pass: token counts ``[E]`` and feature sums ``[E, H]`` per cluster (dtype of
    ``hidden``)."""
    rows = _rows(clusters, num_experts)
    sums = hidden.new_zeros(num_experts + 1, hidden.shape[1]).index_add_(0, rows, hidden)
    counts = hidden.new_zeros(num_experts + 1).index_add_(0, rows, hidden.new_ones(hidden.shape[0]))
    return counts[:num_experts], sums[:num_experts]


def cluster_means(counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """``μ`` ``[E, H]`` from :func:`cluster_sums` (0 for empty clusters)."""
    return sums / counts.clamp(min=1).unsqueeze(1)


def cluster_abs_dev_sums(
    hidden: torch.Tensor, clusters: torch.Tensor, means: torch.Tensor
) -> torch.Tensor:
    """Second pass: ``Σ_{c(t)=k} |h_t − μ_k|`` ``[E, H]``."""
    num_experts = means.shape[0]
    rows = _rows(clusters, num_experts)
    padded = torch.cat([means, means.new_zeros(1, means.shape[1])])  # the spare row for c = -1
    dev = (hidden - padded[rows]).abs()
    return hidden.new_zeros(num_experts + 1, hidden.shape[1]).index_add_(0, rows, dev)[:num_experts]


def feature_weights(
    counts: torch.Tensor,
    abs_dev_sums: torch.Tensor,
    *,
    eps: float = 1e-4,
    clip: float | None = 10.0,
    norm: str = "feature",
) -> torch.Tensor:
    """The per-cluster feature weights ``W`` ``[E, H]`` from counts ``[E]`` and ``Σ|h − μ|`` ``[E,
    H]``.

    Args:
        eps: added to the MAD before inverting (the official code's 1e-4).
        clip: cap at ``clip ×`` the mean weight of the non-empty clusters; ``None``: no cap.
        norm: ``"feature"``, ``"cluster"`` or ``"global"`` (module docstring).

    Rows of empty clusters are 1 (no token reads them).
    """
    if norm not in WEIGHT_NORMS:
        raise ValueError(f"norm must be one of {list(WEIGHT_NORMS)}, got {norm!r}")
    nonempty = counts > 0  # [E]
    mad = abs_dev_sums / counts.clamp(min=1).unsqueeze(1)
    w = 1.0 / (mad + eps)
    rows = nonempty.unsqueeze(1).to(w.dtype)  # [E, 1]: 1 for clusters that have tokens
    num_rows = rows.sum().clamp(min=1)
    # the mean before the clip: the clip's reference in every recipe, and "global"'s divisor (the
    # official Swin code divides by this same pre-clip mean, not by the clipped weights' mean)
    w_mean = (w * rows).sum() / (num_rows * w.shape[1])
    if clip is not None:
        w = torch.minimum(w, clip * w_mean)
    if norm == "feature":
        w = w / ((w * rows).sum(0, keepdim=True) / num_rows)
    elif norm == "cluster":
        w = w / w.mean(1, keepdim=True)
    else:
        w = w / w_mean
    return torch.where(nonempty.unsqueeze(1), w, torch.ones_like(w))


def token_scales(weights: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """``m_t = W[c(t)]`` ``[N, H]``; 1 for tokens without a cluster (``c(t) = -1``)."""
    rows = _rows(clusters, weights.shape[0])
    padded = torch.cat([weights, weights.new_ones(1, weights.shape[1])])
    return padded[rows]


def adaptive_clustering_weights(
    hidden: torch.Tensor,
    clusters: torch.Tensor,
    num_experts: int,
    *,
    eps: float = 1e-4,
    clip: float | None = 10.0,
    norm: str = "feature",
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """``W`` ``[E, H]`` for ``hidden`` ``[N, H]`` grouped by ``clusters`` ``[N]``.

    Args:
        all_reduce: in-place sum of a tensor over the ranks holding the batch's other tokens,
            applied to each pass's partial sums (``None``: this process holds every token).

    Statistics are computed in float32 (float64 if ``hidden`` is float64) and carry no gradient.
    """
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    hidden = hidden.detach().to(dtype)
    counts, sums = cluster_sums(hidden, clusters, num_experts)
    if all_reduce is not None:
        packed = torch.cat([sums, counts.unsqueeze(1)], dim=1)  # one collective for both
        all_reduce(packed)
        sums, counts = packed[:, :-1], packed[:, -1]
    dev = cluster_abs_dev_sums(hidden, clusters, cluster_means(counts, sums))
    if all_reduce is not None:
        all_reduce(dev)
    return feature_weights(counts, dev, eps=eps, clip=clip, norm=norm)
