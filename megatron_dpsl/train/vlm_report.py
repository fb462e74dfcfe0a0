"""The VLM demonstration's table and figure, per MoE layer and per modality.

Inputs are the per-run dicts ``vlm_demo.load_runs`` returns: ``{"name", "layers": [the final
validation's per-layer ``routing_stats.summarize`` entries], "held_out": {"caption_loss",
"answer_accuracy"}}``. Group 0 is vision, group 1 text (``megatron_dpsl.models`` computes the ids;
padding has none). Every run is measured against the same reference, the paper's modality priors
``α^(vision) = (α_b+α_s, α_b+α_s, α_b, α_b)`` and ``α^(text)`` its mirror (Sec. 3.4), so the columns
compare across runs; vision's favoured experts are the first half.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MODALITIES = ("vision", "text")
# (header, row key, decimals)
COLUMNS = (
    ("caption loss", "caption_loss", 4),
    ("answer acc.", "answer_accuracy", 3),
    ("CoV", "cov", 3),
    ("dist. vision", "distance_vision", 5),
    ("dist. text", "distance_text", 5),
    ("vision→E0-1", "vision_on_favoured", 3),
    ("text→E2-3", "text_on_others", 3),
)


def modality_prior(num_experts: int, alpha_base: float, alpha_shift: float) -> torch.Tensor:
    """``[2, E]`` float64: row 0 the vision prior, row 1 the text prior (the paper's Sec. 3.4)."""
    from megatron_dpsl.losses.priors import group_alpha

    return group_alpha(num_experts, 2, alpha_base, alpha_shift).double()


def layer_row(layer: dict, prior: torch.Tensor) -> dict:
    """Routing columns of one MoE layer: CoV, each modality's Eq. 4 distance (mean over experts) to
    its modality prior, and the share of each modality's top-k on its favoured expert block."""
    from megatron_dpsl import metrics

    probs, ids = layer["probs_sample"].double(), layer["group_ids_sample"]
    half = prior.shape[-1] // 2
    usage = layer["group_usage"]
    row = {"cov": layer["cov"]}
    for g, name in enumerate(MODALITIES):
        sel = probs[ids == g]
        row[f"distance_{name}"] = (
            float(metrics.prior_distance(sel, prior[g]).mean()) if sel.shape[0] else float("nan")
        )
    row["vision_on_favoured"] = float(usage[0, :half].sum())
    row["text_on_others"] = float(usage[1, half:].sum())
    return row


def table_rows(runs: Sequence[dict], prior: torch.Tensor) -> list[dict]:
    """One row per (run, MoE layer): the run's held-out language metrics and the layer's routing."""
    rows = []
    for run in runs:
        for index, layer in enumerate(run["layers"]):
            row = {"run": run["name"], "layer": index, **run["held_out"]}
            rows.append({**row, **layer_row(layer, prior)})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table: run, layer, then ``COLUMNS``."""
    head = "| run | layer | " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [f"{r[key]:.{p}f}" for _, key, p in COLUMNS]
        lines.append(f"| {r['run']} | {r['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _histogram_panel(ax, probs, ids, prior, expert: int, first: bool) -> None:
    """Fig. 7-style: expert ``expert``'s routing probabilities per modality and each modality
    prior's Beta(α_k, A − α_k) marginal."""
    from megatron_dpsl.train.plots import GROUP_COLORS, beta_pdf

    bins, grid = np.linspace(0, 1, 31), np.linspace(0.005, 0.995, 200)
    for g, name in enumerate(MODALITIES):
        values = probs[ids == g, expert]
        if values.size:
            ax.hist(
                values,
                bins=bins,
                density=True,
                alpha=0.5,
                color=GROUP_COLORS[g],
                label=name,
            )
        a = float(prior[g, expert])
        ax.plot(
            grid,
            beta_pdf(grid, a, float(prior[g].sum()) - a),
            color=GROUP_COLORS[g],
            lw=1,
        )
    ax.set_ylim(0, 8)
    ax.tick_params(labelsize=6)
    if first:
        ax.legend(fontsize=6)


def _usage_panel(ax, usage: np.ndarray) -> None:
    """Share of each modality's top-k assignments per expert (bars per modality)."""
    from megatron_dpsl.train.plots import GROUP_COLORS

    experts = np.arange(usage.shape[1])
    for g, name in enumerate(MODALITIES):
        ax.bar(
            experts + 0.4 * g - 0.2,
            usage[g],
            width=0.4,
            color=GROUP_COLORS[g],
            label=name,
        )
    ax.axhline(1.0 / usage.shape[1], color="grey", lw=0.8, ls=":")
    ax.set_xticks(experts)
    ax.tick_params(labelsize=6)


def plot_modality_usage(runs: Sequence[dict], prior: torch.Tensor, path: str) -> None:
    """One figure: a row per (run, MoE layer); per expert the routing-probability histograms of
    vision and text tokens against the modality priors' Beta marginals, then the expert usage by
    modality."""
    from megatron_dpsl.train.plots import _plt

    plt = _plt()
    rows = [(run["name"], i, layer) for run in runs for i, layer in enumerate(run["layers"])]
    num_experts = prior.shape[-1]
    fig, axes = plt.subplots(
        len(rows),
        num_experts + 1,
        figsize=(1.8 * (num_experts + 1), 1.5 * len(rows)),
        squeeze=False,
    )
    for r, (name, index, layer) in enumerate(rows):
        probs, ids = layer["probs_sample"].numpy(), layer["group_ids_sample"].numpy()
        for k in range(num_experts):
            _histogram_panel(axes[r, k], probs, ids, prior.numpy(), k, first=(r == 0 and k == 0))
            if r == 0:
                axes[r, k].set_title(f"expert {k}", fontsize=8)
        _usage_panel(axes[r, num_experts], layer["group_usage"].numpy())
        axes[r, 0].set_ylabel(f"{name}\nlayer {index}", fontsize=7)
    axes[0, num_experts].set_title("usage by modality", fontsize=8)
    fig.suptitle(
        "routing probabilities per expert, vision (blue) and text (orange) tokens; lines: the Beta "
        "marginals of each modality's prior",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


TABLE_NOTES = (
    "Held-out images (the valid split), final step. caption loss: cross entropy per caption token; "
    "answer acc.: share of questions whose every answer word is the argmax (both teacher-forced, "
    "per run). Per MoE layer: CoV: std/mean of expert loads (top-k assignments, padding excluded); "
    "dist. vision / dist. text: Eq. 4 distance per expert (mean) of that modality's routing "
    "probabilities to its modality prior, α^(vision) = (α_b+α_s, α_b+α_s, α_b, α_b) and α^(text) "
    "its mirror, the same reference in every run; vision→E0-1 / text→E2-3: share of that "
    "modality's top-k assignments on the experts its prior favours (0.5 = no preference)."
)
