"""The head atlas: --mode=heads's page, <ckpt>.heads.html. One self-contained file (atlas.html with
the data inline): a grid of layer x head cells coloured by a score the user picks, and, for the
head clicked, its attention over the prompt's tokens. It fetches nothing, so it works offline."""
from __future__ import annotations

import json
import os

import torch

from dualgpt.files import write_text

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "atlas.html")
# the scores a cell can be coloured by: key of a heads.json row (or of patch.json's) -> label
SCORES = {"induction": "induction score (probe)",
          "duplicate_token": "duplicate-token score (probe)",
          "previous_token": "previous-token score (probe)",
          "icl_change": "in-context learning change when off (nats)",
          "loss_increase": "val loss increase when off (nats/token)",
          "entropy": "attention entropy (val text, nats)",
          "mean_distance": "mean distance attended back (val text, tokens)",
          "first_token": "attention on the first token (val text)",
          "output_norm": "output norm (val text)",
          "patch_effect": "activation patching effect (--mode=patch)",
          "dla": "direct logit attribution (--mode=patch)"}


def matching_patch(path: str, report: dict) -> dict | None:
    """The --mode=patch results at path if they are of the same checkpoint, iteration and head
    mask as the heads report (another run's would mix two models in one page), else None."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            patch = json.load(f)
        same = all(patch.get(k) == report[k] for k in ("checkpoint", "iter_num", "head_mask"))
        heads = {(p["layer"], p["head"]): (float(p["effect"]), float(p["dla"]))
                 for p in patch["heads"]}
        same = same and heads.keys() == {(r["layer"], r["head"]) for r in report["heads"]}
    # cut short, emptied, not ours, or of a model of another shape
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        same = False
    if not same:
        print(f"note: {path} is of another checkpoint or run, or unreadable; the page leaves "
              "patching out")
    return patch if same else None


def write_atlas(path: str, report: dict, tokens: list[str], ids: list[int],
                weights: list[torch.Tensor], patch: dict | None) -> None:
    """The page at path: the heads report's rows (with patch's effect and dla where given) and
    each head's attention weights on the tokens (weights: per layer (n_head, T, T))."""
    rows = [dict(r) for r in report["heads"]]
    if patch is not None:
        by_head = {(p["layer"], p["head"]): p for p in patch["heads"]}
        for r in rows:
            r["patch_effect"] = by_head[r["layer"], r["head"]]["effect"]
            r["dla"] = by_head[r["layer"], r["head"]]["dla"]
    # the causal part only (query q sees keys 0..q), to 6 decimals: a tenth of the file's size
    attention = [[[[round(w, 6) for w in head[q, :q + 1].tolist()] for q in range(len(ids))]
                  for head in layer.float().cpu()] for layer in weights]
    data = {"title": f"Head atlas: {os.path.basename(report['checkpoint'])} "
                     f"(iteration {report['iter_num']})",
            "summary": f"in-context learning {report['icl_score']:+.3f} nats, val loss "
                       f"{report['val_loss']:.4f}; labels at a probe score of "
                       f"{report['probe']['label_threshold']}; click a head to see its "
                       "attention on the prompt",
            "n_layer": len(weights), "n_head": weights[0].shape[0],
            "scores": [{"key": k, "label": label} for k, label in SCORES.items() if k in rows[0]],
            "heads": rows, "tokens": tokens, "ids": ids, "attention": attention}
    # "<" escaped: a token "</script>" cannot end the data early
    payload = json.dumps(data).replace("<", "\\u003c")
    with open(TEMPLATE, encoding="utf-8") as f:
        write_text(path, f.read().replace("/*DATA*/", payload))
