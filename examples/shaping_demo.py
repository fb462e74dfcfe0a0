"""Shaping learnable probability vectors with DPSL alone (paper Fig. 2 / Fig. 6, Appendix C.1).

Two sources of points, each point a learnable logit vector over 3 categories (softmax -> probability
vector). DPSL (Eq. 4, `megatron_dpsl.dpsl_loss`) with one Dirichlet prior per source (``alpha``
``[2, 3]``, ``group_ids`` = source id) is the only loss; Adam, lr 0.1, 100 steps as in Appendix C.1.

    # Fig. 6 priors: Dir(5,5,5), Dir(.2,.2,.2)
    python examples/shaping_demo.py
    # Fig. 2 priors: Dir(1.5,1.5,1.5), Dir(3,1,.5)
    python examples/shaping_demo.py --preset fig2
    python examples/shaping_demo.py --out outputs/shaping --steps 100 --num-points 1000 --seed 0

Prints the per-category Kolmogorov–Smirnov distance of each source's marginals to Beta(α_k, A−α_k)
at initialisation and after training, and writes ``<out>/shaping_demo.png``.

Settings the paper does not state (our choices): points per source (1000), logit initialisation
(i.i.d. N(0, 0.5²): a tight blob around the simplex centre, as the "initialization" row of Fig. 2
suggests), float32 parameters.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from megatron_dpsl import dpsl_loss
from megatron_dpsl.metrics.routing import ks_distance

PRESETS = {
    # Appendix C.1 / Fig. 6
    "fig6": ((5.0, 5.0, 5.0), (0.2, 0.2, 0.2)),
    # Section 2.2 / Fig. 2
    "fig2": ((1.5, 1.5, 1.5), (3.0, 1.0, 0.5)),
}


def ks_per_category(probs: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """KS distance of each column of ``probs`` ``[num_points, num_categories]`` to Beta(α_k, A−α_k),
    float64
    ``[num_categories]`` (``megatron_dpsl.metrics.routing.ks_distance``)."""
    return ks_distance(probs.double(), alpha.double()).double()


def run_shaping(
    steps: int = 100,
    num_points: int = 1000,
    seed: int = 0,
    alphas=PRESETS["fig6"],
    lr: float = 0.1,
    init_std: float = 0.5,
) -> dict:
    """Train ``num_sources * num_points`` learnable logit vectors with DPSL alone.

    Args:
        alphas: one Dirichlet concentration vector per source (``[num_sources][num_categories]``).

    Returns a dict with ``alpha`` ``[S, K]``, ``group_ids`` ``[S*n]``,
    ``probs_init``/``probs_final``
    ``[S*n, K]``, ``losses`` (list of per-step loss values, before each update),
    ``ks_init``/``ks_final``
    ``[S, K]`` (KS distance per source and category).
    """
    if steps < 0 or num_points < 2:
        raise ValueError(
            f"run_shaping: need steps >= 0 and num_points >= 2, got steps={steps}, "
            f"num_points={num_points}"
        )
    alpha = torch.tensor(alphas, dtype=torch.float64)  # [num_sources, num_categories]
    num_sources, num_categories = alpha.shape
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_sources * num_points, num_categories, generator=gen) * init_std
    logits.requires_grad_(True)
    group_ids = torch.arange(num_sources).repeat_interleave(num_points)  # source id per point
    opt = torch.optim.Adam([logits], lr=lr)

    def ks_all(probs):
        return torch.stack(
            [ks_per_category(probs[group_ids == s], alpha[s]) for s in range(num_sources)]
        )

    probs_init = torch.softmax(logits.detach(), dim=-1)
    losses = []
    for _ in range(steps):
        probs = torch.softmax(logits, dim=-1)
        loss = dpsl_loss(probs, alpha, group_ids=group_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    probs_final = torch.softmax(logits.detach(), dim=-1)
    losses.append(
        float(dpsl_loss(probs_final, alpha, group_ids=group_ids))
    )  # loss after the last update
    return {
        "alpha": alpha,
        "group_ids": group_ids,
        "probs_init": probs_init,
        "probs_final": probs_final,
        "losses": losses,
        "ks_init": ks_all(probs_init),
        "ks_final": ks_all(probs_final),
    }


def _simplex_xy(probs: torch.Tensor):
    """Barycentric -> 2-D: category 1 at (0,0), 2 at (1,0), 3 at (1/2, √3/2)."""
    p = probs.double()
    return (p[:, 1] + 0.5 * p[:, 2]).numpy(), (p[:, 2] * math.sqrt(3) / 2).numpy()


def plot_shaping(result: dict, path: str, dpi: int = 80) -> str:
    """Fig. 2-style figure: CDFs at init and after training (rows 1-2), per-source histograms vs
    Beta pdfs
    (rows 3-4), simplex scatter, loss curve. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    alpha, gid = result["alpha"], result["group_ids"]
    num_sources, num_categories = alpha.shape
    colors = ["tab:green", "tab:purple", "tab:orange", "tab:blue"]
    grid = np.linspace(1e-4, 1 - 1e-4, 400)
    rows, cols = 2 + num_sources, num_categories + 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows))

    for row, (key, ks_key, title) in enumerate(
        [("probs_init", "ks_init", "initialisation"), ("probs_final", "ks_final", "after training")]
    ):
        probs = result[key]
        for k in range(num_categories):
            ax = axes[row, k]
            for s in range(num_sources):
                a_k, b_k = float(alpha[s, k]), float(alpha[s].sum() - alpha[s, k])
                x = np.sort(probs[gid == s, k].numpy())
                ax.plot(
                    x,
                    np.arange(1, len(x) + 1) / len(x),
                    "--",
                    color=colors[s],
                    label=f"S{s + 1} empirical (KS {float(result[ks_key][s, k]):.3f})",
                )
                ax.plot(
                    grid,
                    stats.beta.cdf(grid, a_k, b_k),
                    "-",
                    color=colors[s],
                    alpha=0.6,
                    label=f"S{s + 1} Beta({a_k:g},{b_k:g})",
                )
            ax.set_xlim(0, 1)
            ax.set_title(f"CDF, category {k + 1}, {title}", fontsize=9)
            ax.legend(fontsize=6, loc="lower right")
        ax = axes[row, num_categories]
        for s in range(num_sources):
            sx, sy = _simplex_xy(probs[gid == s])
            ax.scatter(sx, sy, s=2, color=colors[s], alpha=0.4, label=f"S{s + 1}")
        ax.plot([0, 1, 0.5, 0], [0, 0, math.sqrt(3) / 2, 0], "k-", lw=0.8)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"simplex, {title}", fontsize=9)
        ax.legend(fontsize=6, loc="upper right")

    probs = result["probs_final"]
    for s in range(num_sources):
        for k in range(num_categories):
            ax = axes[2 + s, k]
            a_k, b_k = float(alpha[s, k]), float(alpha[s].sum() - alpha[s, k])
            ax.hist(
                probs[gid == s, k].numpy(),
                bins=40,
                range=(0, 1),
                density=True,
                color=colors[s],
                alpha=0.5,
            )
            pdf = stats.beta.pdf(grid, a_k, b_k)
            ax.plot(grid, pdf, "k-", lw=1)
            # U-shaped targets have an infinite pdf at the ends: clip the axis to the histogram's
            # scale
            ax.set_ylim(0, 1.2 * max(np.percentile(pdf, 90), 1.0))
            ax.set_title(f"S{s + 1}, category {k + 1}: Beta({a_k:g},{b_k:g})", fontsize=9)
    ax = axes[2, num_categories]
    ax.plot(result["losses"])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("DPSL (Eq. 4, sum over sources)", fontsize=9)
    ax = axes[3, num_categories] if num_sources > 1 else None
    if ax is not None:
        width = 0.8 / num_sources
        for s in range(num_sources):
            ax.bar(
                np.arange(num_categories) + s * width,
                result["ks_final"][s].numpy(),
                width,
                color=colors[s],
                label=f"S{s + 1}",
            )
        n_min = int(min((gid == s).sum() for s in range(num_sources)))
        ax.axhline(
            1.358 / math.sqrt(n_min), color="k", ls=":", lw=1, label=f"5% critical, n={n_min}"
        )
        ax.set_xticks(
            np.arange(num_categories) + 0.4 - width / 2,
            [f"cat {k + 1}" for k in range(num_categories)],
        )
        ax.set_title("KS distance after training", fontsize=9)
        ax.legend(fontsize=6, loc="center left")
    for s in range(2, num_sources):
        axes[2 + s, num_categories].axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv: list | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="fig6",
        help="priors of the two sources: fig6 = Dir(5,5,5)/Dir(.2,.2,.2) (App. C.1), "
        "fig2 = Dir(1.5,1.5,1.5)/Dir(3,1,.5) (Sec. 2.2)",
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num-points", type=int, default=1000, help="points per source")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--init-std", type=float, default=0.5, help="std of the initial logits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="outputs/shaping_demo", help="output directory for the PNG"
    )
    parser.add_argument("--dpi", type=int, default=80)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    result = run_shaping(
        steps=args.steps,
        num_points=args.num_points,
        seed=args.seed,
        alphas=PRESETS[args.preset],
        lr=args.lr,
        init_std=args.init_std,
    )
    alpha = result["alpha"]
    print(
        f"DPSL loss: {result['losses'][0]:.5f} (init) -> {result['losses'][-1]:.5f} after "
        f"{args.steps} steps"
    )
    print(
        f"KS critical value, n={args.num_points}, 5% level: "
        f"{1.358 / math.sqrt(args.num_points):.4f}"
    )
    print("source  prior                 KS init per category       KS final per category")
    for s in range(alpha.shape[0]):
        prior = "Dir(" + ",".join(f"{a:g}" for a in alpha[s].tolist()) + ")"
        ks0 = " ".join(f"{v:.4f}" for v in result["ks_init"][s].tolist())
        ks1 = " ".join(f"{v:.4f}" for v in result["ks_final"][s].tolist())
        print(f"S{s + 1:<6} {prior:<21} {ks0:<26} {ks1}")
    print(f"worst KS final: {float(result['ks_final'].max()):.4f}")
    if not args.no_plot:
        path = plot_shaping(result, os.path.join(args.out, "shaping_demo.png"), dpi=args.dpi)
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
