"""The official Adaptive Clustering code, transcribed line by line (Fsoft-AIC/Tight-Clusters-Make-
Specialized-Experts, commit 4762d61), for tests that compare ``megatron_dpsl.routing.ac`` with it.

Only what the released recipes run: the ``mad`` branch, no ``mix_weights``. The one change is the
dtype of the ``torch.zeros`` buffers, which follows ``tokens`` (the originals are float32 on the
tokens' device) so that float64 comparisons can be exact. Statements are kept in the original
order, including the ``k = max + 1`` row count: empty clusters below the largest id get rows.
"""

from __future__ import annotations

import torch


def _mad_weights(tokens: torch.Tensor, top_cluster_assignments: torch.Tensor) -> torch.Tensor:
    """The shared head of both functions: ``1 / (MAD + 1e-4)`` ``[k, d]``."""
    n, d = tokens.shape
    k = top_cluster_assignments.max().item() + 1
    zeros = dict(device=tokens.device, dtype=tokens.dtype)
    mean_dimwise_clusterwise = torch.zeros((k, d), **zeros).index_reduce(
        0, top_cluster_assignments, tokens, "mean", include_self=False
    )
    centered_tokens = torch.abs(tokens - mean_dimwise_clusterwise[top_cluster_assignments, :])
    W_mad = torch.zeros((k, d), **zeros).index_reduce(  # noqa: N806 - the original's name
        0, top_cluster_assignments, centered_tokens, "mean", include_self=False
    )
    return 1 / (W_mad + 1e-4)


def compute_cosa(tokens: torch.Tensor, cluster_assignments: torch.Tensor) -> torch.Tensor:
    """``SwinTransformerBlock.compute_cosa`` (image-classification/models/swin_transformer_cosa.py,
    ``self.mad`` True): per-token weights ``[n, d]``.

    ``cluster_assignments`` is the previous MoE layer's ``topk_indices`` ``[n, top_k]`` (Tutel's
    ``torch.topk(scores, top_k, dim=1)``, sorted): column 0 is each token's cluster.
    """
    with torch.no_grad():
        top_cluster_assignments = cluster_assignments[:, 0]
        W = _mad_weights(tokens.detach(), top_cluster_assignments)  # noqa: N806
        W_mean = W.mean()  # noqa: N806
        top_clamp = 1.5 * W_mean
        W = torch.clamp(W, max=top_clamp)  # noqa: N806
        W = W / W_mean  # noqa: N806 - "global mean feature scaling", by the pre-clip mean
        return W[top_cluster_assignments, :]


def compute_w_var(tokens: torch.Tensor, cluster_assignments: torch.Tensor) -> torch.Tensor:
    """``COSAGate_Balance.compute_W_var`` (language-modeling/custom_gates.py) with the released LM
    scripts' ``--use-var --mad``: per-token weights ``[n, d]``.

    ``cluster_assignments`` is the previous gate's ``gate_top_k_idx`` ``[n, top_k]`` (there an
    unsorted ``torch.topk``); column 0 is taken as the cluster.
    """
    with torch.no_grad():
        top_cluster_assignments = cluster_assignments[:, 0]
        W = _mad_weights(tokens.detach(), top_cluster_assignments)  # noqa: N806
        W_mean = W.mean()  # noqa: N806
        clip_threshold = 10 * W_mean
        W = torch.clamp(W, max=clip_threshold)  # noqa: N806
        W = W / W.mean(dim=0)  # noqa: N806 - "dimwise meanscaling", after the clip
        return W[top_cluster_assignments, :]
