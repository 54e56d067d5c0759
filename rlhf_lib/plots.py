"""The RLHF layer's figures: scores against KL, the reward model against the oracle, head grids."""
from __future__ import annotations

import torch

from dualgpt.heads import draw_head_cells
from dualgpt.plots import finish_plot, pyplot, save_figure

METHOD_COLOURS = {"dpo": "tab:blue", "cdpo": "tab:cyan", "ipo": "tab:purple",
                  "dpo_soft": "tab:olive",
                  "rloo": "tab:green", "ppo": "tab:red"}


def plot_score_against_kl(report: dict, path: str) -> None:
    """The report's measure (the oracle score; with no oracle, the reward model's) against sqrt(KL
    to the base): best-of-n's curve, and every method's kept checkpoints in training order (one
    line per seed), so that methods are compared at equal KL, not at equal steps."""
    plt = pyplot()
    key = report.get("measure", "oracle")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for seed_index, bon in enumerate(report["bon_curves"].values()):
        ax.plot([b["kl"] ** 0.5 for b in bon], [b[key] for b in bon], color="black", marker="s",
                markersize=3,
                alpha=0.7, label="best-of-n" if seed_index == 0 else None)
        for b in bon if seed_index == 0 else []:
            ax.annotate(f"n={b['n']}", (b["kl"] ** 0.5, b[key]), fontsize=6, xytext=(3, -9),
                        textcoords="offset points")
    for seed_index, curves in enumerate(report["curves"].values()):
        for method, points in curves.items():
            ax.plot([max(p["kl"], 0.0) ** 0.5 for p in points], [p[key] for p in points],
                    marker="o", alpha=0.7,
                    markersize=3, color=METHOD_COLOURS.get(method),
                    label=method if seed_index == 0 else None)
    for target in report.get("matched_kl", {}):
        ax.axvline(float(target) ** 0.5, color="grey", linewidth=0.6, linestyle=":")
    score = "oracle score" if key == "oracle" else "reward-model score"
    source = (f"oracle {report['oracle']}" if report["oracle"]
              else f"pairs {report.get('pairs')}, no oracle")
    finish_plot(fig, ax, "sqrt(KL to the base), sqrt(nats per sequence)", f"{score} (mean over "
                "held-out prompts)",
                f"{source}: score against distance from the base ({len(report['curves'])} seeds)",
                path, legend_size=8)


def plot_rm_against_oracle(report: dict, path: str) -> None:
    """The reward model's score (what RL optimises) against the oracle score, along training: where
    the reward model's score keeps rising and the oracle score does not, the policy is
    over-optimising the reward model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for seed_index, bon in enumerate(report["bon_curves"].values()):
        ax.plot([b["rm"] for b in bon], [b["oracle"] for b in bon], color="black", marker="s",
                markersize=3, alpha=0.7,
                label="best-of-n, n = 1 ... " if seed_index == 0 else None)
    for seed_index, curves in enumerate(report["curves"].values()):
        for method, points in curves.items():
            ax.plot([p["rm"] for p in points], [p["oracle"] for p in points], marker="o",
                    markersize=3, alpha=0.7,
                    color=METHOD_COLOURS.get(method), label=f"{method}, kept checkpoints "
                    "in order" if seed_index == 0 else None)
    finish_plot(fig, ax, "reward-model score", "oracle score",
                f"oracle {report['oracle']}: reward model against oracle over training", path,
                legend_size=8)


def plot_head_grid(rows: list[tuple[str, list[tuple[str, torch.Tensor]]]], title: str,
                   path: str) -> list[tuple[int, int]]:
    """Rows of layer x head heatmaps, one value written in each cell: rows[i] = (row label, [(panel
    title, values (n_layer, n_head)), ...]). Returns the shape of every heatmap drawn."""
    plt = pyplot()
    n_rows, n_cols = len(rows), max(len(panels) for _, panels in rows)
    n_layer, n_head = rows[0][1][0][1].shape
    fig, axes = plt.subplots(n_rows, n_cols,
                             figsize=(n_cols * (0.8 * n_head + 1.8),
                                      n_rows * (0.7 * n_layer + 1.4)),
                             squeeze=False, layout="constrained")
    drawn = []
    for i, (label, panels) in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            if j >= len(panels):
                ax.axis("off")
                continue
            name, values = panels[j]
            grid = values.float().numpy()
            limit = max(abs(grid.min()), abs(grid.max()), 1e-12)
            signed = grid.min() < 0
            draw_head_cells(ax, grid, "{:.2g}", 7, cmap="RdBu_r" if signed else "magma",
                            vmin=-limit if signed else 0,
                            vmax=limit)
            ax.set_title(f"{label}: {name}", fontsize=8)
            drawn.append(grid.shape)
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)
    return drawn


def plot_lines(series: dict[str, list[float]], xlabel: str, ylabel: str, title: str,
               path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, values in series.items():
        ax.plot(range(len(values)), values, marker=".", label=name, color=METHOD_COLOURS.get(name))
    finish_plot(fig, ax, xlabel, ylabel, title, path)
