"""SwAV on 2-D synthetic clusters, with and without DPSL in the last epochs (paper Table 1 /
Appendix B).

    # 3 settings x 10 seeds x {SwAV, +DPSL}, table + PNG
    python examples/swav_clustering.py
    python examples/swav_clustering.py --quick           # 1 seed per setting (smoke run, seconds)
    python examples/swav_clustering.py --seeds 0 1 2 --lambdas 0.01 0.1 1 \\
        --out outputs/swav_clustering

What the paper states (Appendix B) and this script follows: three settings of 1500 2-D points in 3
clusters (non-overlapping 4:1:1, isotropic σ=0.8 at (0,0), (5,5), (−5,5); overlapping 5:2:1 on an
equilateral triangle of radius 2.4, σ ∈ {1.0, 0.8, 0.6}, elongations {1.0, 2.5, 1.5}; elongated
5:3:1, radius 3.8, σ ∈ {0.7, 1.0,
0.5}, elongations {3.0, 4.0, 2.0}); an MLP 2→64→32→3 with ReLU and a softmax over 3 clusters; Adam,
lr 0.01, full batch (N=1500), 50 epochs; SwAV alone for the first 40 epochs, then + λ·DPSL with
λ=0.01 and α=(2,1,1) (non-overlapping) or α=(1.5,1.0,0.5) (overlapping, elongated). Accuracy:
Hungarian matching.

Everything else is our guess; docs/reproductions.md lists each guess (see ``GUESSES`` below, printed
by the script). In particular the paper does not say how the asymmetric prior's category order is
matched to the network's (permutation-symmetric) cluster indices: ``--prior-order aligned``
(default) permutes α once, when DPSL switches on, so that the largest α goes to the currently
largest cluster; ``fixed`` uses α as written.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from megatron_dpsl import dpsl_loss

GUESSES = {
    "data seed": "each seed draws its own data set, initialisation and augmentations",
    "sizes": "1500 × ratio, rounded down; the remainder goes to the largest cluster",
    "anisotropic covariance": "std σ·elongation along the major axis, σ across it",
    "orientation": "major axis tangent to the triangle's circumcircle "
    "(vertices at 90°, 210°, 330°)",
    "input scaling": "inputs standardised (zero mean, unit variance per coordinate)",
    "embedding": "2→64 ReLU →32, L2-normalised; the '→3' layer is SwAV's prototype matrix "
    "(no bias), re-normalised after every step",
    "temperature": "τ = 0.1 (SwAV default)",
    "sinkhorn": "ε = 0.05, 3 iterations (SwAV defaults), uniform cluster marginals",
    "views": "two views per step, x + N(0, 0.1²) in standardised units",
    "dpsl input": "softmax(scores/τ) of the un-augmented points "
    "(the probabilities that give the predictions)",
    "prior order": "aligned: α permuted once, when DPSL switches on, "
    "to the order of the current cluster sizes",
}


@dataclass(frozen=True)
class Setting:
    name: str
    ratio: tuple
    alpha: tuple


SETTINGS = {
    "non-overlapping": Setting("non-overlapping", (4, 1, 1), (2.0, 1.0, 1.0)),
    "overlapping": Setting("overlapping", (5, 2, 1), (1.5, 1.0, 0.5)),
    "elongated": Setting("elongated", (5, 3, 1), (1.5, 1.0, 0.5)),
}


def cluster_sizes(ratio: Sequence[int], num_points: int) -> list:
    sizes = [num_points * r // sum(ratio) for r in ratio]
    sizes[int(np.argmax(ratio))] += num_points - sum(sizes)
    return sizes


def make_data(setting: str, num_points: int = 1500, seed: int = 0):
    """Returns ``x`` ``[num_points, 2]`` float32 (raw coordinates) and ``y`` ``[num_points]`` int64
    labels."""
    if setting not in SETTINGS:
        raise ValueError(f"make_data: setting must be one of {sorted(SETTINGS)}, got {setting!r}")
    rng = np.random.default_rng(seed)
    sizes = cluster_sizes(SETTINGS[setting].ratio, num_points)
    if setting == "non-overlapping":
        centres = [(0.0, 0.0), (5.0, 5.0), (-5.0, 5.0)]
        parts = [rng.normal(c, 0.8, size=(n, 2)) for c, n in zip(centres, sizes)]
    else:
        radius, sigmas, elong = {
            "overlapping": (2.4, (1.0, 0.8, 0.6), (1.0, 2.5, 1.5)),
            "elongated": (3.8, (0.7, 1.0, 0.5), (3.0, 4.0, 2.0)),
        }[setting]
        parts = []
        for k, n in enumerate(sizes):
            theta = math.radians(90.0 + 120.0 * k)
            centre = radius * np.array([math.cos(theta), math.sin(theta)])
            tangent = np.array([-math.sin(theta), math.cos(theta)])
            normal = np.array([math.cos(theta), math.sin(theta)])
            z = rng.normal(size=(n, 2)) * np.array([sigmas[k] * elong[k], sigmas[k]])
            parts.append(centre + z[:, :1] * tangent + z[:, 1:] * normal)
    x = np.concatenate(parts).astype(np.float32)
    y = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)])
    return torch.from_numpy(x), torch.from_numpy(y).long()


def cluster_accuracy(pred: np.ndarray, labels: np.ndarray, num_clusters: int = 3) -> float:
    """Accuracy under the best one-to-one matching of predicted clusters to labels (Hungarian)."""
    confusion = np.zeros((num_clusters, num_clusters), dtype=np.int64)
    np.add.at(confusion, (np.asarray(pred), np.asarray(labels)), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    return float(confusion[rows, cols].sum()) / len(labels)


class SwAVNet(torch.nn.Module):
    """2→64→32 trunk (L2-normalised embedding) and 3 prototypes; ``forward`` gives scores ``[N,
    3]``."""

    def __init__(self, hidden=(64, 32), num_clusters: int = 3):
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(2, hidden[0]), torch.nn.ReLU(), torch.nn.Linear(hidden[0], hidden[1])
        )
        self.prototypes = torch.nn.Linear(hidden[1], num_clusters, bias=False)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self):
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, x):
        return self.prototypes(F.normalize(self.trunk(x), dim=1))


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's equipartition codes ``[N, K]`` (each row sums to 1) from scores ``[N, K]``."""
    q = torch.exp(
        (scores - scores.max()) / eps
    ).t()  # [K, N]; max-shift for stability, cancels below
    q /= q.sum()
    num_clusters, num_points = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True) * num_clusters
        q /= q.sum(dim=0, keepdim=True) * num_points
    return (q * num_points).t()


