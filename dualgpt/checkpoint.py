"""Checkpoints: written atomically, read without unpickling code, and loadable by either script.

A checkpoint is a dict built by make_checkpoint alone: "model" (latest weights), "best_model"
(best-val weights: sample, eval, heads), "best_val_loss", "model_config", "layout" ("LB-GPT" or
"SM-GPT": the script that wrote it), "config" (the run config), "iter_num", "tokenizer" (the .model
text); training adds "optimizer" ("muon" beside it under Muon), "scaler" (float16's loss scale),
"train_s", "compile_s" and the RNG states "rng_cpu", "rng_cuda", "rng_batches"; export adds "eval",
import "imported_from", RLHF "rlhf".
"""
from __future__ import annotations

import io
import math
import os

import torch
import torch.nn as nn

from minbpe import RegexTokenizer

from dualgpt import UserError
from dualgpt.files import atomic_open
from dualgpt.runconfig import model_options, parse_head_mask, require

REQUIRED = {"model", "best_model", "model_config", "layout", "tokenizer", "iter_num"}


def log_path(ckpt: str) -> str:
    """The JSON-lines training log kept beside a checkpoint."""
    return os.path.splitext(ckpt)[0] + ".jsonl"


def set_aside(path: str) -> None:
    """An existing checkpoint and its log, kept as .bak: what --overwrite replaces is not lost."""
    for old in (path, log_path(path)):
        if os.path.exists(old):
            os.replace(old, old + ".bak")


def make_checkpoint(weights: dict, model_config: dict, layout: str, tokenizer: str, iter_num: int,
                    run_config: dict, best_weights: dict | None = None,
                    best_val_loss: float = math.nan, **extra) -> dict:
    """The one place a checkpoint dict is built (training, export, every RLHF save); extra: what
    only some writers add (optimizer and RNG states, "eval", "rlhf", the reward head)."""
    return {"model": weights, "best_model": weights if best_weights is None else best_weights,
            "best_val_loss": best_val_loss, "model_config": dict(model_config), "layout": layout,
            "tokenizer": tokenizer, "iter_num": iter_num, "config": dict(run_config), **extra}


