"""Pictures of heads: the figures of --mode=heads and --mode=patch, and the head atlas,
<ckpt>.heads.html, one self-contained page (atlas.html with the data inline) that fetches nothing,
so it works offline.

Every colour scale is stated: attention and probe scores are shares of attention, drawn on a fixed
0-1 scale (a weak head looks weak whatever the model); signed effects on a scale symmetric around
0; the rest (entropy, distance, norm) from 0 to this model's largest value, which the legend says.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from dualgpt.files import write_text
from dualgpt.plots import pyplot, save_figure

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "atlas.html")
# what a grid cell can be coloured by: key of a heads.json row (or of patch.json's), label, scale
SCORES = {"induction": ("induction score (probe)", "share"),
          "duplicate_token": ("duplicate-token score (probe)", "share"),
          "previous_token": ("previous-token score (probe)", "share"),
          "previous_token_text": ("attention on the previous token (val text)", "share"),
          "current_token": ("attention on the token itself (val text)", "share"),
          "first_token": ("attention on the first token (val text)", "share"),
          "icl_change": ("in-context learning change when off (nats)", "signed"),
          "loss_increase": ("val loss increase when off (nats/token)", "signed"),
          "entropy": ("attention entropy (val text, nats)", "positive"),
          "mean_distance": ("mean distance attended back (val text, tokens)", "positive"),
          "output_norm": ("output norm (val text)", "positive"),
          "patch_effect": ("activation patching effect (--mode=patch)", "signed"),
          "dla": ("direct logit attribution (--mode=patch)", "signed")}


def matching_patch(path: str, run: dict, n_layer: int, n_head: int) -> dict | None:
    """The --mode=patch results at path if they are of the run's checkpoint, iteration and head
    mask, and of a model of n_layer x n_head heads (another run's would mix two models in one
    page), else None."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            patch = json.load(f)
        same = all(patch.get(k) == run[k] for k in ("checkpoint", "iter_num", "head_mask"))
        heads = {(p["layer"], p["head"]): (float(p["effect"]), float(p["dla"]))
                 for p in patch["heads"]}
        same = same and heads.keys() == {(l, h) for l in range(n_layer) for h in range(n_head)}
        same = same and len(patch["clean_ids"]) == len(patch["clean_tokens"])
    # cut short, emptied, not ours, or of a model of another shape
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        same = False
    if not same:
        print(f"note: {path} is of another checkpoint or run, or unreadable; the page leaves "
              "patching out")
    return patch if same else None


def causal_rows(weights: torch.Tensor) -> list:
    """(n_head, T, T) attention -> per head, per query q, its weights on keys 0..q (the rest is
    0), to 4 decimals: the page's data stays small."""
    T = weights.shape[-1]
    return [[[round(w, 4) for w in head[q, :q + 1].tolist()] for q in range(T)]
            for head in weights.float().cpu()]


def write_atlas(path: str, report: dict, inputs: dict[str, tuple[list[str], list[torch.Tensor]]],
                patch: dict | None) -> None:
    """The page at path: the heads report's rows (with patch's effect and dla where given), and
    every head's attention on each input (name -> token labels, per layer (n_head, T, T))."""
    rows = [dict(r) for r in report["heads"]]
    if patch is not None:
        by_head = {(p["layer"], p["head"]): p for p in patch["heads"]}
        for r in rows:
            r["patch_effect"] = by_head[r["layer"], r["head"]]["effect"]
            r["dla"] = by_head[r["layer"], r["head"]]["dla"]
    mask = [[r["layer"], r["head"]] for r in rows if r["masked"]]
    data = {"title": f"Head atlas: {report['checkpoint']} (iteration {report['iter_num']})",
            "summary": f"in-context learning {report['icl_score']:+.3f} nats on the probe, val "
                       f"loss {report['val_loss']:.4f}; labels where a score reaches "
                       f"{report['probe']['label_threshold']}",
            "mask": mask, "n_layer": report["n_layer"], "n_head": report["n_head"],
            "scores": [{"key": k, "label": label, "scale": scale}
                       for k, (label, scale) in SCORES.items() if k in rows[0]],
            "heads": rows,
            "inputs": [{"name": name, "tokens": tokens, "attention": [causal_rows(w) for w in ws]}
                       for name, (tokens, ws) in inputs.items()],
            "patch": patch and {"clean": patch["clean"], "corrupt": patch["corrupt"],
                                "answers": patch["answers"], "tokens": patch["clean_tokens"],
                                "residual": patch["residual"]}}
    # "<" escaped: a token "</script>" cannot end the data early
    payload = json.dumps(data).replace("<", "\\u003c")
    with open(TEMPLATE, encoding="utf-8") as f:
        write_text(path, f.read().replace("/*DATA*/null", payload))


