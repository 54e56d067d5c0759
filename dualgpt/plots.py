"""Figures: matplotlib on a file-only backend, every PNG written atomically, and the loss curve."""
from __future__ import annotations

import json

import numpy as np

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


def label_axes(ax, xlabel: str, ylabel: str, title: str, legend_size: float | None = None) -> None:
    """Label the axes, draw the grid and legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def finish_plot(fig, ax, xlabel: str, ylabel: str, title: str, path: str,
                legend_size: float | None = None) -> None:
    """Label the axes, draw the grid and legend, and save: the end of every line plot."""
    label_axes(ax, xlabel, ylabel, title, legend_size)
    fig.tight_layout()
    save_figure(fig, path)


def smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled towards 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** i))
    return out


def plot_losses(log_file: str, path: str, title: str, repeat_fraction: float = 0.0) -> None:
    """Bits per byte against training minutes, from the JSON-lines log: the train and val
    evaluations and the loss of the logged training batches (smoothed; with repeat_fraction, that
    share of them repeat their start, so they read easier than text); below, where the log has
    them, the in-context-learning score and each head's induction score (probes.py)."""
    with open(log_file, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "val_bpb" in r]
    steps = [r for r in records if "bpb" in r]
    probed = [r for r in evals if "icl_score" in r]
    xlabel = "training time, minutes (evaluation excluded)"
    fig, axes = pyplot().subplots(2 if probed else 1, 1, figsize=(7, 8 if probed else 4.5),
                                  sharex=True, squeeze=False)
    ax = axes[0][0]
    if steps:
        repeats = f", {repeat_fraction:.0%} of them with repeats" if repeat_fraction else ""
        ax.plot(minutes(steps), smoothed([r["bpb"] for r in steps]), linewidth=1, alpha=0.6,
                color="grey", label=f"training batches (smoothed{repeats})")
    for split in ("train", "val"):
        ax.plot(minutes(evals), [r[f"{split}_bpb"] for r in evals], marker="o",
                label=f"{split} split (evaluation, text as it is)")
    if probed:
        below, right = axes[1][0], axes[1][0].twinx()  # nats on the left, attention on the right
        below.plot(minutes(probed), [r["icl_score"] for r in probed], marker="o", color="black",
                   label="in-context learning (nats, loss on copy 1 - copy 2)")
        scores = np.array([r["probe_scores"]["induction"] for r in probed])  # (evals, layer, head)
        for (layer, head), _ in np.ndenumerate(scores[0]):
            right.plot(minutes(probed), scores[:, layer, head], linewidth=1.2,
                       label=f"head {layer}.{head} (right axis)")
        right.axhline(0.4, color="grey", linestyle=":", linewidth=1)  # the label (heads.py)
        right.set(ylim=(0, 1), ylabel="each head's induction score (label: 0.4, dotted)")
        label_axes(below, xlabel, "nats", "repeated random tokens")  # then a legend of both axes:
        below.legend(handles=below.lines + right.lines[:-1], fontsize=6, loc="upper left",
                      ncol=2)
    finish_plot(fig, ax, "" if probed else xlabel, "bits per byte", title, path)


def minutes(records: list[dict]) -> list[float]:
    return [r["train_s"] / 60 for r in records]