def save_checkpoint(path: str, state: dict) -> None:
    """Serialised in memory, then written atomically: a failed write (disk full, a size limit)
    raises an OSError that says so, where torch's own writer reports a position mismatch."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_open(path, "wb") as f:
        f.write(buffer.getbuffer())


def load_tensors(path: str, remedy: str, device: str = "cpu"):
    """A file torch.save wrote (a checkpoint, RLHF's pairs), loaded without running pickled code; a
    file that is cut short, emptied or not torch's is a one-line error naming it and the remedy."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    # torch raises many kinds for a bad file; none of them may reach the user as a traceback
    except Exception as e:
        detail = (str(e).splitlines() or [""])[0][:120]
        raise UserError(f"{path} is not readable (cut short, emptied or not written by this repo: "
                        f"{e.__class__.__name__}{': ' + detail if detail else ''}); "
                        f"{remedy}") from None


def load_checkpoint(path: str) -> dict:
    """A Dual-GPT checkpoint, or one line that says what is wrong with the file and what to do."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first: python gpt.py --mode=train "
                        f"--ckpt={path}")
    remedy = (f"train again, or use the copy {path}.bak if --overwrite left one"
              if os.path.exists(path + ".bak")
              else "train it again (or write it again with the command that made it)")
    ckpt = load_tensors(path, remedy)
    missing = REQUIRED - set(ckpt if isinstance(ckpt, dict) else {})
    if missing:
        raise UserError(f"{path} is not a Dual-GPT checkpoint (missing "
                        f"{', '.join(sorted(missing))}); {remedy}")
    return ckpt


def checkpoint_to_resume(path: str, resume: bool, overwrite: bool, optimizer: str, layout: str,
                         model_config: dict) -> dict | None:
    """The checkpoint that --resume continues, checked against the run; None for a fresh run, which
    never silently replaces a checkpoint (without --overwrite, an existing one is one line)."""
    if not resume:
        if os.path.exists(path) and not overwrite:
            raise UserError(f"{path} already exists; pass --resume to continue it, or --overwrite "
                            f"to start over (the old one is kept as {os.path.basename(path)}.bak)")
        return None
    ckpt = load_checkpoint(path)
    trained_with = "muon" if "muon" in ckpt else "adamw"
    changed = [(k, v) for k, v in ckpt["model_config"].items() if model_config.get(k) != v]
    key, value = changed[0] if changed else ("", "")
    require([("optimizer" in ckpt, f"{path} holds weights only (no optimizer state), so it cannot "
              "be resumed; sample, eval or study heads with it, or train a new model with "
              "--ckpt=ANOTHER_PATH"),
             (layout_of(ckpt) == layout, f"{path} was written with {layout_of(ckpt)} attention; "
              "resume it with that script (sample and eval work from either)"),
             (trained_with == optimizer, f"{path} was trained with optimizer={trained_with}; pass "
              f"--optimizer={trained_with} to resume it"),
             (not changed, f"{path} was trained with {key}={value}, but the config says "
              f"{model_config.get(key)}; pass --{key}={value} to resume it")])
    return ckpt


def load_tokenizer_text(model_text: str) -> RegexTokenizer:
    """A tokenizer from the .model text stored in a checkpoint."""
    tok = RegexTokenizer()
    tok.load_text(model_text, "the checkpoint's tokenizer")
    return tok


def layout_of(ckpt: dict) -> str:
    """The layout of a checkpoint's weights, read from them (so that every version's load):
    "SM-GPT" (one c_attn per layer) or "LB-GPT" (q, k, v per head)."""
    return "SM-GPT" if any(".attn.c_attn." in name for name in ckpt["best_model"]) else "LB-GPT"


def cpu_copy(state: dict) -> dict:
    """A CPU copy of a state dict in which tensors that shared memory still do: the tied embedding
    and output head are stored once, not twice (4 MB of the default model's 7 MB)."""
    copies, out = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride())
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def build_model(model_class: type[nn.Module], config,
                head_mask: set[tuple[int, int]] = frozenset(),
                options: dict | None = None) -> nn.Module:
    """A model of the script's class with the given ModelConfig, switched-off heads and run
    options."""
    for layer, head in sorted(head_mask):
        if layer >= config.n_layer or head >= config.n_head:
            raise UserError(f"head_mask: head {layer}.{head} does not exist (the model has "
                            f"{config.n_layer} layers x {config.n_head} heads, numbered from 0)")
    model = model_class(config, **(options or {}))
    model.set_head_mask(set(head_mask))
    return model


def model_from_checkpoint(model_class: type[nn.Module], ckpt: dict, path: str, device: str,
                          head_mask: set[tuple[int, int]] = frozenset(),
                          options: dict | None = None) -> nn.Module:
    """A checkpoint's best-val weights (either layout) in a model of model_class, on device."""
    try:
        model = build_model(model_class, model_class.config_class(**ckpt["model_config"]),
                            head_mask, options)
        state = ckpt["best_model"]
        if layout_of(ckpt) != model.layout:  # written by the other script
            from dualgpt.layouts import convert_state_dict
            state = convert_state_dict(state, layout_of(ckpt), model.layout, model.config.n_head)
        model.load_state_dict(state)
    except (TypeError, RuntimeError, KeyError) as e:
        raise UserError(f"{path}: incompatible checkpoint "
                        f"({str(e).splitlines()[0][:160]})") from None
    return model.to(device)


def load_model(path: str, model_class: type[nn.Module],
               device: str = "cpu") -> tuple[nn.Module, RegexTokenizer]:
    """For a notebook: the checkpoint at path as a model of model_class (either script's
    checkpoint), in eval mode, and its tokenizer."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(model_class, ckpt, path, device).eval()
    return model, load_tokenizer_text(ckpt["tokenizer"])


def checkpoint_model(model_class: type[nn.Module], cfg: dict) -> tuple[dict, nn.Module]:
    """The checkpoint at --ckpt and its best model, with the run's head mask and model options
    (the sample, eval and heads modes)."""
    ckpt = load_checkpoint(cfg["ckpt"])
    return ckpt, model_from_checkpoint(model_class, ckpt, cfg["ckpt"], cfg["device"],
                                       parse_head_mask(cfg["head_mask"]),
                                       model_options(cfg, model_class))
