"""AC feature weights (megatron_dpsl.routing.ac.clustering) against plain float64 loops, the
official code's
formula, and the split into two reducible passes. torch only (no Megatron)."""

from __future__ import annotations

import pytest
import torch
from support import ac_official

from megatron_dpsl.routing.ac.clustering import (
    adaptive_clustering_weights,
    cluster_abs_dev_sums,
    cluster_means,
    cluster_sums,
    feature_weights,
    token_scales,
)

N, H, E = 40, 6, 5


def data(seed=0, n=N, empty=(3,), unassigned=4):
    """hidden [n, H] float64, clusters [n] with the ``empty`` experts unused and ``unassigned``
    tokens at -1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64) * torch.linspace(
        0.2, 3.0, H, dtype=torch.float64
    )
    used = [k for k in range(E) if k not in empty]
    clusters = torch.tensor(used, dtype=torch.long)[torch.randint(0, len(used), (n,), generator=g)]
    clusters[torch.randperm(n, generator=g)[:unassigned]] = -1
    return hidden, clusters


def plain_weights(hidden, clusters, num_experts, eps, clip, norm):
    """The module docstring's formulas, one cluster at a time (independent of the
    implementation)."""
    ks = [k for k in range(num_experts) if (clusters == k).any()]
    w = {}
    for k in ks:
        members = hidden[clusters == k]
        mad = (members - members.mean(0)).abs().mean(0)
        w[k] = 1.0 / (mad + eps)
    stacked = torch.stack([w[k] for k in ks])  # [non-empty, H]
    pre_clip_mean = stacked.mean()
    if clip is not None:
        stacked = torch.minimum(stacked, clip * pre_clip_mean)
    if norm == "feature":
        stacked = stacked / stacked.mean(0, keepdim=True)
    elif norm == "cluster":
        stacked = stacked / stacked.mean(1, keepdim=True)
    else:
        stacked = stacked / pre_clip_mean
    out = torch.ones(num_experts, hidden.shape[1], dtype=hidden.dtype)
    for i, k in enumerate(ks):
        out[k] = stacked[i]
    return out


@pytest.mark.parametrize("norm", ["feature", "cluster", "global"])
@pytest.mark.parametrize("clip", [None, 10.0, 1.5])
def test_weights_match_plain_float64_loops(norm, clip):
    hidden, clusters = data()
    got = adaptive_clustering_weights(hidden, clusters, E, eps=1e-4, clip=clip, norm=norm)
    want = plain_weights(hidden, clusters, E, 1e-4, clip, norm)
    assert got.dtype == torch.float64
    # float64, the same few operations summed in a different order
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if clip == 1.5:  # the cap binds on this data: a test of the clip, not a no-op
        unclipped = adaptive_clustering_weights(hidden, clusters, E, eps=1e-4, clip=None, norm=norm)
        assert not torch.allclose(got, unclipped)


def previous_topk(clusters, seed=0):
    """A previous layer's top-2 indices ``[n, 2]`` whose column 0 is ``clusters`` (what the official
    code reads its clusters from)."""
    g = torch.Generator().manual_seed(seed)
    second = (clusters + 1 + torch.randint(0, E - 1, clusters.shape, generator=g)) % E
    return torch.stack([clusters, second], dim=1)


def tight_and_loose(tight: bool, n=400, seed=5):
    """Every cluster non-empty (ids 0..E-1). Loose: every feature Gaussian with one scale, so all
    MADs are close and 1.5·mean(W) caps nothing. Tight: each cluster is tight (×0.01) on one
    feature of its own, so those weights are ~100× the others and the cap binds."""
    g = torch.Generator().manual_seed(seed)
    clusters = torch.arange(n) % E
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    if tight:
        for k in range(E):
            hidden[clusters == k, k % H] *= 0.01
    return hidden, clusters


@pytest.mark.filterwarnings("ignore:index_reduce")  # the official code's call; beta in torch
@pytest.mark.parametrize("tight", [False, True], ids=["loose_clip_inactive", "tight_clip_active"])
def test_global_norm_is_the_official_swin_compute_cosa(tight):
    """``--moe-ac-weight-norm global --moe-ac-clip 1.5`` = ``compute_cosa`` (Swin): the clip at
    1.5 × the pre-clip mean and the division by that same pre-clip mean (issue 25)."""
    hidden, clusters = tight_and_loose(tight)
    want = ac_official.compute_cosa(hidden, previous_topk(clusters))  # [n, H]
    ours = adaptive_clustering_weights(hidden, clusters, E, clip=1.5, norm="global")
    # float64, the same operations with sums in another order (index_add vs index_reduce)
    torch.testing.assert_close(token_scales(ours, clusters), want, rtol=1e-12, atol=1e-12)
    unclipped = adaptive_clustering_weights(hidden, clusters, E, clip=None, norm="global")
    # the data does what its name says: the clip binds on tight features only
    assert torch.equal(ours, unclipped) != tight
    if tight:  # where the clip binds, the clipped weights' mean is far from the pre-clip mean
        assert ours.mean() < 0.9


@pytest.mark.filterwarnings("ignore:index_reduce")
@pytest.mark.parametrize("tight", [False, True], ids=["loose", "tight"])
def test_feature_norm_is_the_official_language_model_code(tight):
    """The default (``feature``, clip 10, eps 1e-4) = ``compute_W_var`` with ``--use-var --mad``:
    clip at 10 × the pre-clip mean, then each feature divided by its mean over clusters."""
    hidden, clusters = tight_and_loose(tight)
    want = ac_official.compute_w_var(hidden, previous_topk(clusters))
    ours = adaptive_clustering_weights(hidden, clusters, E)  # defaults: eps 1e-4, clip 10
    torch.testing.assert_close(token_scales(ours, clusters), want, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:index_reduce")
@pytest.mark.parametrize("recipe", ["swin", "lm"])
def test_empty_clusters_are_where_we_differ_from_the_official_code(recipe):
    """Our choice (docs/ac_router.md): an expert that received no token is no cluster. The official
    code gives it a row of 1/1e-4 (k = largest id + 1) that enters the mean; ours equals the
    official code run on the same tokens with the empty cluster's id removed (ids compacted)."""
    official, kw = {
        "swin": (ac_official.compute_cosa, dict(clip=1.5, norm="global")),
        "lm": (ac_official.compute_w_var, dict()),
    }[recipe]
    hidden, clusters = data(n=200, empty=(2,), unassigned=0)
    ours = token_scales(adaptive_clustering_weights(hidden, clusters, E, **kw), clusters)
    compact = clusters - (clusters > 2).long()  # ids 0, 1, 3, 4 -> 0, 1, 2, 3
    torch.testing.assert_close(
        ours, official(hidden, previous_topk(compact)), rtol=1e-12, atol=1e-12
    )
    with_empty_row = official(hidden, previous_topk(clusters))
    assert (ours - with_empty_row).abs().max() > 0.1  # the 1e4 row moves every weight


