"""Head-level research (--mode=heads): attention maps, per-head statistics on val text, scores on
the standard probe (repeated random tokens), and ablation of one head at a time."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from dualgpt import repo_path
from dualgpt.atlas import matching_patch, write_atlas
from dualgpt.evaluation import checkpoint_with_data
from dualgpt.plots import pyplot, save_figure
from dualgpt.probes import (PROBES, probe_length, probe_scores, recording, repeated_tokens,
                            training_tokens)
from dualgpt.runconfig import parse_head_mask
from dualgpt.runtime import autocast, progress
from dualgpt.sampling import read_prompt
from dualgpt.files import write_json
from minbpe.base import render_token


@torch.no_grad()
def head_statistics(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head averages over every query position of the batches; each value is (n_layer,
    n_head)."""
    sums: dict[str, torch.Tensor] = {}
    with recording(model):
        for x in batches:
            model(x)
            for layer, block in enumerate(model.blocks):
                att, out = block.attn.recorded()  # (B, nh, T, T), (B, nh, T, hs)
                T = att.shape[-1]
                pos = torch.arange(T, device=att.device)
                distance = (pos[:, None] - pos[None, :]).clamp_min(0)  # how far back each key is
                stats = {
                    "entropy": -(att * att.clamp_min(1e-12).log()).sum(-1).mean((0, 2)),
                    "mean_distance": (att * distance).sum(-1).mean((0, 2)),
                    "previous_token": att[..., 1:, :].diagonal(dim1=-2, dim2=-1).mean((0, 2)),
                    "first_token": att[..., 1:, 0].mean((0, 2)),
                    "output_norm": out.norm(dim=-1).mean((0, 2)),
                }
                for name, value in stats.items():
                    total = sums.setdefault(name, torch.zeros(len(model.blocks), value.numel()))
                    total[layer] += value.float().cpu()
    return {name: total / len(batches) for name, total in sums.items()}


LABEL_THRESHOLD = 0.4  # a head is labelled by its highest probe score if it reaches this


def head_label(row: dict) -> str:
    """The probe a head scores highest on, if that score reaches LABEL_THRESHOLD; else ''."""
    best = max(PROBES, key=lambda name: row[name])
    return best if row[best] >= LABEL_THRESHOLD else ""


@torch.no_grad()
def ablation(model: nn.Module, metric: Callable[[], float],
             base_mask: set[tuple[int, int]]) -> tuple[float, torch.Tensor]:
    """metric() with base_mask's heads off, and how much it changes when each other head is also
    switched off alone: (value, (n_layer, n_head) changes)."""
    base = metric()
    n_layer, n_head = model.config.n_layer, model.config.n_head
    delta = torch.zeros(n_layer, n_head)
    for layer, head in progress([(l, h) for l in range(n_layer) for h in range(n_head)],
                                desc="ablating heads", leave=False):
        model.set_head_mask(base_mask | {(layer, head)})
        delta[layer, head] = metric() - base
    model.set_head_mask(base_mask)
    return base, delta


def mean_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str,
              dtype: str) -> float:
    total = 0.0
    for x, y in batches:
        with autocast(device, dtype):
            total += model(x, y)[1].item()
    return total / len(batches)


def recorded_attention(model: nn.Module, ids: list[int], device: str) -> list[torch.Tensor]:
    """Every layer's attention weights (n_head, T, T) on one sequence of token ids."""
    with recording(model):
        model(torch.tensor([ids], device=device))
        return [block.attn.recorded()[0][0] for block in model.blocks]


def token_labels(vocab: dict[int, bytes], ids: list[int]) -> list[str]:
    """Readable axis labels: ␣ for a space, ↵ for a newline."""
    return [render_token(vocab[i].replace(b"\n", "↵".encode())).replace(" ", "␣") for i in ids]


def print_head_table(rows: list[dict]) -> None:
    print(f"{'head':>6} {'+loss':>8} {'+bpb':>7} {'entropy':>8} {'distance':>9} {'first tok':>10} "
          f"{'out norm':>9} {'prev tok':>9} {'dup tok':>8} {'induct':>7} {'ICL off':>8}  label")
    for r in rows:
        print(f"{r['layer']:>4}.{r['head']:<1} {r['loss_increase']:>+8.4f} "
              f"{r['bpb_increase']:>+7.3f} {r['entropy']:>8.3f} {r['mean_distance']:>9.2f} "
              f"{r['first_token']:>10.3f} {r['output_norm']:>9.3f} {r['previous_token']:>9.3f} "
              f"{r['duplicate_token']:>8.3f} {r['induction']:>7.3f} {r['icl_change']:>+8.3f}  "
              f"{r['label'] or '-'}")


