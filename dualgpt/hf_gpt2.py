"""GPT-2's Hugging Face format, both ways. In (--mode=import): a folder of config.json, model.safetensors or
pytorch_model.bin, and vocab.json + merges.txt or tokenizer.json, as a checkpoint of the script that runs it.
Out (--mode=export --export_format=hf): a checkpoint as such a folder, which transformers and tokenizers load.
transformers is never imported here; safetensors only to read or write model.safetensors.

Two things differ from our models. GPT-2's layers are Conv1D, whose weight (in, out) is a Linear's transposed.
And its token ids: minbpe's id of a single byte is the byte, GPT-2's come in the order of its vocab.json (the
byte-to-unicode table's order for GPT-2 itself; special tokens first for many a trained tokenizer). The import
permutes the embedding rows (and an untied head's) into minbpe's ids, so the model computes the same function
of the text; the export writes minbpe's ids, so both libraries give a folder of ours the same ids.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.nn as nn

from dualgpt import UserError
from dualgpt.checkpoint import (build_model, checkpoint_model, convert_state_dict, cpu_copy, make_checkpoint,
                                save_checkpoint)
from dualgpt.data import load_tokenizer_text
from dualgpt.files import atomic_open, write_json, write_text
from minbpe.regex import GPT2_SPLIT_PATTERN, RegexTokenizer

ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # GPT-2's names -> F.gelu's
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's layers stored transposed
OURS = {"attn.c_attn": "attn.c_attn", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj",
        "ln_1": "ln_1", "ln_2": "ln_2"}  # a block's parts: GPT-2's name -> SM-GPT's


def install_hint(package: str) -> UserError:
    return UserError(f"this needs the {package} package: pip install {package}")


# -----------------------------------------------------------------------------------------
# Tokenizer files


def byte_characters() -> dict[int, str]:
    """GPT-2's byte-to-unicode table: each byte as a printable character, so that vocab.json and merges.txt are
    text. Printable Latin-1 bytes stand for themselves; the others, in order, for the characters from 256 on."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


CHARACTER_OF = byte_characters()
BYTE_OF = {c: b for b, c in CHARACTER_OF.items()}


def as_text(token: bytes) -> str:
    return "".join(CHARACTER_OF[b] for b in token)


def as_bytes(text: str) -> bytes | None:
    """A vocab.json entry's bytes; None for a string the table cannot have written (a special token)."""
    return bytes(BYTE_OF[c] for c in text) if all(c in BYTE_OF for c in text) else None


def read_tokenizer_files(folder: str) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int] | None, str]:
    """vocab (token text -> id), merges in rank order, special tokens (text -> id) and split pattern, from
    tokenizer.json or from vocab.json + merges.txt (whose special tokens are the vocabulary's tokens that no byte
    or merge makes: None here, found once the merges are known)."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise UserError(f"{path}: a {model.get('type')} model; only byte-level BPE (GPT-2's) can be read")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        return model["vocab"], merges, specials, split_pattern(data.get("pre_tokenizer"), path)
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if not (os.path.exists(vocab_path) and os.path.exists(merges_path)):
        raise UserError(f"{folder} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt")
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n") if line and not line.startswith("#version")]
    return vocab, merges, None, GPT2_SPLIT_PATTERN


def split_pattern(pre_tokenizer: dict | None, path: str) -> str:
    """The regex a tokenizer.json splits text with: GPT-2's (ByteLevel with its regex), or a Split's pattern
    before a ByteLevel that uses none (what export writes)."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_SPLIT_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex") and "Regex" in steps[0].get("pattern", {}):
        return steps[0]["pattern"]["Regex"]
    raise UserError(f"{path}: a pre-tokenizer of {kinds or 'nothing'}, not GPT-2's byte-level split")


def tokenizer_from_files(folder: str) -> tuple[RegexTokenizer, dict[int, int]]:
    """The folder's tokenizer as minbpe's RegexTokenizer (same tokens, same merges in the same order, raw bytes
    as ids 0-255), and the id of each of its tokens in the folder's numbering (ours -> theirs)."""
    vocab, merges, specials, pattern = read_tokenizer_files(folder)
    ids = {bytes([b]): b for b in range(256)}
    missing = [b for b in range(256) if as_text(bytes([b])) not in vocab]
    if missing:
        raise UserError(f"{folder}: the vocabulary lacks {len(missing)} of the 256 bytes (e.g. {missing[0]}); minbpe "
                        f"needs every byte to be a token")
    tokenizer = RegexTokenizer(pattern)
    for rank, (left, right) in enumerate(merges):
        parts = as_bytes(left), as_bytes(right)
        if None in parts or any(p not in ids for p in parts) or parts[0] + parts[1] in ids:
            raise UserError(f"{folder}: merge {rank + 1} ({left} {right}) joins a token that does not exist yet, or "
                            f"makes one that does")
        tokenizer.merges[(ids[parts[0]], ids[parts[1]])] = ids[parts[0] + parts[1]] = 256 + rank
    tokenizer.vocab = tokenizer._build_vocab()
    if specials is None:
        specials = {text: i for text, i in vocab.items() if as_bytes(text) not in ids}
    first_special = 256 + len(merges)
    tokenizer.register_special_tokens({text: first_special + k for k, text in enumerate(specials)})
    theirs = {}
    for text, i in vocab.items():
        if text not in specials:
            token = as_bytes(text)
            if token not in ids:
                raise UserError(f"{folder}: the vocabulary's token {text!r} is neither a byte nor made by a merge")
            theirs[ids[token]] = i
    theirs.update({first_special + k: i for k, i in enumerate(specials.values())})
    if len(theirs) != len(tokenizer.vocab):
        raise UserError(f"{folder}: {len(tokenizer.vocab) - len(theirs)} tokens that the merges make are missing from "
                        f"the vocabulary")
    return tokenizer, theirs


