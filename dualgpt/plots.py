"""Every figure: loss curves, attention maps, per-head heatmaps. matplotlib is imported only when drawing."""
from __future__ import annotations

import json

import numpy as np
import torch

from dualgpt.files import atomic_open


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str) -> None:
    """Write a figure as PNG atomically, then free it."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    pyplot().close(fig)


def finish_plot(fig, ax, xlabel: str, ylabel: str, title: str, path: str, legend_size: float | None = None) -> None:
    """Label the axes, draw the grid and legend, and save: the end of every line plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    save_figure(fig, path)


def smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled towards 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** i))
    return out


def plot_losses(log_file: str, path: str, title: str) -> None:
    """Bits per byte against training minutes, from the JSON-lines log: the train and val evaluations, and
    the loss of the logged training steps (smoothed)."""
    plt = pyplot()
    with open(log_file, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "val_bpb" in r]
    steps = [r for r in records if "bpb" in r]
    minutes = [r["train_s"] / 60 for r in evals]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if steps:
        ax.plot([r["train_s"] / 60 for r in steps], smoothed([r["bpb"] for r in steps]), linewidth=1, alpha=0.6,
                color="grey", label="training steps (batch loss, smoothed)")
    ax.plot(minutes, [r["train_bpb"] for r in evals], marker="o", label="train (evaluation)")
    ax.plot(minutes, [r["val_bpb"] for r in evals], marker="o", label="val (evaluation)")
    finish_plot(fig, ax, "training time, minutes (evaluation excluded)", "bits per byte", title, path)


def plot_attention(weights: list[torch.Tensor], labels: list[str], title: str, path: str) -> None:
    """A grid of attention maps: rows are layers, columns heads; weights[layer] is (nh, T, T)."""
    plt = pyplot()
    n_layer, n_head, T = len(weights), weights[0].shape[0], weights[0].shape[-1]
    size = max(2.5, T * 0.14)
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head + 1.5, size * n_layer + 1), squeeze=False,
                             layout="constrained")
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(weights[layer][head].cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.set_xticklabels(labels, rotation=90, fontsize=5)
            ax.set_yticklabels(labels, fontsize=5)
            ax.set_xlabel("attended token (key)", fontsize=7)
            ax.set_ylabel("query token", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(title, fontsize=14)
    save_figure(fig, path)


def draw_head_cells(ax, grid: np.ndarray, fmt: str, fontsize: float, **imshow_options):
    """A layer x head grid as an image with each value written in its cell; returns the image."""
    image = ax.imshow(grid, **imshow_options)
    for (layer, head), value in np.ndenumerate(grid):
        ax.text(head, layer, fmt.format(value), ha="center", va="center", fontsize=fontsize, color="grey")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    return image


def plot_head_heatmap(values: torch.Tensor, title: str, label: str, path: str, fmt: str = "{:+.3f}",
                      cmap: str = "magma") -> None:
    """One cell per head: values (n_layer, n_head), each written in its cell."""
    plt = pyplot()
    n_layer, n_head = values.shape
    fig, ax = plt.subplots(figsize=(1.2 * n_head + 2.5, 0.9 * n_layer + 1.8))
    image = draw_head_cells(ax, values.numpy(), fmt, 8, cmap=cmap)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    save_figure(fig, path)


METHOD_COLOURS = {"dpo": "tab:blue", "cdpo": "tab:cyan", "ipo": "tab:purple", "dpo_soft": "tab:olive",
                  "rloo": "tab:green", "ppo": "tab:red"}


def plot_score_against_kl(report: dict, path: str) -> None:
    """The report's measure (the oracle score; with no oracle, the reward model's) against sqrt(KL to the base):
    best-of-n's curve, and every method's kept checkpoints in training order (one line per seed), so that
    methods are compared at equal KL, not at equal steps."""
    plt = pyplot()
    key = report.get("measure", "oracle")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for seed_index, bon in enumerate(report["bon_curves"].values()):
        ax.plot([b["kl"] ** 0.5 for b in bon], [b[key] for b in bon], color="black", marker="s", markersize=3,
                alpha=0.7, label="best-of-n" if seed_index == 0 else None)
        for b in bon if seed_index == 0 else []:
            ax.annotate(f"n={b['n']}", (b["kl"] ** 0.5, b[key]), fontsize=6, xytext=(3, -9), textcoords="offset points")
    for seed_index, curves in enumerate(report["curves"].values()):
        for method, points in curves.items():
            ax.plot([max(p["kl"], 0.0) ** 0.5 for p in points], [p[key] for p in points], marker="o", alpha=0.7,
                    markersize=3, color=METHOD_COLOURS.get(method), label=method if seed_index == 0 else None)
    for target in report.get("matched_kl", {}):
        ax.axvline(float(target) ** 0.5, color="grey", linewidth=0.6, linestyle=":")
    score = "oracle score" if key == "oracle" else "reward-model score"
    source = f"oracle {report['oracle']}" if report["oracle"] else f"pairs {report.get('pairs')}, no oracle"
    finish_plot(fig, ax, "sqrt(KL to the base), sqrt(nats per sequence)", f"{score} (mean over held-out prompts)",
                f"{source}: score against distance from the base ({len(report['curves'])} seeds)", path, legend_size=8)


def plot_rm_against_oracle(report: dict, path: str) -> None:
    """The reward model's score (what RL optimises) against the oracle score, along training: where the
    reward model's score keeps rising and the oracle score does not, the policy is over-optimising the reward
    model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for seed_index, bon in enumerate(report["bon_curves"].values()):
        ax.plot([b["rm"] for b in bon], [b["oracle"] for b in bon], color="black", marker="s", markersize=3, alpha=0.7,
                label="best-of-n, n = 1 ... " if seed_index == 0 else None)
    for seed_index, curves in enumerate(report["curves"].values()):
        for method, points in curves.items():
            ax.plot([p["rm"] for p in points], [p["oracle"] for p in points], marker="o", markersize=3, alpha=0.7,
                    color=METHOD_COLOURS.get(method), label=f"{method}, kept checkpoints in order" if seed_index == 0 else None)
    finish_plot(fig, ax, "reward-model score", "oracle score",
                f"oracle {report['oracle']}: reward model against oracle over training", path, legend_size=8)


def plot_head_grid(rows: list[tuple[str, list[tuple[str, torch.Tensor]]]], title: str, path: str) -> list[tuple[int, int]]:
    """Rows of layer x head heatmaps, one value written in each cell: rows[i] = (row label, [(panel title,
    values (n_layer, n_head)), ...]). Returns the shape of every heatmap drawn."""
    plt = pyplot()
    n_rows, n_cols = len(rows), max(len(panels) for _, panels in rows)
    n_layer, n_head = rows[0][1][0][1].shape
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * (0.8 * n_head + 1.8), n_rows * (0.7 * n_layer + 1.4)),
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
            draw_head_cells(ax, grid, "{:.2g}", 7, cmap="RdBu_r" if signed else "magma", vmin=-limit if signed else 0,
                            vmax=limit)
            ax.set_title(f"{label}: {name}", fontsize=8)
            drawn.append(grid.shape)
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)
    return drawn


def plot_lines(series: dict[str, list[float]], xlabel: str, ylabel: str, title: str, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, values in series.items():
        ax.plot(range(len(values)), values, marker=".", label=name, color=METHOD_COLOURS.get(name))
    finish_plot(fig, ax, xlabel, ylabel, title, path)
