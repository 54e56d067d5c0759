"""Every figure: loss curves, attention maps, per-head heatmaps. matplotlib is imported only when drawing."""
from __future__ import annotations

import json

import numpy as np
import torch

from minbpe.base import atomic_open


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


def plot_losses(log_file: str, path: str, title: str) -> None:
    """Train and val bits per byte against training minutes, from the JSON-lines log."""
    plt = pyplot()
    with open(log_file, encoding="utf-8") as f:
        evals = [r for r in map(json.loads, f) if "val_bpb" in r]
    minutes = [r["train_s"] / 60 for r in evals]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(minutes, [r["train_bpb"] for r in evals], marker="o", label="train")
    ax.plot(minutes, [r["val_bpb"] for r in evals], marker="o", label="val")
    ax.set_xlabel("training time, minutes (evaluation excluded)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


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


def plot_head_heatmap(values: torch.Tensor, title: str, label: str, path: str, fmt: str = "{:+.3f}",
                      cmap: str = "magma") -> None:
    """One cell per head: values (n_layer, n_head), each written in its cell."""
    plt = pyplot()
    n_layer, n_head = values.shape
    fig, ax = plt.subplots(figsize=(1.2 * n_head + 2.5, 0.9 * n_layer + 1.8))
    image = ax.imshow(values.numpy(), cmap=cmap)
    for (layer, head), value in np.ndenumerate(values.numpy()):
        ax.text(head, layer, fmt.format(value), ha="center", va="center", fontsize=8, color="grey")
    ax.set_xticks(range(n_head))
    ax.set_yticks(range(n_layer))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    save_figure(fig, path)