# --- figures -------------------------------------------------------------------------------------


def plot_attention(weights: list[torch.Tensor], labels: list[str], title: str, path: str,
                   mask: set[tuple[int, int]] = frozenset()) -> None:
    """A grid of attention maps on the fixed 0-1 scale: rows are layers, columns heads;
    weights[layer] is (nh, T, T); a masked head's map is left blank and says so."""
    plt = pyplot()
    n_layer, n_head, T = len(weights), weights[0].shape[0], weights[0].shape[-1]
    size = max(2.5, T * 0.14)
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head + 1.5, size * n_layer + 1),
                             squeeze=False, layout="constrained")
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            shown = np.full((T, T), np.nan) if (layer, head) in mask else (
                weights[layer][head].float().cpu().numpy())
            image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer}, head {head}" + (" (masked)" if (layer, head) in mask
                                                          else ""), fontsize=9)
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
        ax.text(head, layer, "masked" if np.isnan(value) else fmt.format(value), ha="center",
                va="center", fontsize=fontsize, color="grey")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    return image


def plot_head_heatmap(values: torch.Tensor, title: str, label: str, path: str,
                      fmt: str = "{:+.3f}") -> None:
    """One cell per head, values (n_layer, n_head) (NaN: masked), each written in its cell, on a
    scale symmetric around 0 (the values are signed effects)."""
    plt = pyplot()
    n_layer, n_head = values.shape
    grid = values.numpy()
    limit = max(float(np.nanmax(np.abs(grid), initial=0.0)), 1e-9)
    fig, ax = plt.subplots(figsize=(1.2 * n_head + 2.5, 0.9 * n_layer + 1.8))
    image = draw_head_cells(ax, grid, fmt, 8, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    save_figure(fig, path)


def plot_patching(heads: torch.Tensor, residual: torch.Tensor, tokens: list[str], title: str,
                  path: str) -> None:
    """--mode=patch's figure: each head's effect (layer x head) and each residual position's
    (layer x token of the clean prompt), on one scale symmetric around 0."""
    plt = pyplot()
    limit = max(heads.abs().max().item(), residual.abs().max().item(), 1e-9)
    n_layer, n_head = heads.shape
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(1.0 * n_head + 0.35 * len(tokens) + 4, 0.6 * n_layer + 2.6),
        width_ratios=[n_head + 1, len(tokens)], layout="constrained")
    draw_head_cells(left, heads.numpy(), "{:+.2f}", 7, cmap="RdBu_r", vmin=-limit, vmax=limit)
    left.set(xlabel="head", ylabel="layer", title="head outputs")
    image = right.imshow(residual.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    right.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    right.set_yticks(range(n_layer))
    right.set(xlabel="position (clean prompt)", ylabel="layer",
              title="residual stream entering each layer")
    fig.colorbar(image, ax=[left, right], label="effect (1 = restores the clean answer)")
    fig.suptitle(title)
    save_figure(fig, path)


def plot_composition(scores: dict[str, torch.Tensor], baseline: float, title: str,
                     path: str) -> None:
    """Q-, K- and V-composition side by side: a row per earlier head, a column per head of a
    later layer (grey where the pair does not compose), each score written in its cell."""
    plt = pyplot()
    n_layer, n_head = next(iter(scores.values())).shape[:2]
    heads = [(layer, head) for layer in range(n_layer) for head in range(n_head)]
    writers, readers = heads[:-n_head], heads[n_head:]
    top = max(float(s.max()) for s in scores.values())
    fig, axes = plt.subplots(1, len(scores), squeeze=False, layout="constrained",
                             figsize=(0.5 * len(readers) * len(scores) + 3,
                                      0.4 * len(writers) + 2))
    for ax, (kind, s) in zip(axes[0], scores.items()):
        grid = np.array([[s[a][b].item() if a[0] < b[0] else np.nan for b in readers]
                         for a in writers])
        image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=top)
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w")
        ax.set_xticks(range(len(readers)), [f"{l}.{h}" for l, h in readers], rotation=90)
        ax.set_yticks(range(len(writers)), [f"{l}.{h}" for l, h in writers])
        ax.set_xlabel("later head (reads)")
        ax.set_ylabel("earlier head (writes)")
        ax.set_title(f"{kind.upper()}-composition")
    fig.colorbar(image, ax=axes, shrink=0.8,
                 label=f"composition score (random matrices: {baseline:.3f})")
    fig.suptitle(title)
    save_figure(fig, path)