def test_empty_clusters_do_not_move_the_weights():
    """Our choice (docs/ac_router.md): more experts with no tokens leave every weight unchanged (the
    official code would average their constant 1/eps rows into the clip and the normalisation)."""
    hidden, clusters = data(empty=(3,))
    few = adaptive_clustering_weights(hidden, clusters, E)
    many = adaptive_clustering_weights(hidden, clusters, E + 3)
    torch.testing.assert_close(many[:E], few, rtol=0, atol=0)
    assert torch.equal(many[E:], torch.ones(3, H, dtype=torch.float64))
    assert torch.equal(few[3], torch.ones(H, dtype=torch.float64))


def test_unassigned_tokens_are_ignored_and_get_unit_scales():
    hidden, clusters = data(unassigned=6)
    w = adaptive_clustering_weights(hidden, clusters, E)
    moved = hidden.clone()
    moved[clusters == -1] = 1e3  # wild values on tokens without a cluster change nothing
    assert torch.equal(adaptive_clustering_weights(moved, clusters, E), w)
    m = token_scales(w, clusters)
    assert m.shape == (N, H)
    assert torch.equal(m[clusters == -1], torch.ones(6, H, dtype=torch.float64))
    assert torch.equal(m[clusters >= 0], w[clusters[clusters >= 0]])


def test_tight_feature_gets_the_larger_weight():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(200, 4, generator=g, dtype=torch.float64)
    clusters = torch.arange(200) % 2
    hidden[clusters == 0, 1] *= 0.01  # cluster 0 is tight along feature 1
    w = adaptive_clustering_weights(hidden, clusters, 2, clip=None, norm="cluster")
    assert w[0, 1] > 10 * w[0, [0, 2, 3]].max()
    assert w[1].max() / w[1].min() < 1.5  # cluster 1 has no tight feature


@pytest.mark.parametrize("norm", ["feature", "cluster", "global"])
def test_normalisations_have_mean_one(norm):
    """``global`` divides by the pre-clip mean: mean one when the clip caps nothing (here: none)."""
    hidden, clusters = data()
    w = adaptive_clustering_weights(hidden, clusters, E, norm=norm, clip=None)
    used = torch.tensor([k for k in range(E) if (clusters == k).any()])
    rows = w[used]
    mean = {"feature": rows.mean(0), "cluster": rows.mean(1), "global": rows.mean()}[norm]
    torch.testing.assert_close(mean, torch.ones_like(mean), rtol=1e-12, atol=1e-12)


def test_two_passes_summed_over_shards_equal_one_process():
    """What the router's all-reduce does: per-shard partial sums, added, give the unsharded
    weights."""
    hidden, clusters = data(n=60)
    shards = [slice(0, 17), slice(17, 40), slice(40, 60)]  # unequal on purpose
    counts = sum(cluster_sums(hidden[s], clusters[s], E)[0] for s in shards)
    sums = sum(cluster_sums(hidden[s], clusters[s], E)[1] for s in shards)
    means = cluster_means(counts, sums)
    dev = sum(cluster_abs_dev_sums(hidden[s], clusters[s], means) for s in shards)
    sharded = feature_weights(counts, dev)
    torch.testing.assert_close(
        sharded, adaptive_clustering_weights(hidden, clusters, E), rtol=1e-12, atol=1e-12
    )


def test_all_reduce_hook_sees_both_passes():
    hidden, clusters = data()
    seen = []

    def double(t):  # every token counted twice: means and MADs are unchanged
        seen.append(tuple(t.shape))
        t.mul_(2)

    w = adaptive_clustering_weights(hidden, clusters, E, all_reduce=double)
    assert seen == [(E, H + 1), (E, H)]  # counts ride with the sums: two collectives per call
    torch.testing.assert_close(
        w, adaptive_clustering_weights(hidden, clusters, E), rtol=1e-12, atol=1e-12
    )


def test_statistics_in_float32_without_gradient():
    hidden, clusters = data()
    x = hidden.to(torch.bfloat16).requires_grad_(True)
    w = adaptive_clustering_weights(x, clusters, E)
    assert w.dtype == torch.float32 and not w.requires_grad


def test_bad_norm_names_the_choices():
    hidden, clusters = data()
    with pytest.raises(ValueError, match=r"\['feature', 'cluster', 'global'\]"):
        adaptive_clustering_weights(hidden, clusters, E, norm="rows")
