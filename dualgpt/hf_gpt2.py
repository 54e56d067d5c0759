"""GPT-2's Hugging Face format, both ways. In (--mode=import): a folder of config.json,
model.safetensors or pytorch_model.bin, and vocab.json + merges.txt or tokenizer.json, as a
checkpoint of the script that runs it. Out (--mode=export --export_format=hf): a checkpoint as such
a folder, which transformers and tokenizers load. transformers is never imported here; safetensors
only to read or write model.safetensors.

Two things differ from our models. GPT-2's layers are Conv1D, whose weight (in, out) is a Linear's
transposed. And its token ids: minbpe's id of a single byte is the byte, GPT-2's come in the order
of its vocab.json (the byte-to-unicode table's order for GPT-2 itself; special tokens first for
many a trained tokenizer). The import permutes the embedding rows (and an untied head's) into
minbpe's ids, so the model computes the same function of the text; the export writes minbpe's ids,
so both libraries give a folder of ours the same ids.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from dualgpt import UserError
from dualgpt.checkpoint import (build_model, checkpoint_model, cpu_copy, load_tokenizer_text,
                                make_checkpoint, save_checkpoint, set_aside)
from dualgpt.layouts import convert_state_dict
from dualgpt.files import atomic_open, write_json
from dualgpt.tokenizer_files import tokenizer_from_files, write_tokenizer_files

# GPT-2's names -> F.gelu's
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# GPT-2's layers stored transposed
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
OURS = {"attn.c_attn": "attn.c_attn", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc",
        "mlp.c_proj": "mlp.proj",
        "ln_1": "ln_1", "ln_2": "ln_2"}  # a block's parts: GPT-2's name -> SM-GPT's


def install_hint(package: str) -> UserError:
    return UserError(f"this needs the {package} package: pip install {package}")


# -----------------------------------------------------------------------------------------
# Weights


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    """model.safetensors, else pytorch_model.bin (read with weights_only: no pickled code runs),
    without the "transformer." prefix of GPT2LMHeadModel's names."""
    safetensors_path = os.path.join(folder, "model.safetensors")
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(safetensors_path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise install_hint("safetensors") from None
        try:
            state = load_file(safetensors_path)
        except Exception as e:  # safetensors' own error class: cut short, not a safetensors file
            raise UserError(f"{safetensors_path} is not readable ({e.__class__.__name__}: "
                            f"{str(e)[:120]})") from None
    elif os.path.exists(bin_path):
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{bin_path} is not readable as plain tensors "
                            f"({e.__class__.__name__})") from None
    else:
        raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin")
    return {name.removeprefix("transformer."): tensor for name, tensor in state.items()}


