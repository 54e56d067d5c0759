"""LB-GPT's state dict <-> SM-GPT's, losslessly, so that a checkpoint loads into either script.

LB-GPT keeps q, k, v per head (blocks.i.attn.heads.h.query.weight, ...); SM-GPT stacks them into
one c_attn: every head's query rows, then every head's key rows, then value.
"""
from __future__ import annotations

import re

import torch

HEAD_KEY = re.compile(r"(.*\.attn\.)heads\.(\d+)\.(query|key|value)\.(weight|bias)$")


def lb_to_sm(state: dict, n_head: int) -> dict:
    """LB-GPT state dict -> SM-GPT: stack every head's query, then key, then value rows into
    c_attn."""
    out, prefixes = {}, set()
    for name, tensor in state.items():
        m = HEAD_KEY.match(name)
        if m:
            prefixes.add((m.group(1), m.group(4)))
        else:
            out[name] = tensor
    for prefix, param in sorted(prefixes):
        out[f"{prefix}c_attn.{param}"] = torch.cat([state[f"{prefix}heads.{h}.{proj}.{param}"]
                                                    for proj in ("query", "key",
                                                                 "value") for h in range(n_head)])
    return out


def sm_to_lb(state: dict, n_head: int) -> dict:
    """SM-GPT state dict -> LB-GPT: the inverse of lb_to_sm, exactly."""
    out = {}
    for name, tensor in state.items():
        if ".attn.c_attn." not in name:
            out[name] = tensor
            continue
        prefix, param = name.split("c_attn.")
        for i, part in enumerate(tensor.chunk(3 * n_head)):
            proj, h = ("query", "key", "value")[i // n_head], i % n_head
            out[f"{prefix}heads.{h}.{proj}.{param}"] = part.clone()
    return out


def convert_state_dict(state: dict, layout: str, to_layout: str, n_head: int) -> dict:
    """A state dict written by one model ("LB-GPT" or "SM-GPT"), in the other's layout."""
    if layout == to_layout:
        return state
    return lb_to_sm(state, n_head) if to_layout == "SM-GPT" else sm_to_lb(state, n_head)