def train_swav(
    x: torch.Tensor,
    alpha: Sequence[float] | None = None,
    seed: int = 0,
    epochs: int = 50,
    dpsl_start: int = 40,
    dpsl_lambda: float = 0.01,
    prior_order: str = "aligned",
    lr: float = 0.01,
    tau: float = 0.1,
    eps: float = 0.05,
    sinkhorn_iters: int = 3,
    aug_std: float = 0.1,
    return_probs: bool = False,
):
    """Full-batch SwAV (one Adam step per epoch); with ``alpha``, + ``dpsl_lambda`` · DPSL from
    ``dpsl_start``.

    Args:
        x: ``[N, 2]`` raw points (standardised here).
        alpha: ``[3]`` Dirichlet prior, or None for SwAV alone.
    Returns the predicted cluster of each point, ``[N]`` int; with ``return_probs``, the final
    ``softmax(scores/τ)`` of the points instead, ``[N, 3]``.
    """
    if prior_order not in ("aligned", "fixed"):
        raise ValueError(
            f"train_swav: prior_order must be 'aligned' or 'fixed', got {prior_order!r}"
        )
    torch.manual_seed(seed)
    x = (x - x.mean(0)) / x.std(0)
    net = SwAVNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    prior = None
    for epoch in range(epochs):
        views = [x + aug_std * torch.randn_like(x) for _ in range(2)]
        scores = [net(v) for v in views]
        codes = [sinkhorn(s.detach(), eps, sinkhorn_iters) for s in scores]
        logp = [F.log_softmax(s / tau, dim=1) for s in scores]
        loss = -0.5 * ((codes[0] * logp[1]).sum(1).mean() + (codes[1] * logp[0]).sum(1).mean())
        if alpha is not None and epoch >= dpsl_start:
            probs = torch.softmax(net(x) / tau, dim=1)  # [N, 3]
            if prior is None:
                prior = torch.tensor(alpha, dtype=torch.float64)
                if prior_order == "aligned":
                    # largest α to the currently largest cluster, and so on down
                    sizes = torch.bincount(probs.argmax(1), minlength=len(alpha))
                    prior_sorted = torch.sort(prior, descending=True, stable=True).values
                    prior = torch.empty_like(prior)
                    prior[torch.sort(sizes, descending=True, stable=True).indices] = prior_sorted
            loss = loss + dpsl_lambda * dpsl_loss(probs, prior)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        net.normalize_prototypes()
    with torch.no_grad():
        scores = net(x)
    return torch.softmax(scores / tau, dim=1) if return_probs else scores.argmax(1).numpy()


def _sorted_fractions(pred: np.ndarray, num_clusters: int = 3) -> list:
    return sorted((np.bincount(pred, minlength=num_clusters) / len(pred)).tolist(), reverse=True)


