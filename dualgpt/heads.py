"""Head-level research (--mode=heads): each head's attention on val text, on the standard probe
(repeated random tokens) and on the user's prompt; its statistics and scores, a label from each;
its composition with the heads of later layers, read from the weights; and how much the val loss
and in-context learning change when it alone is switched off. Everything reads the model through
the hook points of hooks.py, as a notebook would."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from dualgpt import repo_path
from dualgpt.atlas import (matching_patch, plot_attention, plot_composition, plot_head_heatmap,
                           write_atlas)
from dualgpt.evaluation import checkpoint_with_data
from dualgpt.files import write_json
from dualgpt.hooks import patterns, run_with_cache
from dualgpt.layouts import convert_state_dict
from dualgpt.probes import (PROBES, probe_length, probe_scores, repeated_tokens,
                            training_tokens)
from dualgpt.runconfig import parse_head_mask
from dualgpt.runtime import autocast, progress
from dualgpt.sampling import read_prompt
from minbpe.base import render_token


def shipped_if_untrained(cfg: dict) -> dict:
    """cfg, or, when --ckpt is left at its default and nothing is trained there yet, cfg with the
    model the clone ships (said in one line): the head modes work on a fresh clone."""
    default = repo_path("model_dict", f"{cfg['script']}.pt")
    shipped = repo_path("model_dict", "shipped", f"{cfg['script']}.pt")
    if cfg["ckpt"] != default or os.path.exists(default) or not os.path.exists(shipped):
        return cfg
    print(f"note: no model trained at {default} yet; using the shipped one, {shipped}")
    return dict(cfg, ckpt=shipped)


def output_prefix(ckpt_path: str, mask: set[tuple[int, int]]) -> str:
    """generate_text/<checkpoint name>, and .masked-<layer.head>-... when heads are switched off:
    a masked run never overwrites the unmasked run's outputs."""
    name = os.path.splitext(os.path.basename(ckpt_path))[0]
    if mask:
        name += ".masked-" + "-".join(f"{layer}.{head}" for layer, head in sorted(mask))
    return repo_path("generate_text", name)


