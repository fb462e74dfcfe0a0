"""The two paper reproductions in examples/: shaping (Fig. 2 / App. C.1) and SwAV clustering (Table
1 / App. B)."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import torch
from scipy import stats

EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


shaping = _load("shaping_demo")
swav = _load("swav_clustering")

# ---------------------------------------------------------------- shaping (Fig. 6 priors)

# Worst per-category KS distance (over 2 sources x 3 categories) after the paper's 100 Adam steps
# (lr 0.1), 1000 points per source, priors Dir(5,5,5) / Dir(0.2,0.2,0.2). Measured over seeds 0-7:
# 0.071-0.075 (spread ±0.002; always the sparse Dir(0.2) source, whose lower tail needs p ~ 1e-8
# that 100 steps do not fully reach; Dir(5,5,5) ends at <= 0.007). At initialisation the worst KS is
# 0.47, so the check fails if shaping breaks.
# 0.10 leaves ~0.025 over the worst seed, > 10 seed-spreads. For scale: the 5% KS critical value for
# n = 1000 is 1.358/sqrt(1000) = 0.043, which the sparse source reaches at about 200 steps (measured
# 0.038-0.044).
KS_THRESHOLD = 0.10


@pytest.fixture(scope="module")
def shaped():
    return shaping.run_shaping(steps=100, num_points=1000, seed=0)


def test_shaping_reaches_target_beta(shaped):
    ks_init, ks_final = shaped["ks_init"], shaped["ks_final"]
    assert ks_final.shape == (2, 3)
    assert float(ks_final.max()) < KS_THRESHOLD, ks_final
    assert (
        float(ks_init.max()) > 3 * KS_THRESHOLD
    )  # the start is far from the target: the check can fail
    assert shaped["losses"][-1] < 0.05 * shaped["losses"][0]


def test_shaping_ks_matches_scipy(shaped):
    # the KS figures the demo prints are the textbook statistic (independent SciPy reference)
    alpha, gid, probs = shaped["alpha"], shaped["group_ids"], shaped["probs_final"].double()
    for s in range(alpha.shape[0]):
        a = alpha[s].numpy()
        for k in range(alpha.shape[1]):
            ref = stats.kstest(
                probs[gid == s, k].numpy(), stats.beta(a[k], a.sum() - a[k]).cdf
            ).statistic
            # measured ~5e-12 in float64; 1e-6 leaves room for a tabulated CDF and is far below the
            # KS values that matter here (>= 1e-3)
            assert abs(float(shaped["ks_final"][s, k]) - ref) < 1e-6


def test_shaping_final_sample_is_dirichlet_like(shaped):
    # points live on the simplex and the two sources really took different shapes (sparse vs
    # central)
    probs, gid = shaped["probs_final"], shaped["group_ids"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)))
    max_prob = probs.max(-1).values
    # E[max p] ~0.46 under Dir(5,5,5) and ~0.82 under Dir(0.2,0.2,0.2) (Monte Carlo): ordering, not
    # values
    assert float(max_prob[gid == 1].mean()) > float(max_prob[gid == 0].mean()) + 0.2


def test_shaping_cli_writes_png(tmp_path, capsys):
    shaping.main(["--steps", "2", "--num-points", "50", "--out", str(tmp_path), "--dpi", "30"])
    png = tmp_path / "shaping_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "worst KS final" in capsys.readouterr().out


def test_shaping_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_points"):
        shaping.run_shaping(steps=1, num_points=1)


# ---------------------------------------------------------------- SwAV clustering


def test_cluster_accuracy_hungarian():
    labels = np.array([0, 0, 0, 1, 1, 2])
    assert (
        swav.cluster_accuracy(np.array([2, 2, 2, 0, 0, 1]), labels) == 1.0
    )  # any relabelling is perfect
    # best matching 1->0, 0->1, 2->2 gets 2 + 2 + 1 of 6 right
    assert swav.cluster_accuracy(np.array([1, 1, 0, 0, 0, 2]), labels) == pytest.approx(5 / 6)


@pytest.mark.parametrize("name", sorted(swav.SETTINGS))
def test_make_data_sizes(name):
    x, y = swav.make_data(name, num_points=1500, seed=3)
    ratio = swav.SETTINGS[name].ratio
    assert x.shape == (1500, 2) and y.shape == (1500,)
    counts = torch.bincount(y, minlength=3).tolist()
    assert sum(counts) == 1500
    assert all(abs(c - 1500 * r / sum(ratio)) < 1 for c, r in zip(counts, ratio))


def test_make_data_rejects_unknown_setting():
    with pytest.raises(ValueError, match="setting must be one of"):
        swav.make_data("concentric")


def test_sinkhorn_equipartition():
    scores = torch.randn(300, 3) * 0.3 + torch.tensor([0.5, 0.0, -0.5])
    q = swav.sinkhorn(scores, eps=0.05, iters=50)
    torch.testing.assert_close(q.sum(1), torch.ones(300))  # each point's code is a distribution
    # converged Sinkhorn gives each cluster N/K points of mass (the equipartition SwAV relies on)
    torch.testing.assert_close(q.sum(0), torch.full((3,), 100.0), rtol=1e-3, atol=0)


def test_dpsl_term_shapes_swav_probabilities():
    # wiring check: adding λ·DPSL for the last 10 epochs lowers Eq. 4 (the distance of the final
    # cluster probabilities to the prior) below SwAV alone. Measured for this seed: 0.372 (SwAV) ->
    # 0.181 (λ=1). Over seeds 0-2 and all settings λ=1 gives 0.49-0.93x of SwAV's value, except one
    # run (0.996x) where the fixed prior order meets a mismatched cluster index; λ=0.01 gives
    # 0.992-1.0x, hence the strong λ here.
    from megatron_dpsl import dpsl_loss

    alpha = swav.SETTINGS["non-overlapping"].alpha
    x, _ = swav.make_data("non-overlapping", seed=0)
    base = swav.train_swav(x, None, seed=0, return_probs=True)
    shaped_probs = swav.train_swav(
        x, alpha, seed=0, dpsl_lambda=1.0, prior_order="fixed", return_probs=True
    )
    assert base.shape == shaped_probs.shape == (1500, 3)
    d_base, d_shaped = (float(dpsl_loss(p, torch.tensor(alpha))) for p in (base, shaped_probs))
    assert d_shaped < 0.75 * d_base, (d_base, d_shaped)


def test_swav_quick_one_setting(capsys):
    table = swav.main(["--quick", "--settings", "non-overlapping"])
    rows = table["non-overlapping"]
    assert set(rows) == {"SwAV", "SwAV+DPSL λ=0.01 (aligned)"}
    for row in rows.values():
        assert len(row["acc"]) == 1 and 1 / 3 <= row["acc"][0] <= 1.0
    assert "| non-overlapping |" in capsys.readouterr().out


@pytest.mark.slow
def test_swav_one_seed_with_plot(tmp_path):
    table = swav.main(["--seeds", "0", "--out", str(tmp_path)])
    assert set(table) == set(swav.SETTINGS)
    assert (tmp_path / "swav_clustering.png").read_bytes()[:4] == b"\x89PNG"