def run_table(
    settings: Sequence[str],
    seeds: Sequence[int],
    lambdas: Sequence[float] = (0.01,),
    prior_orders: Sequence[str] = ("aligned",),
    **train_kw,
) -> dict:
    """``{setting: {method: {"acc": [per seed], "fractions": [per seed: predicted cluster sizes / N,
    sorted
    descending]}}}``; methods "SwAV" and "SwAV+DPSL λ=<λ> (<prior order>)"."""
    table = {}
    for name in settings:
        rows = {}
        for seed in seeds:
            x, y = make_data(name, seed=seed)
            runs = [("SwAV", None, 0.0, "aligned")] + [
                (f"SwAV+DPSL λ={lam:g} ({order})", SETTINGS[name].alpha, lam, order)
                for lam in lambdas
                for order in prior_orders
            ]
            for method, alpha, lam, order in runs:
                pred = train_swav(
                    x, alpha, seed=seed, dpsl_lambda=lam, prior_order=order, **train_kw
                )
                row = rows.setdefault(method, {"acc": [], "fractions": []})
                row["acc"].append(cluster_accuracy(pred, y.numpy()))
                row["fractions"].append(_sorted_fractions(pred))
        table[name] = rows
    return table


def _mean_std(values, fmt: str = ".2f") -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {std:.2f}"


def format_table(table: dict) -> str:
    """Markdown: accuracy mean ± std (%) per setting and method; DPSL columns add the paired
    difference to SwAV."""
    methods = list(next(iter(table.values())).keys())
    lines = ["| setting | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for name, rows in table.items():
        cells = []
        for m in methods:
            accs = [100 * a for a in rows[m]["acc"]]
            cells.append(_mean_std(accs))
            if m != "SwAV":  # paired over seeds (same data, init and views up to the DPSL switch)
                cells[-1] += (
                    " (Δ "
                    + _mean_std([a - 100 * b for a, b in zip(accs, rows["SwAV"]["acc"])], "+.2f")
                    + ")"
                )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_fractions(table: dict) -> str:
    """Markdown: mean predicted cluster sizes (fractions of N, largest first) next to the true
    ones."""
    methods = list(next(iter(table.values())).keys())
    lines = ["| setting | true | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for name, rows in table.items():
        ratio = SETTINGS[name].ratio
        true = "/".join(f"{r / sum(ratio):.2f}" for r in ratio)
        cells = [
            "/".join(f"{v:.2f}" for v in np.mean(rows[m]["fractions"], axis=0)) for m in methods
        ]
        lines.append(f"| {name} | {true} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_assignments(
    settings: Sequence[str],
    seed: int,
    path: str,
    dpsl_lambda: float = 0.01,
    prior_order: str = "aligned",
    dpi: int = 70,
    **train_kw,
) -> str:
    """Fig. 5-style panels: ground truth, SwAV, SwAV+DPSL for each setting (one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(settings), 3, figsize=(9, 3 * len(settings)), squeeze=False)
    for row, name in enumerate(settings):
        x, y = make_data(name, seed=seed)
        preds = {
            "ground truth": y.numpy(),
            "SwAV": train_swav(x, None, seed=seed, **train_kw),
            f"SwAV+DPSL λ={dpsl_lambda:g}": train_swav(
                x,
                SETTINGS[name].alpha,
                seed=seed,
                dpsl_lambda=dpsl_lambda,
                prior_order=prior_order,
                **train_kw,
            ),
        }
        for col, (title, pred) in enumerate(preds.items()):
            ax = axes[row, col]
            ax.scatter(x[:, 0], x[:, 1], c=pred, s=3, cmap="viridis")
            acc = "" if col == 0 else f" ({100 * cluster_accuracy(pred, y.numpy()):.1f}%)"
            ax.set_title(f"{name}: {title}{acc}", fontsize=8)
            ax.set_aspect("equal")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv: list | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    parser.add_argument(
        "--lambdas",
        nargs="+",
        type=float,
        default=[0.01],
        help="DPSL weights λ (paper: 0.01); more than one adds columns",
    )
    parser.add_argument(
        "--prior-order",
        nargs="+",
        choices=["aligned", "fixed"],
        default=["aligned"],
        help="how α's category order meets the network's cluster indices (see module docstring)",
    )
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--dpsl-start", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="one seed, no plot: a smoke run")
    parser.add_argument(
        "--out", default="outputs/swav_clustering", help="output directory for the PNG"
    )
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.no_plot = args.seeds[:1], True

    torch.set_num_threads(1)  # tiny full-batch MLP: threads only add overhead
    print("guessed settings (not stated in the paper):")
    for key, value in GUESSES.items():
        print(f"  {key}: {value}")
    table = run_table(
        args.settings,
        args.seeds,
        args.lambdas,
        args.prior_order,
        epochs=args.epochs,
        dpsl_start=args.dpsl_start,
    )
    print(f"\nclustering accuracy (%), mean ± std over seeds {args.seeds}:")
    print(format_table(table))
    print("\npredicted cluster sizes (fraction of points, largest first), mean over seeds:")
    print(format_fractions(table))
    if not args.no_plot:
        path = plot_assignments(
            args.settings,
            args.seeds[0],
            os.path.join(args.out, "swav_clustering.png"),
            dpsl_lambda=args.lambdas[0],
            prior_order=args.prior_order[0],
            epochs=args.epochs,
            dpsl_start=args.dpsl_start,
        )
        print(f"wrote {path}")
    return table


if __name__ == "__main__":
    main()
