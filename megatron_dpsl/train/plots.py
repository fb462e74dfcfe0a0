"""Quickstart figures (matplotlib, Agg): routing histograms vs the Beta marginals, training curves,
usage.

Inputs are the per-run dicts the quickstart collects: ``{"name", "prior" [E] or [G, E] (float64),
"history": [routing_stats.summarize() per evaluation], "valid_losses": [(iteration, loss)]}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def beta_pdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """Beta(a, b) density (a Dirichlet marginal: p_k ~ Beta(α_k, A - α_k))."""
    x = np.clip(x, 1e-6, 1 - 1e-6)
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return np.exp(log_norm + (a - 1) * np.log(x) + (b - 1) * np.log1p(-x))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


GROUP_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def plot_histograms(
    runs: Sequence[dict], path: str, group_names: Sequence[str], layer: int = -1
) -> None:
    """Paper Fig. 7: per-expert histograms of routing probabilities (final validation, one MoE
    layer)
    against the Beta(α_k, A − α_k) pdf of each run's prior (per group for group priors)."""
    plt = _plt()
    num_experts = runs[0]["prior"].shape[-1]
    fig, axes = plt.subplots(
        len(runs),
        num_experts,
        figsize=(1.7 * num_experts, 1.7 * len(runs)),
        sharex=True,
        squeeze=False,
    )
    bins = np.linspace(0, 1, 31)
    grid = np.linspace(0.005, 0.995, 200)
    for r, run in enumerate(runs):
        final = run["history"][-1]["layers"][layer]
        probs = final["probs_sample"].numpy()
        ids = final["group_ids_sample"]
        prior = run["prior"].numpy()
        rows = prior if prior.ndim == 2 else prior[None]
        ids_np = ids.numpy() if prior.ndim == 2 and ids is not None else None
        for k in range(num_experts):
            ax = axes[r, k]
            _expert_histogram(ax, probs[:, k], ids_np, rows.shape[0], bins)
            _prior_marginals(ax, rows, k, grid, dashed=bool(run.get("reference_prior")))
            ax.set_ylim(0, 12)
            ax.set_yticks([])
            ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(f"expert {k}", fontsize=8)
            if k == 0:
                ax.set_ylabel(run["name"], fontsize=7)
    _histogram_legend(plt, fig, group_names)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _expert_histogram(ax, probs_k, ids, num_groups: int, bins) -> None:
    """One expert's routing probabilities ``[n]``: one histogram per group (``ids`` ``[n]``), or
    one grey histogram without group priors (``ids`` None)."""
    if ids is None:
        ax.hist(probs_k, bins=bins, density=True, alpha=0.6, color="tab:gray")
        return
    for g in range(num_groups):
        sel = probs_k[ids == g]
        if sel.size:
            ax.hist(sel, bins=bins, density=True, alpha=0.45, color=GROUP_COLORS[g % 4])


def _prior_marginals(ax, rows, k: int, grid, dashed: bool) -> None:
    """The Beta(α_k, A − α_k) pdf of each prior row ``[G, E]`` for expert ``k``."""
    for g, row in enumerate(rows):
        a, total = float(row[k]), float(row.sum())
        color = GROUP_COLORS[g % 4] if len(rows) > 1 else "black"
        ax.plot(grid, beta_pdf(grid, a, total - a), color=color, lw=1.2, ls="--" if dashed else "-")


def _histogram_legend(plt, fig, group_names: Sequence[str]) -> None:
    handles = [
        plt.Line2D([], [], color="black", lw=1.2, label="Beta(α_k, A−α_k) of the run's prior"),
        plt.Line2D(
            [], [], color="black", lw=1.2, ls="--", label="Dir(1) reference (no prior in the loss)"
        ),
    ]
    handles += [
        plt.Rectangle((0, 0), 1, 1, color=GROUP_COLORS[g], alpha=0.45, label=f"{n} tokens")
        for g, n in enumerate(group_names)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(
        "Routing probabilities per expert (validation, last MoE layer) vs the prior's Beta "
        "marginals",
        fontsize=9,
    )


def plot_curves(runs: Sequence[dict], path: str) -> None:
    """Validation loss, expert-load CoV, routing entropy and distance to the prior vs iteration."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3))
    panels = (
        ("validation lm loss", None),
        ("CoV of expert loads", "cov"),
        ("routing entropy (nats)", "entropy"),
        ("distance to prior (Eq. 4, mean over experts)", "prior_distance"),
    )
    for ax, (title, key) in zip(axes, panels):
        for run in runs:
            if key is None:
                xs, ys = zip(*run["valid_losses"]) if run["valid_losses"] else ((), ())
            else:
                xs = [h["iteration"] for h in run["history"]]
                ys = [h[key] for h in run["history"]]
            ax.plot(xs, ys, marker="o", ms=3, label=run["name"])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_usage(
    runs: Sequence[dict], path: str, group_names: Sequence[str], ncols: int | None = None
) -> None:
    """Per-modality expert usage (share of each group's top-k assignments per expert, layer mean);
    one panel per run, ``ncols`` per row (default: all in one row)."""
    plt = _plt()
    ncols = ncols or len(runs)
    nrows = math.ceil(len(runs) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols, 2.2 + 2.8 * (nrows - 1)), squeeze=False
    )
    fig.subplots_adjust(
        hspace=0.7
    )  # room for each row's expert axis label under the next row's titles
    for ax in axes.flat[len(runs) :]:
        ax.set_visible(False)
    usages = [
        np.mean([layer["group_usage"].numpy() for layer in run["history"][-1]["layers"]], axis=0)[
            : len(group_names)
        ]
        for run in runs
    ]
    vmax = max(
        0.3, max(float(u.max()) for u in usages)
    )  # one colour scale: the panels are compared
    for ax, run, usage in zip(axes.flat, runs, usages):
        im = ax.imshow(usage, vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(group_names)), group_names, fontsize=7)
        ax.set_xticks(range(usage.shape[1]))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(run["name"], fontsize=9)
    fig.colorbar(im, ax=list(axes.flat), fraction=0.02)
    fig.savefig(path, dpi=72, bbox_inches="tight")
    plt.close(fig)


def write_all(runs: list[dict], out_dir: str, group_names: Sequence[str]) -> list[str]:
    """All three figures into ``out_dir``; returns their paths."""
    import os

    paths = [
        os.path.join(out_dir, f"quickstart_{n}.png") for n in ("histograms", "curves", "usage")
    ]
    plot_histograms(runs, paths[0], group_names)
    plot_curves(runs, paths[1])
    plot_usage(runs, paths[2], group_names)
    return paths
