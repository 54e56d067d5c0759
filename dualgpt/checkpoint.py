"""Checkpoints: written atomically, read without unpickling code, and loadable by either script.

A checkpoint is a dict of tensors and plain values: "model" (latest weights), "optimizer", "best_model"
(best-val weights, used by sample/eval/heads), "best_val_loss", "model_config", "layout" ("looped" for
gpt.py, "fused" for gpt_.py), "config" (the run config), "iter_num", "train_s", "tokenizer" (the .model
text), and the RNG states "rng_cpu", "rng_cuda", "rng_batches" for an exact resume.
"""
from __future__ import annotations

import os
import re
import sys

import torch
import torch.nn as nn

from dualgpt import UserError
from minbpe.base import atomic_open

REQUIRED = {"model", "best_model", "model_config", "layout", "tokenizer", "iter_num"}


def log_path(ckpt: str) -> str:
    """The JSON-lines training log kept beside a checkpoint."""
    return os.path.splitext(ckpt)[0] + ".jsonl"


def save_checkpoint(path: str, state: dict) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first: python {os.path.basename(sys.argv[0])} --mode=train")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
    missing = REQUIRED - set(ckpt if isinstance(ckpt, dict) else {})
    if missing:
        raise UserError(f"{path} is not a Dual-GPT checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


# -----------------------------------------------------------------------------------------
# gpt.py keeps q, k, v per head (blocks.i.attn.heads.h.query.weight, ...); gpt_.py stacks them into one
# c_attn (every head's query rows, then every head's key rows, then value). The mapping is lossless.

HEAD_KEY = re.compile(r"(.*\.attn\.)heads\.(\d+)\.(query|key|value)\.(weight|bias)$")


def looped_to_fused(state: dict, n_head: int) -> dict:
    """LB-GPT state dict -> SM-GPT: stack every head's query, then key, then value rows into c_attn."""
    out, prefixes = {}, set()
    for name, tensor in state.items():
        m = HEAD_KEY.match(name)
        if m:
            prefixes.add((m.group(1), m.group(4)))
        else:
            out[name] = tensor
    for prefix, param in sorted(prefixes):
        out[f"{prefix}c_attn.{param}"] = torch.cat([state[f"{prefix}heads.{h}.{proj}.{param}"]
                                                    for proj in ("query", "key", "value") for h in range(n_head)])
    return out


def fused_to_looped(state: dict, n_head: int) -> dict:
    """SM-GPT state dict -> LB-GPT: the inverse of looped_to_fused, exactly."""
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
    """A state dict written in one layout ("looped" or "fused"), in the other."""
    if layout == to_layout:
        return state
    return looped_to_fused(state, n_head) if to_layout == "fused" else fused_to_looped(state, n_head)


# -----------------------------------------------------------------------------------------


def cpu_copy(state: dict) -> dict:
    """A CPU copy of a state dict in which tensors that shared memory still do: the tied embedding and output
    head are stored once, not twice (4 MB of the default model's 7 MB)."""
    copies, out = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def export_weights(ckpt: dict, weights: dict, eval_result: dict) -> dict:
    """A weights-only copy of a checkpoint for sharing: weights (its best-val weights, stored once under both
    names), what sampling, eval and --mode=heads read, and no optimizer or RNG state, so it cannot be resumed.
    eval_result (its float32 loss over the whole val split) is recorded in it, so it can be checked later."""
    keep = ("model_config", "layout", "tokenizer", "iter_num", "train_s", "best_val_loss", "config")
    return {"model": weights, "best_model": weights, **{k: ckpt[k] for k in keep if k in ckpt}, "eval": eval_result}


def build_model(model_class: type[nn.Module], config, head_mask: set[tuple[int, int]] = frozenset(),
                options: dict | None = None) -> nn.Module:
    """A model of the script's class with the given ModelConfig, switched-off heads and run options."""
    model = model_class(config, **(options or {}))
    for layer, head in sorted(head_mask):
        if layer >= config.n_layer or head >= config.n_head:
            raise UserError(f"head_mask: head {layer}.{head} does not exist (the model has {config.n_layer} "
                            f"layers x {config.n_head} heads, numbered from 0)")
    model.set_head_mask(set(head_mask))
    return model


def model_from_checkpoint(model_class: type[nn.Module], ckpt: dict, path: str, device: str,
                          head_mask: set[tuple[int, int]] = frozenset(), options: dict | None = None) -> nn.Module:
    """A checkpoint's best-val weights (either layout) in a model of model_class, on device."""
    try:
        model = build_model(model_class, model_class.config_class(**ckpt["model_config"]), head_mask, options)
        model.load_state_dict(convert_state_dict(ckpt["best_model"], ckpt["layout"], model.layout, model.config.n_head))
    except (TypeError, RuntimeError, KeyError) as e:
        raise UserError(f"{path}: incompatible checkpoint ({str(e).splitlines()[0][:160]})") from None
    return model.to(device)