def analyse_heads(model_class: type[nn.Module], cfg: dict) -> dict:
    """--mode=heads: attention maps of a prompt, per-head statistics and ablation over the val
    split."""
    ckpt, model, data = checkpoint_with_data(model_class, cfg)
    model.eval()
    length = probe_length(cfg["probe_length"], model.config.block_size)  # before writing anything
    name = os.path.splitext(os.path.basename(cfg["ckpt"]))[0]
    prefix = repo_path("generate_text", name)
    n_map = min(64, model.config.block_size)  # beyond ~64 tokens the labels are unreadable
    if cfg["prompt"]:
        ids = data.tok.encode(read_prompt(cfg["prompt"]), allowed_special="none")[-n_map:]
    else:  # an excerpt of the val split
        ids = data.splits["val"][:n_map].astype(np.int64).tolist()
    weights = recorded_attention(model, ids, cfg["device"])
    labels = token_labels(data.tok.vocab, ids)
    title = f"{name}: attention maps (iteration {ckpt['iter_num']})"
    files = [prefix + ".heads.png"]
    plot_attention(weights, labels, title, files[0])
    if cfg["heads_per_layer"]:
        for layer, w in enumerate(weights):
            files.append(f"{prefix}.heads.layer{layer}.png")
            plot_attention([w], labels, f"{title}, layer {layer}", files[-1])

    pool = training_tokens(data.splits["train"])
    probe = repeated_tokens(cfg["probe_sequences"], length, pool, cfg["seed"]).to(cfg["device"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    batches = [data.batch("val", gen) for _ in range(cfg["eval_iters"])]
    stats = head_statistics(model, [x for x, _ in batches])
    stats.update(probe_scores(model, probe, length)[0])  # previous_token: the probe's, not val's
    mask = parse_head_mask(cfg["head_mask"])
    base, delta = ablation(model, lambda: mean_loss(model, batches, cfg["device"], cfg["dtype"]),
                           mask)
    icl, icl_delta = ablation(model, lambda: probe_scores(model, probe, length)[1], mask)
    files.append(prefix + ".ablation.png")
    plot_head_heatmap(delta, f"{name}: val loss increase when one head is switched off",
                      "val loss increase (nats/token)", files[-1])

    rows = []
    for layer in range(model.config.n_layer):
        for head in range(model.config.n_head):
            row = {"layer": layer, "head": head, "loss_increase": delta[layer, head].item(),
                   "bpb_increase": data.bpb(delta[layer, head].item(), "val"),
                   "icl_change": icl_delta[layer, head].item()}
            row.update({k: v[layer, head].item() for k, v in stats.items()})
            rows.append(dict(row, label=head_label(row)))
    rows.sort(key=lambda r: -r["loss_increase"])
    print(f"val loss {base:.4f} ({data.bpb(base, 'val'):.3f} bpb) over {len(batches)} batches; "
          f"in-context learning {icl:+.3f} nats on {len(probe)} probes of {length} repeated "
          f"random tokens of the {len(pool)} in the train split (ICL off: its change with the "
          f"head off; labels at a probe score of {LABEL_THRESHOLD}); heads by importance:")
    print_head_table(rows)
    report = {"checkpoint": cfg["ckpt"], "iter_num": ckpt["iter_num"],
              "head_mask": cfg["head_mask"], "device": cfg["device"], "dtype": cfg["dtype"],
              "val_batches": len(batches), "val_loss": base, "icl_score": icl,
              "probe": {"sequences": len(probe), "length": length, "seed": cfg["seed"],
                        "tokens": len(pool), "drawn_from": "ids in the train split",
                        "label_threshold": LABEL_THRESHOLD},
              "heads": rows}
    files.append(prefix + ".heads.json")
    write_json(files[-1], report)
    files.append(prefix + ".heads.html")  # the atlas: with patching's results if of this model
    write_atlas(files[-1], report, labels, ids, weights,
                matching_patch(prefix + ".patch.json", report))
    print("wrote " + ", ".join(files))
    return report


# --- the figures of --mode=heads -----------------------------------------------------------------


def plot_attention(weights: list[torch.Tensor], labels: list[str], title: str, path: str) -> None:
    """A grid of attention maps: rows are layers, columns heads; weights[layer] is (nh, T, T)."""
    plt = pyplot()
    n_layer, n_head, T = len(weights), weights[0].shape[0], weights[0].shape[-1]
    size = max(2.5, T * 0.14)
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head + 1.5, size * n_layer + 1),
                             squeeze=False,
                             layout="constrained")
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(weights[layer][head].cpu().numpy(), cmap="viridis", vmin=0.0,
                              vmax=1.0)
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
        ax.text(head, layer, fmt.format(value), ha="center", va="center", fontsize=fontsize,
                color="grey")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    return image


def plot_head_heatmap(values: torch.Tensor, title: str, label: str, path: str,
                      fmt: str = "{:+.3f}",
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
