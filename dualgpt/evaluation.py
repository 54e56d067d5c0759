"""The loss over every token of a split: --mode=eval and --mode=export."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn as nn

from dualgpt import UserError
from dualgpt.checkpoint import (checkpoint_model, cpu_copy, layout_of, make_checkpoint,
                                save_checkpoint)
from dualgpt.layouts import convert_state_dict
from dualgpt.corpus import resolve_data
from dualgpt.data import Dataset
from dualgpt.runtime import autocast, progress


def checkpoint_with_data(model_class: type[nn.Module], cfg: dict) -> tuple[dict, nn.Module,
                                                                           Dataset]:
    """For the eval, export and heads modes: the checkpoint, its best model, and the data encoded
    with the checkpoint's own tokenizer at its block size."""
    ckpt, model = checkpoint_model(model_class, cfg)
    path = resolve_data(cfg["data"])
    data = Dataset(path, model.config.block_size, cfg["batch_size"], cfg["device"],
                   tokenizer_text=ckpt["tokenizer"], workers=cfg["data_workers"])
    return ckpt, model, data


def windows(data: Dataset, split: str):
    """Every token of the split once: non-overlapping block_size windows, in batches; the last
    window, which may be short, on its own."""
    ids, T = data.splits[split], data.block_size
    starts = list(range(0, len(ids) - 1, T))
    for i in range(0, len(starts), data.batch_size):
        chunk = [torch.from_numpy(ids[s:min(s + T, len(ids) - 1) + 1].astype(np.int64))
                 for s in starts[i:i + data.batch_size]]
        full = [xy for xy in chunk if len(xy) == T + 1]
        if full:
            xy = torch.stack(full).to(data.device)
            yield xy[:, :-1], xy[:, 1:].contiguous()  # as training's: a model may view() them
        for xy in chunk[len(full):]:
            yield xy[None, :-1].to(data.device), xy[None, 1:].to(data.device)


@torch.no_grad()
def full_loss(model: nn.Module, data: Dataset, split: str, device: str, dtype: str) -> float:
    """Exact mean loss over every token of the split (deterministic)."""
    model.eval()
    total, count = 0.0, 0
    batches = math.ceil((len(data.splits[split]) - 1) / data.block_size / data.batch_size)
    for x, y in progress(windows(data, split), total=batches, desc=f"eval {split}", leave=False):
        with autocast(device, dtype):
            loss = model(x, y)[1]
        total += loss.item() * y.numel()
        count += y.numel()
    return total / count


def evaluate_checkpoint(model_class: type[nn.Module], cfg: dict) -> dict:
    """--mode=eval: loss and bits per byte over the whole train and val splits."""
    _, model, data = checkpoint_with_data(model_class, cfg)
    result = {}
    for split in ("train", "val"):
        loss = full_loss(model, data, split, cfg["device"], cfg["dtype"])
        result[split] = {"loss": loss, "bpb": data.bpb(loss, split)}
        print(f"{split}: loss {loss:.4f}, {result[split]['bpb']:.4f} bits per byte")
    return result


def export_checkpoint(model_class: type[nn.Module], cfg: dict) -> dict | None:
    """--mode=export: a weights-only copy of ckpt at export_to, with its float32 loss over the
    whole val split; with --export_format=hf, a Hugging Face GPT-2 folder (hf_gpt2.py)."""
    if cfg["export_format"] == "hf":
        from dualgpt.hf_gpt2 import export_hf
        return export_hf(model_class, cfg)
    if not cfg["export_to"]:
        raise UserError("--mode=export needs --export_to=PATH for the weights-only copy")
    if os.path.abspath(cfg["export_to"]) == os.path.abspath(cfg["ckpt"]):
        raise UserError("--export_to must differ from --ckpt (the export keeps no optimizer state "
                        "to resume from)")
    ckpt, model, data = checkpoint_with_data(model_class, cfg)
    loss = full_loss(model, data, "val", cfg["device"], "float32")
    eval_result = {"val_loss": loss, "val_bpb": data.bpb(loss, "val"), "dtype": "float32"}
    # weights only: its best-val weights, in the layout it was written in, and no optimizer or RNG
    # state
    layout = layout_of(ckpt)
    weights = convert_state_dict(cpu_copy(model.state_dict()), model.layout, layout,
                                 model.config.n_head)
    save_checkpoint(cfg["export_to"], make_checkpoint(
        weights, ckpt["model_config"], layout, ckpt["tokenizer"], ckpt["iter_num"],
        ckpt.get("config", {}),
        best_val_loss=ckpt.get("best_val_loss", math.nan), train_s=ckpt.get("train_s", 0.0),
        eval=eval_result))
    print(f"exported the best weights of {cfg['ckpt']} (iteration {ckpt['iter_num']}) to "
          f"{cfg['export_to']}: "
          f"val loss {loss:.4f}, {eval_result['val_bpb']:.4f} bits per byte (float32, whole "
          "val split)")
    return eval_result