def read_config(folder: str) -> dict:
    """config.json, refusing what GPT-2's architecture in this repo cannot be."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{folder} has no config.json")
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    if not isinstance(hf, dict):
        raise UserError(f"{path}: a JSON object is expected")
    sizes = [hf.get(k) for k in ("n_positions", "n_embd", "n_layer", "n_head")]
    refusals = [(hf.get("model_type") != "gpt2", f"model_type {hf.get('model_type')!r}, not gpt2"),
                (not all(isinstance(v, int) and v > 0 for v in sizes),
                 "n_positions, n_embd, n_layer and n_head must be positive integers"),
                (all(isinstance(v, int) and v > 0 for v in sizes)
                 and hf["n_embd"] % max(1, hf["n_head"]), "n_embd is not a multiple of n_head"),
                (not isinstance(hf.get("layer_norm_epsilon", 1e-5), (int, float)),
                 "layer_norm_epsilon is no number"),
                (hf.get("activation_function", "gelu_new") not in ACTIVATIONS,
                 f"activation {hf.get('activation_function')!r}"),
                (hf.get("n_inner") not in (None, 4 * (hf.get("n_embd") or 0)),
                 f"n_inner {hf.get('n_inner')} (ours is 4 x n_embd)"),
                (not hf.get("scale_attn_weights", True), "attention weights not scaled"),
                (hf.get("scale_attn_by_inverse_layer_idx", False), "attention scaled by the "
                 "layer's index"),
                (hf.get("add_cross_attention", False), "cross-attention")]
    why = [reason for refused, reason in refusals if refused]
    if why:
        raise UserError(f"{path}: {why[0]}; only GPT-2's architecture can be imported")
    return hf


def our_config(hf: dict, vocab_size: int) -> dict:
    """Our ModelConfig's fields for GPT-2's config.json (GPT-2 always has biases)."""
    return {"vocab_size": vocab_size, "block_size": hf["n_positions"], "n_layer": hf["n_layer"],
            "n_head": hf["n_head"], "n_embd": hf["n_embd"], "dropout": 0.0, "bias": True,
            "gelu": ACTIVATIONS[hf.get("activation_function", "gelu_new")],
            "layer_norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True))}


def state_from(hf: dict[str, torch.Tensor], n_layer: int, tied: bool,
               rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPT-2's weights in SM-GPT's names, Conv1D weights transposed, token rows in our ids' order
    (`rows`: the GPT-2 row of each of ours)."""
    state = {"wte.weight": hf["wte.weight"][rows], "wpe.weight": hf["wpe.weight"],
             "ln_f.weight": hf["ln_f.weight"], "ln_f.bias": hf["ln_f.bias"]}
    for i in range(n_layer):
        for theirs, ours in OURS.items():
            weight = hf[f"h.{i}.{theirs}.weight"]
            if theirs in CONV1D:  # GPT-2's Conv1D stores its weight transposed
                weight = weight.t().contiguous()
            state[f"blocks.{i}.{ours}.weight"] = weight
            state[f"blocks.{i}.{ours}.bias"] = hf[f"h.{i}.{theirs}.bias"]
    state["lm_head.weight"] = state["wte.weight"] if tied else hf["lm_head.weight"][rows]
    return state


def download(name: str) -> str:
    """A model name on the Hugging Face hub (e.g. openai-community/gpt2): its files downloaded by
    huggingface_hub, if installed, into its cache; the folder. Untested here: this machine cannot
    reach the hub."""
    a_path = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") != 1
    if a_path:  # not org/model
        raise UserError(f"no folder {name}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"no folder {name}; to download it from the Hugging Face hub, pip install "
                        "huggingface_hub") from None
    try:
        return snapshot_download(name, allow_patterns=["config.json", "*.safetensors",
                                                       "pytorch_model.bin", "vocab.json",
                                                       "merges.txt", "tokenizer.json"])
    except Exception as e:  # no network, no such model: one line
        raise UserError(f"could not download {name} from the Hugging Face hub "
                        f"({e.__class__.__name__})") from None