@torch.no_grad()
def head_statistics(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head averages over every query position of the batches; each value is (n_layer,
    n_head)."""
    names = patterns(model) + [f"blocks.{layer}.attn.hook_z" for layer in range(len(model.blocks))]
    sums: dict[str, torch.Tensor] = {}
    for x in batches:
        _, cache = run_with_cache(model, x, names)
        for layer in range(len(model.blocks)):
            att = cache[f"blocks.{layer}.attn.hook_pattern"]  # (B, nh, T, T)
            z = cache[f"blocks.{layer}.attn.hook_z"]  # (B, T, nh, hs)
            T = att.shape[-1]
            pos = torch.arange(T, device=att.device)
            distance = (pos[:, None] - pos[None, :]).clamp_min(0)  # how far back each key is
            stats = {
                "entropy": -(att * att.clamp_min(1e-12).log()).sum(-1).mean((0, 2)),
                "mean_distance": (att * distance).sum(-1).mean((0, 2)),
                # row t, column t - 1
                "previous_token_text": att.diagonal(-1, -2, -1).mean((0, 2)),
                "current_token": att.diagonal(0, -2, -1).mean((0, 2)),
                "first_token": att[..., 1:, 0].mean((0, 2)),
                "output_norm": z.norm(dim=-1).mean((0, 1)),
            }
            for name, value in stats.items():
                total = sums.setdefault(name, torch.zeros(len(model.blocks), value.numel()))
                total[layer] += value.float().cpu()
    return {name: total / len(batches) for name, total in sums.items()}


LABEL_THRESHOLD = 0.4  # a head is labelled by its highest score if it reaches this
TEXT_SCORES = ("previous_token_text", "current_token", "first_token")


def head_label(row: dict, scores: tuple[str, ...] = PROBES) -> str:
    """The score a head is highest on among `scores` (the probe's by default), if it reaches
    LABEL_THRESHOLD; else ''."""
    best = max(scores, key=lambda name: row[name])
    return best.removesuffix("_text") if row[best] >= LABEL_THRESHOLD else ""


def composition_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Q-, K- and V-composition of every head with every head of a later layer, (n_layer,
    n_head, n_layer, n_head), 0 where the second head is not in a later layer: TransformerLens's
    all_composition_scores (Elhage et al. 2021). ||A B|| / (||A|| ||B||) (Frobenius), A the
    earlier head's OV matrix, B the later one's QK (Q), QK^T (K) or OV (V), on the weights as
    TransformerLens processes them: each ln_1's weight folded into the q, k, v weights that read
    it, the reading weights centred (LayerNorm removes the mean), the output weights centred."""
    n_layer, n_head = model.config.n_layer, model.config.n_head
    state = {k: v.double().cpu() for k, v in convert_state_dict(
        model.state_dict(), model.layout, "LB-GPT", n_head).items()}
    ov, qk = [], []
    for layer in range(n_layer):
        gain = state[f"blocks.{layer}.ln_1.weight"][:, None]

        def reading(head: int, proj: str) -> torch.Tensor:  # (C, hs): x @ W, x the stream
            w = state[f"blocks.{layer}.attn.heads.{head}.{proj}.weight"].T * gain
            return w - w.mean(0)

        w_o = state[f"blocks.{layer}.attn.proj.weight"].T  # (C, C): rows hs*h.. read head h
        w_o = (w_o - w_o.mean(1, keepdim=True)).view(n_head, -1, w_o.shape[1])
        for head in range(n_head):
            ov.append(reading(head, "value") @ w_o[head])
            qk.append(reading(head, "query") @ reading(head, "key").T)
    ov, qk = torch.stack(ov), torch.stack(qk)  # (n_layer * n_head, C, C)
    layers = torch.arange(n_layer)
    later = layers[:, None, None, None] < layers[None, None, :, None]
    shape = (n_layer, n_head, n_layer, n_head)
    scores = {}
    for kind, right in (("q", qk), ("k", qk.transpose(1, 2)), ("v", ov)):
        product = torch.einsum("aij,bjk->abik", ov, right).norm(dim=(-2, -1))
        score = product / (ov.norm(dim=(-2, -1))[:, None] * right.norm(dim=(-2, -1))[None, :])
        scores[kind] = torch.where(later, score.view(shape), 0.0).float()
    return scores


def composition_baseline(d_model: int, d_head: int, draws: int = 64) -> float:
    """The mean composition score of two random matrices of the same shapes (Gaussian factors,
    rank d_head): the level a score of trained weights is read against."""
    gen = torch.Generator().manual_seed(0)

    def factored() -> torch.Tensor:
        return (torch.randn(d_model, d_head, generator=gen, dtype=torch.float64)
                @ torch.randn(d_head, d_model, generator=gen, dtype=torch.float64))

    total = 0.0
    for _ in range(draws):
        a, b = factored(), factored()
        total += ((a @ b).norm() / (a.norm() * b.norm())).item()
    return total / draws


@torch.no_grad()
def ablation(model: nn.Module, metric: Callable[[], float],
             base_mask: set[tuple[int, int]]) -> tuple[float, torch.Tensor]:
    """metric() with base_mask's heads off, and how much it changes when each other head is also
    switched off alone: (value, (n_layer, n_head) changes, NaN for base_mask's heads)."""
    base = metric()
    n_layer, n_head = model.config.n_layer, model.config.n_head
    delta = torch.full((n_layer, n_head), float("nan"))
    others = [(l, h) for l in range(n_layer) for h in range(n_head) if (l, h) not in base_mask]
    for layer, head in progress(others, desc="ablating heads", leave=False):
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


def attention_on(model: nn.Module, ids: list[int], device: str) -> list[torch.Tensor]:
    """Every layer's attention pattern (n_head, T, T) on one sequence of token ids."""
    _, cache = run_with_cache(model, torch.tensor([ids], device=device), patterns(model))
    return [cache[name][0] for name in patterns(model)]


def token_labels(vocab: dict[int, bytes], ids: list[int]) -> list[str]:
    """Readable axis labels: ␣ for a space, ↵ for a newline."""
    return [render_token(vocab[i].replace(b"\n", "↵".encode())).replace(" ", "␣") for i in ids]


def print_head_table(rows: list[dict]) -> None:
    columns = [("+loss", "loss_increase", "+.4f"), ("+bpb", "bpb_increase", "+.3f"),
               ("entropy", "entropy", ".3f"), ("distance", "mean_distance", ".2f"),
               ("prev txt", "previous_token_text", ".3f"), ("self", "current_token", ".3f"),
               ("first", "first_token", ".3f"), ("out norm", "output_norm", ".3f"),
               ("prev tok", "previous_token", ".3f"), ("dup tok", "duplicate_token", ".3f"),
               ("induct", "induction", ".3f"), ("ICL off", "icl_change", "+.3f")]
    print(f"{'head':>6} " + " ".join(f"{title:>8}" for title, _, _ in columns)
          + "  label (probe / text)")
    for r in rows:
        cells = ["masked" if r["masked"] else format(r[key], fmt) for _, key, fmt in columns]
        labels = "masked" if r["masked"] else f"{r['label'] or '-'} / {r['text_label'] or '-'}"
        print(f"{r['layer']:>4}.{r['head']:<1} " + " ".join(f"{c:>8}" for c in cells)
              + f"  {labels}")


def analyse_heads(model_class: type[nn.Module], cfg: dict) -> dict:
    """--mode=heads: every head's patterns, statistics, probe scores, composition and ablation;
    <ckpt>.heads.json, .heads.png, .ablation.png, .composition.png and the .heads.html atlas."""
    cfg = shipped_if_untrained(cfg)
    ckpt, model, data = checkpoint_with_data(model_class, cfg)
    model.eval()
    length = probe_length(cfg["probe_length"], model.config.block_size)  # before writing anything
    mask = parse_head_mask(cfg["head_mask"])
    n_layer, n_head = model.config.n_layer, model.config.n_head
    prefix = output_prefix(cfg["ckpt"], mask)
    name = os.path.basename(prefix)
    pool = training_tokens(data.splits["train"])
    probe = repeated_tokens(cfg["probe_sequences"], length, pool, cfg["seed"]).to(cfg["device"])

    # the inputs the atlas draws the patterns on: up to 64 tokens each (beyond, labels blur)
    n_map = min(64, model.config.block_size)
    inputs = {"val text": data.splits["val"][:n_map].astype(np.int64).tolist()}
    if cfg["prompt"]:
        ids = data.tok.encode(read_prompt(cfg["prompt"]), allowed_special="none")
        if len(ids) > n_map:
            print(f"note: the prompt is {len(ids)} tokens; the maps show its last {n_map}")
        inputs["prompt"] = ids[-n_map:]
    inputs["probe"] = probe[0, :n_map].tolist()
    run = {"checkpoint": cfg["ckpt"], "iter_num": ckpt["iter_num"], "head_mask": cfg["head_mask"]}
    patch = matching_patch(prefix + ".patch.json", run, n_layer, n_head)
    if patch:
        inputs["patch clean"], inputs["patch corrupt"] = patch["clean_ids"], patch["corrupt_ids"]
    shown = {key: (token_labels(data.tok.vocab, ids), attention_on(model, ids, cfg["device"]))
             for key, ids in inputs.items()}

    # statistics on fixed val batches, scores on the probe, weight-based composition, ablation
    gen = torch.Generator().manual_seed(cfg["seed"])
    batches = [data.batch("val", gen) for _ in range(cfg["eval_iters"])]
    stats = head_statistics(model, [x for x, _ in batches])
    stats.update(probe_scores(model, probe, length)[0])
    composition = composition_scores(model)
    baseline = composition_baseline(model.config.n_embd, model.config.n_embd // n_head)
    base, delta = ablation(model, lambda: mean_loss(model, batches, cfg["device"], cfg["dtype"]),
                           mask)
    icl, icl_delta = ablation(model, lambda: probe_scores(model, probe, length)[1], mask)

    rows = []
    for layer in range(n_layer):
        for head in range(n_head):
            row = {"layer": layer, "head": head, "masked": (layer, head) in mask}
            if row["masked"]:  # switched off: it writes nothing, so nothing of it is measured
                rows.append(dict(row, label="", text_label="", **{k: None for k in stats},
                                 loss_increase=None, bpb_increase=None, icl_change=None))
                continue
            row.update({k: v[layer, head].item() for k, v in stats.items()})
            row.update(loss_increase=delta[layer, head].item(),
                       bpb_increase=data.bpb(delta[layer, head].item(), "val"),
                       icl_change=icl_delta[layer, head].item())
            rows.append(dict(row, label=head_label(row), text_label=head_label(row, TEXT_SCORES)))
    rows.sort(key=lambda r: np.inf if r["masked"] else -r["loss_increase"])  # masked last
    pairs = [{"from": [a, i], "to": [b, j], **{k: s[a, i, b, j].item() for k, s in
                                               composition.items()}}
             for a in range(n_layer) for i in range(n_head)
             for b in range(a + 1, n_layer) for j in range(n_head)]
    print(f"val loss {base:.4f} ({data.bpb(base, 'val'):.3f} bpb) over {len(batches)} batches; "
          f"in-context learning {icl:+.3f} nats on {len(probe)} probes of {length} repeated "
          f"random tokens of the {len(pool)} in the train split (ICL off: its change with the "
          f"head off; labels at a score of {LABEL_THRESHOLD}); heads by importance:")
    print_head_table(rows)
    if pairs:
        top = sorted(pairs, key=lambda p: -p["k"])[:3]
        print(f"largest K-composition (random matrices: {baseline:.3f}): " + ", ".join(
            f"{p['from'][0]}.{p['from'][1]} -> {p['to'][0]}.{p['to'][1]} {p['k']:.3f}"
            for p in top))
    report = {**run, "device": cfg["device"], "dtype": cfg["dtype"],
              "n_layer": n_layer, "n_head": n_head,
              "val_batches": len(batches), "val_loss": base, "icl_score": icl,
              "probe": {"sequences": len(probe), "length": length, "seed": cfg["seed"],
                        "tokens": len(pool), "drawn_from": "ids in the train split",
                        "label_threshold": LABEL_THRESHOLD},
              "heads": rows,
              "composition": {"baseline": baseline, "pairs": pairs}}

    files = [prefix + ".heads.json", prefix + ".heads.png", prefix + ".ablation.png"]
    write_json(files[0], report)
    title = f"{name}: attention (iteration {ckpt['iter_num']})"
    first = "prompt" if "prompt" in shown else "val text"
    plot_attention(shown[first][1], shown[first][0], f"{title} on the {first}", files[1], mask)
    if cfg["heads_per_layer"]:
        for layer, weights in enumerate(shown[first][1]):
            files.append(f"{prefix}.heads.layer{layer}.png")
            plot_attention([weights], shown[first][0], f"{title} on the {first}, layer {layer}",
                           files[-1], {(0, h) for l, h in mask if l == layer})
    plot_head_heatmap(delta, f"{name}: val loss increase when one head is switched off",
                      "val loss increase (nats/token)", files[2])
    if pairs:
        files.append(prefix + ".composition.png")
        plot_composition(composition, baseline, f"{name}: composition of heads (weights)",
                         files[-1])
    files.append(prefix + ".heads.html")  # the atlas: with patching's results if of this model
    write_atlas(files[-1], report, shown, patch)
    print("wrote " + ", ".join(files))
    return report