def model_text(tokenizer: RegexTokenizer) -> str:
    """A tokenizer's .model text, what a checkpoint stores."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(os.path.join(tmp, "t"))
        with open(os.path.join(tmp, "t.model"), encoding="utf-8") as f:
            return f.read()


def tokenizer_json(tokenizer: RegexTokenizer) -> dict:
    """A tokenizer of ours as the `tokenizers` library's tokenizer.json: its split pattern, byte level, its BPE
    merges in order and its special tokens, with our ids."""
    pairs = sorted(tokenizer.merges.items(), key=lambda item: item[1])
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for text, i in tokenizer.special_tokens.items()],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {as_text(token): i for i, token in tokenizer.vocab.items() if i not in
                            tokenizer.inverse_special_tokens},
                  "merges": [[as_text(tokenizer.vocab[a]), as_text(tokenizer.vocab[b])] for (a, b), _ in pairs]},
    }


def write_tokenizer_files(folder: str, tokenizer: RegexTokenizer) -> None:
    """tokenizer.json, and GPT-2's vocab.json + merges.txt beside it (the same vocabulary and merges)."""
    spec = tokenizer_json(tokenizer)
    write_json(os.path.join(folder, "tokenizer.json"), spec)
    write_json(os.path.join(folder, "vocab.json"), {**spec["model"]["vocab"], **tokenizer.special_tokens})
    write_text(os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in spec["model"]["merges"]))