def import_checkpoint(model_class: type[nn.Module], cfg: dict) -> dict:
    """--mode=import: the Hugging Face GPT-2 folder at import_from as a checkpoint of this script
    at ckpt."""
    folder = cfg["import_from"]
    if folder and not os.path.exists(folder):  # not a path here: a hub name
        folder = download(folder)
    if not folder or not os.path.isdir(folder):
        raise UserError("--mode=import needs --import_from=FOLDER with a Hugging Face GPT-2 "
                        f"model, got {folder!r}")
    if os.path.exists(cfg["ckpt"]) and not cfg["overwrite"]:
        raise UserError(f"{cfg['ckpt']} exists; import into another --ckpt, or pass --overwrite "
                        "to replace it")
    try:
        # first: a folder of another model says so before anything else is read
        hf_config = read_config(folder)
        tokenizer, theirs = tokenizer_from_files(folder)
        hf = read_weights(folder)
        config = our_config(hf_config, hf["wte.weight"].shape[0])
        mapped = set(theirs.values())
        # rows no token reads (padding)
        unused = [i for i in range(config["vocab_size"]) if i not in mapped]
        rows = torch.tensor([theirs[i] for i in range(len(theirs))] + unused)
        model = build_model(model_class, model_class.config_class(**config))
        model.load_state_dict(convert_state_dict(state_from(hf, config["n_layer"],
                                                            config["tie_embeddings"], rows),
                                                 "SM-GPT", model.layout, config["n_head"]))
    # JSON, names, shapes
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError) as e:
        raise UserError(f"{folder}: not a GPT-2 folder this can read ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    set_aside(cfg["ckpt"])  # --overwrite: the old checkpoint and its log kept as .bak
    save_checkpoint(cfg["ckpt"], make_checkpoint(cpu_copy(model.state_dict()), config,
                                                 model.layout,
                                                 tokenizer.model_text(), 0, cfg,
                                                 imported_from=os.path.abspath(folder)))
    print(f"imported {folder} ({config['n_layer']} layers x {config['n_head']} heads x "
          f"{config['n_embd']}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(tokenizer.vocab)} "
          f"tokens) into {cfg['ckpt']} "
          f"({model.layout})")
    return config


def export_hf(model_class: type[nn.Module], cfg: dict) -> None:
    """--mode=export --export_format=hf: ckpt's best weights and tokenizer as a Hugging Face GPT-2
    folder at export_to (biases a model of ours does not have are written as zeros: the same
    function)."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise install_hint("safetensors") from None
    folder = cfg["export_to"]
    if not folder:
        raise UserError("--mode=export --export_format=hf needs --export_to=FOLDER")
    taken = not os.path.isdir(folder) or os.listdir(folder) and not cfg["overwrite"]
    if os.path.exists(folder) and taken:
        raise UserError(f"{folder} exists and is not an empty folder; export elsewhere, or pass "
                        f"--overwrite to replace the files it writes there")
    if cfg["head_mask"]:
        raise UserError("--head_mask switches heads off while a model runs; an export writes the "
                        "weights as they are: leave it out")
    ckpt, model = checkpoint_model(model_class, cfg)
    c = model.config
    sm = convert_state_dict(cpu_copy(model.state_dict()), model.layout, "SM-GPT", c.n_head)
    out = {"wte.weight": sm["wte.weight"], "wpe.weight": sm["wpe.weight"]}
    for name, part in [("ln_f", "ln_f")] + [(f"h.{i}.{theirs}",
                                             f"blocks.{i}.{ours}") for i in range(c.n_layer)
                                            for theirs, ours in OURS.items()]:
        weight = sm[f"{part}.weight"]
        out[f"{name}.weight"] = weight.t() if name.split(".", 2)[-1] in CONV1D else weight
        out[f"{name}.bias"] = sm.get(f"{part}.bias", torch.zeros(weight.shape[0]))
    if not c.tie_embeddings:
        out["lm_head.weight"] = sm["lm_head.weight"]
    os.makedirs(folder, exist_ok=True)
    tokenizer = load_tokenizer_text(ckpt["tokenizer"])
    # saved whole, then renamed into place
    with atomic_open(os.path.join(folder, "model.safetensors"), "wb") as f:
        names = {k: k if k == "lm_head.weight" else f"transformer.{k}" for k in out}
        f.write(save({names[k]: v.contiguous() for k, v in out.items()},
                     metadata={"format": "pt"}))
    end = tokenizer.special_tokens.get("<|endoftext|>")
    write_json(os.path.join(folder, "config.json"), {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
        "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_inner": None,
        "activation_function": {"tanh": "gelu_new", "none": "gelu"}[c.gelu],
        "layer_norm_epsilon": c.layer_norm_eps, "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "initializer_range": 0.02,
        "scale_attn_weights": True, "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": end, "eos_token_id": end})
    write_tokenizer_files(folder, tokenizer)
    # the tokenizer as written, not GPT-2's own pre-tokenizer (ours may split text otherwise)
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.block_size,
        **({"bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>"} if end is not None else {})})
    print(f"exported {cfg['ckpt']} as a Hugging Face GPT-2 folder: {folder}")

