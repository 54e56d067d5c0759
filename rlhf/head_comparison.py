"""Comparing two models head by head (rlhf/heads.py): how far each head moved, how its attention
changed, and transplanting heads or MLPs from one model into another.

State dicts are in LB-GPT's layout (gpt.py), where head h of layer l is a module of its own, plus
columns h*hs:(h+1)*hs of its layer's output projection, the slice that reads that head's output.
The parameter names are LB-GPT's module names (gpt.py).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from dualgpt.checkpoint import layout_of
from dualgpt.layouts import convert_state_dict
from dualgpt.hooks import patterns, run_with_cache

PART = re.compile(r"blocks\.(\d+)\.(?:(mlp)\.|attn\.(?:heads\.|proj\.weight$))")  # heads', MLPs'


def head_parameter(layer: int, head: int, proj: str, kind: str = "weight") -> str:
    """The name of a head's query, key or value weight (or bias) in LB-GPT's layout."""
    return f"blocks.{layer}.attn.heads.{head}.{proj}.{kind}"


def head_parameters(state: dict, layer: int, head: int) -> list[str]:
    """Every entry of one head in an LB-GPT state dict (biases only where the model has them)."""
    names = [head_parameter(layer, head, proj, kind)
             for proj in ("query", "key", "value") for kind in ("weight", "bias")]
    return [name for name in names if name in state]


def output_projection(layer: int) -> str:
    """A layer's attention output projection: column block h reads head h's output."""
    return f"blocks.{layer}.attn.proj.weight"


def mlp_parameter(layer: int, part: str) -> str:
    return f"blocks.{layer}.mlp.{part}.weight"


def head_columns(state: dict, head: int) -> slice:
    """The columns of a layer's output projection that read head `head`'s output."""
    hs = state[head_parameter(0, 0, "query")].shape[0]
    return slice(head * hs, (head + 1) * hs)


def part_of(name: str) -> tuple[str, int] | None:
    """("mlp", layer) or ("head", layer) for an entry that an MLP or the heads own; None for the
    rest (embeddings, LayerNorms, the output projection's bias)."""
    m = PART.match(name)
    return (("mlp" if m.group(2) else "head"), int(m.group(1))) if m else None


def lb_state(ckpt: dict) -> dict:
    """A checkpoint's best-val weights in LB-GPT's layout, where head h of layer l is a module of
    its own."""
    return convert_state_dict(ckpt["best_model"], layout_of(ckpt), "LB-GPT",
                              ckpt["model_config"]["n_head"])


def relative_change(tuned: torch.Tensor, base: torch.Tensor) -> float:
    """||tuned - base|| / ||base|| (Frobenius)."""
    return ((tuned.double() - base.double()).norm() / base.double().norm()).item()


def head_weight_change(base: dict, tuned: dict, n_layer: int,
                       n_head: int) -> dict[str, torch.Tensor]:
    """How far each head moved: the relative change of its query, key and value weights and of its
    slice of the output projection, each (n_layer, n_head); and of each MLP's two matrices,
    (n_layer, 1)."""
    change = {name: torch.zeros(n_layer, n_head) for name in ("query", "key", "value", "output")}
    change.update(mlp_fc=torch.zeros(n_layer, 1), mlp_proj=torch.zeros(n_layer, 1))
    for layer in range(n_layer):
        for head in range(n_head):
            for proj in ("query", "key", "value"):
                key = head_parameter(layer, head, proj)
                change[proj][layer, head] = relative_change(tuned[key], base[key])
            key, cols = output_projection(layer), head_columns(base, head)
            change["output"][layer, head] = relative_change(tuned[key][:, cols],
                                                            base[key][:, cols])
        for part in ("fc", "proj"):
            key = mlp_parameter(layer, part)
            change[f"mlp_{part}"][layer, 0] = relative_change(tuned[key], base[key])
    return change


def transplant(target: dict, donor: dict, heads: set[tuple[int, int]] = frozenset(),
               mlps: set[int] = frozenset(),
               rest: bool = False) -> dict:
    """target's weights with some parts taken from donor: heads (layer, head) with their q, k, v
    and output projection columns, whole MLPs by layer, and with rest=True everything else
    (embeddings, LayerNorms, the projection's bias). Every part taken is copied exactly."""
    out = {k: v.clone() for k, v in target.items()}
    for layer, head in heads:
        for key in head_parameters(donor, layer, head):
            out[key] = donor[key].clone()
        key, cols = output_projection(layer), head_columns(target, head)
        out[key][:, cols] = donor[key][:, cols]
    for key in donor:
        owner = part_of(key)  # ("mlp", layer), ("head", layer) or None for the rest
        if owner and owner[0] == "mlp" and owner[1] in mlps or rest and owner is None:
            out[key] = donor[key].clone()
    return out


def part_masks(state: dict, heads: set[tuple[int, int]] = frozenset(),
               mlps: bool = False) -> dict[str, torch.Tensor]:
    """An LB-GPT-layout mask (1 = in the part) of the entries that belong to the given heads, and
    to every MLP if mlps."""
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    ones = {k: torch.ones_like(v) for k, v in state.items()}
    layers = {owner[1] for owner in map(part_of, state) if owner}
    return transplant(zeros, ones, heads=set(heads), mlps=layers if mlps else set())


@torch.no_grad()
def attention_divergence(base: nn.Module, tuned: nn.Module,
                         batches: list[torch.Tensor]) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, at most log 2) between the two models' attention rows on
    the same inputs, averaged over every query position: (n_layer, n_head)."""
    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # over the last dimension
        return (a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log())).sum(-1)

    total = torch.zeros(base.config.n_layer, base.config.n_head)
    for x in batches:
        _, base_cache = run_with_cache(base, x, patterns(base))
        _, tuned_cache = run_with_cache(tuned, x, patterns(tuned))
        for layer, name in enumerate(patterns(base)):
            p, q = base_cache[name].double(), tuned_cache[name].double()  # (B, nh, T, T)
            m = (p + q) / 2
            total[layer] += ((kl(p, m) + kl(q, m)) / 2).mean((0, 2)).float().cpu()
    return total / len(batches)
