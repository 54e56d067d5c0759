"""The RLHF layer's figures: scores against KL, the reward model against the oracle, head grids."""
from __future__ import annotations

import math

import torch

from dualgpt.atlas import draw_head_cells
from dualgpt.plots import finish_plot, label_axes, pyplot, save_figure
from rlhf.report import MEASURE_NAMES

METHOD_COLOURS = {"dpo": "tab:blue", "cdpo": "tab:cyan", "ipo": "tab:purple",
                  "rloo": "tab:green", "ppo": "tab:red", "grpo": "tab:olive"}


def plot_score_against_kl(report: dict, path: str) -> None:
    """The first held-out judge's score (the headline) and, beside it, the score tuned for (the
    oracle's; with no oracle, the reward model's) against sqrt(KL to the base): best-of-n's curve,
    and every method's kept checkpoints in training order (one line per seed), so that methods
    are compared at equal KL, not at equal steps."""
    plt = pyplot()
    keys = [*(f"judge_{j}" for j in report["judges"][:1]), report["measure"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(7 * len(keys), 5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for seed_index, bon in enumerate(report["bon_curves"].values()):
            ax.plot([b["kl"] ** 0.5 for b in bon], [b[key] for b in bon], color="black",
                    marker="s", markersize=3, alpha=0.7,
                    label="best-of-n" if seed_index == 0 else None)
            for b in bon if seed_index == 0 else []:
                ax.annotate(f"n={b['n']}", (b["kl"] ** 0.5, b[key]), fontsize=6, xytext=(3, -9),
                            textcoords="offset points")
        for seed_index, curves in enumerate(report["curves"].values()):
            for method, points in curves.items():
                ax.plot([max(p["kl"], 0.0) ** 0.5 for p in points], [p[key] for p in points],
                        marker="o", alpha=0.7, markersize=3,
                        color=METHOD_COLOURS.get(method.partition("@")[0]),
                        linestyle="--" if "@" in method else "-",
                        label=method if seed_index == 0 else None)
        for target in report["matched_kl"]:
            ax.axvline(float(target) ** 0.5, color="grey", linewidth=0.6, linestyle=":")
        name = MEASURE_NAMES.get(key, key.replace("judge_", "judge ") + " (held out)")
        label_axes(ax, "sqrt(KL to the base), sqrt(nats per sequence)",
                   f"{name}, mean over held-out prompts", name, legend_size=8)
    source = (f"oracle {report['oracle']}" if report["oracle"]
              else f"pairs {report['pairs']}, no oracle")
    fig.suptitle(f"{source}: scores against distance from the base ({len(report['curves'])} "
                 "seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def method_panels(methods: list[str], width: float = 3.6, height: float = 3.0):
    """A grid of one panel per method, three across."""
    plt = pyplot()
    rows = -(-len(methods) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(3 * width, rows * height), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    return fig, dict(zip(methods, axes.flat))


def plot_rm_against_oracle(report: dict, path: str) -> None:
    """Over-optimisation, one panel per method: the reward model's gain (what RL optimises) and
    the oracle's against sqrt(KL), each in units of its spread over the base's samples, so that
    both share an axis; where the reward model's keeps rising and the oracle's does not, the
    policy over-optimises the reward model. Each kept policy's label: the reward model's accuracy
    on pairs of that policy's own samples (against the oracle)."""
    methods = list(next(iter(report["curves"].values())))
    fig, panels = method_panels(["best-of-n", *methods])
    for seed_index, seed in enumerate(report["curves"]):
        spread, curves = report["base_spread"][seed], report["curves"][seed]
        for method, points in {"best-of-n": report["bon_curves"][seed], **curves}.items():
            ax, x = panels[method], [max(p["kl"], 0.0) ** 0.5 for p in points]
            for score, colour in (("rm", "tab:orange"), ("oracle", "tab:blue")):
                ax.plot(x, [(p[score] - points[0][score]) / spread[score] for p in points],
                        marker="o", markersize=3, alpha=0.7, color=colour,
                        label=("reward model" if score == "rm" else "oracle")
                        if seed_index == 0 else None)
            for p, xi in zip(points[1:] if seed_index == 0 else [], x[1:]):
                if math.isfinite(p.get("rm_accuracy", math.nan)):
                    ax.annotate(f"{p['rm_accuracy']:.0%}", (xi, (p["rm"] - points[0]["rm"])
                                                            / spread["rm"]),
                                fontsize=6, xytext=(2, 3), textcoords="offset points")
            ax.set_title(method, fontsize=9)
    for ax in panels.values():
        ax.set_xlabel("sqrt(KL to the base)", fontsize=8)
        ax.set_ylabel("gain / base samples' std", fontsize=8)
        ax.grid(alpha=0.3)
    panels["best-of-n"].legend(fontsize=7)
    fig.suptitle(f"oracle {report['oracle']}: reward model against oracle, each kept policy "
                 f"({len(report['curves'])} seeds; labels: the reward model's accuracy on the "
                 f"policy's own samples, seed {next(iter(report['curves']))})", fontsize=9)
    save_figure(fig, path)


def plot_learning_curves(report: dict, path: str) -> None:
    """One panel per method, from its training log (every seed): the objective it optimised (RL:
    the KL-penalised reward; the DPO family: its loss) and, on the right axis, its KL to the
    base as training measured it."""
    methods = list(next(iter(report["logs"].values())))
    fig, panels = method_panels(methods)
    rights = {}  # each panel's right axis
    for seed_index, logs in enumerate(report["logs"].values()):
        for method, log in logs.items():
            ax = panels[method]
            objective = "loss" if "loss" in log[0] else "objective/rlhf_reward"
            ax.plot([e["step"] for e in log], [e[objective] for e in log], color="tab:blue",
                    alpha=0.6, linewidth=1, label=objective if seed_index == 0 else None)
            if method not in rights:
                rights[method] = ax.twinx()
            right = rights[method]
            right.plot([e["step"] for e in log], [e["exact_kl"] for e in log], color="tab:red",
                       alpha=0.6, linewidth=1)
            if seed_index == 0:
                ax.set_title(method, fontsize=9)
                ax.set_xlabel("step", fontsize=8)
                ax.set_ylabel(objective, fontsize=8, color="tab:blue")
                right.set_ylabel("KL to the base (nats)", fontsize=8, color="tab:red")
    fig.suptitle(f"{report['oracle'] or report['pairs']}: training curves "
                 f"({len(report['logs'])} seeds)", fontsize=9)
    save_figure(fig, path)


def plot_head_grid(rows: list[tuple[str, list[tuple[str, torch.Tensor]]]], title: str,
                   path: str) -> None:
    """Rows of layer x head heatmaps, one value written in each cell: rows[i] = (row label, [(panel
    title, values (n_layer, n_head)), ...])."""
    plt = pyplot()
    n_rows, n_cols = len(rows), max(len(panels) for _, panels in rows)
    n_layer, n_head = rows[0][1][0][1].shape
    fig, axes = plt.subplots(n_rows, n_cols,
                             figsize=(n_cols * (0.8 * n_head + 1.8),
                                      n_rows * (0.7 * n_layer + 1.4)),
                             squeeze=False, layout="constrained")
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
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def plot_lines(series: dict[str, list[float]], xlabel: str, ylabel: str, title: str,
               path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, values in series.items():
        ax.plot(range(len(values)), values, marker=".", label=name, color=METHOD_COLOURS.get(name))
    finish_plot(fig, ax, xlabel, ylabel, title, path)