# -----------------------------------------------------------------------------------------
# Weights


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    """model.safetensors, else pytorch_model.bin (read with weights_only: no pickled code runs), without the
    "transformer." prefix of GPT2LMHeadModel's names."""
    safetensors_path, bin_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(safetensors_path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise install_hint("safetensors") from None
        state = load_file(safetensors_path)
    elif os.path.exists(bin_path):
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{bin_path} is not readable as plain tensors ({e.__class__.__name__})") from None
    else:
        raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin")
    return {name.removeprefix("transformer."): tensor for name, tensor in state.items()}


def model_config_from(folder: str, vocab_size: int) -> dict:
    """Our ModelConfig's fields from config.json, refusing what GPT-2's architecture in this repo cannot be."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{folder} has no config.json")
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    refusals = [(hf.get("model_type") != "gpt2", f"model_type {hf.get('model_type')!r}, not gpt2"),
                (hf.get("activation_function", "gelu_new") not in ACTIVATIONS,
                 f"activation {hf.get('activation_function')!r}"),
                (hf.get("n_inner") not in (None, 4 * hf["n_embd"]), f"n_inner {hf.get('n_inner')} (ours is 4 x n_embd)"),
                (not hf.get("scale_attn_weights", True), "attention weights not scaled"),
                (hf.get("scale_attn_by_inverse_layer_idx", False), "attention scaled by the layer's index"),
                (hf.get("add_cross_attention", False), "cross-attention")]
    why = [reason for refused, reason in refusals if refused]
    if why:
        raise UserError(f"{path}: {why[0]}; only GPT-2's architecture can be imported")
    return {"vocab_size": vocab_size, "block_size": hf["n_positions"], "n_layer": hf["n_layer"], "n_head": hf["n_head"],
            "n_embd": hf["n_embd"], "dropout": 0.0, "bias": True,
            "gelu": ACTIVATIONS[hf.get("activation_function", "gelu_new")],
            "layer_norm_eps": hf.get("layer_norm_epsilon", 1e-5), "tie_embeddings": hf.get("tie_word_embeddings", True)}


def state_from(hf: dict[str, torch.Tensor], n_layer: int, tied: bool, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPT-2's weights in SM-GPT's names, Conv1D weights transposed, token rows in our ids' order (`rows`: the
    GPT-2 row of each of ours)."""
    state = {"wte.weight": hf["wte.weight"][rows], "wpe.weight": hf["wpe.weight"],
             "ln_f.weight": hf["ln_f.weight"], "ln_f.bias": hf["ln_f.bias"]}
    for i in range(n_layer):
        for theirs, ours in OURS.items():
            weight = hf[f"h.{i}.{theirs}.weight"]
            state[f"blocks.{i}.{ours}.weight"] = weight.t().contiguous() if theirs in CONV1D else weight
            state[f"blocks.{i}.{ours}.bias"] = hf[f"h.{i}.{theirs}.bias"]
    state["lm_head.weight"] = state["wte.weight"] if tied else hf["lm_head.weight"][rows]
    return state


def import_checkpoint(model_class: type[nn.Module], cfg: dict) -> dict:
    """--mode=import: the Hugging Face GPT-2 folder at import_from as a checkpoint of this script at ckpt."""
    folder = cfg["import_from"]
    if not folder or not os.path.isdir(folder):
        raise UserError(f"--mode=import needs --import_from=FOLDER with a Hugging Face GPT-2 model, got {folder!r}")
    if os.path.exists(cfg["ckpt"]) and not cfg["overwrite"]:
        raise UserError(f"{cfg['ckpt']} exists; import into another --ckpt, or pass --overwrite to replace it")
    tokenizer, theirs = tokenizer_from_files(folder)
    hf = read_weights(folder)
    rows_in_file = hf["wte.weight"].shape[0]
    unused = [i for i in range(rows_in_file) if i not in set(theirs.values())]  # rows no token reads (padding)
    rows = torch.tensor([theirs[i] for i in range(len(theirs))] + unused)
    config = model_config_from(folder, rows_in_file)
    model = build_model(model_class, model_class.config_class(**config))
    try:
        model.load_state_dict(convert_state_dict(state_from(hf, config["n_layer"], config["tie_embeddings"], rows),
                                                 "SM-GPT", model.layout, config["n_head"]))
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{folder}: weights that do not fit its config.json ({str(e).splitlines()[0][:160]})") from None
    save_checkpoint(cfg["ckpt"], make_checkpoint(cpu_copy(model.state_dict()), config, model.layout,
                                                 model_text(tokenizer), 0, cfg, imported_from=os.path.abspath(folder)))
    print(f"imported {folder} ({config['n_layer']} layers x {config['n_head']} heads x {config['n_embd']}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(tokenizer.vocab)} tokens) into {cfg['ckpt']} "
          f"({model.layout})")
    return config


def export_hf(model_class: type[nn.Module], cfg: dict) -> None:
    """--mode=export --export_format=hf: ckpt's best weights and tokenizer as a Hugging Face GPT-2 folder at
    export_to (biases a model of ours does not have are written as zeros: the same function)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise install_hint("safetensors") from None
    if not cfg["export_to"]:
        raise UserError("--mode=export --export_format=hf needs --export_to=FOLDER")
    ckpt, model = checkpoint_model(model_class, cfg)
    c = model.config
    sm = convert_state_dict(cpu_copy(model.state_dict()), model.layout, "SM-GPT", c.n_head)
    out = {"wte.weight": sm["wte.weight"], "wpe.weight": sm["wpe.weight"]}
    for name, part in [("ln_f", "ln_f")] + [(f"h.{i}.{theirs}", f"blocks.{i}.{ours}") for i in range(c.n_layer)
                                            for theirs, ours in OURS.items()]:
        weight = sm[f"{part}.weight"]
        out[f"{name}.weight"] = weight.t() if name.split(".", 2)[-1] in CONV1D else weight
        out[f"{name}.bias"] = sm.get(f"{part}.bias", torch.zeros(weight.shape[0]))
    if not c.tie_embeddings:
        out["lm_head.weight"] = sm["lm_head.weight"]
    folder = cfg["export_to"]
    os.makedirs(folder, exist_ok=True)
    tokenizer = load_tokenizer_text(ckpt["tokenizer"])
    with atomic_open(os.path.join(folder, "model.safetensors"), "wb") as f:  # saved whole, then renamed into place
        f.write(safetensors_bytes(save_file, {f"transformer.{k}": v.contiguous() for k, v in out.items()}))
    end = tokenizer.special_tokens.get("<|endoftext|>")
    write_json(os.path.join(folder, "config.json"), {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size, "n_positions": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": {"tanh": "gelu_new", "none": "gelu"}[c.gelu], "layer_norm_epsilon": c.layer_norm_eps,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "initializer_range": 0.02,
        "scale_attn_weights": True, "tie_word_embeddings": c.tie_embeddings, "bos_token_id": end, "eos_token_id": end})
    write_tokenizer_files(folder, tokenizer)
    # the tokenizer as written, not GPT-2's own pre-tokenizer (ours may split text otherwise)
    write_json(os.path.join(folder, "tokenizer_config.json"), {"tokenizer_class": "PreTrainedTokenizerFast",
                                                                "model_max_length": c.block_size})
    print(f"exported {cfg['ckpt']} as a Hugging Face GPT-2 folder: {folder}")


def safetensors_bytes(save_file, tensors: dict[str, torch.Tensor]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_file(tensors, path, metadata={"format": "pt"})
        with open(path, "rb") as f:
            return f.read()
