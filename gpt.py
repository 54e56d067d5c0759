"""
LB-GPT: a GPT whose multi-head attention is a loop over per-head modules.

    python gpt.py                      # train (if model_dict/gpt.pt is missing), then sample
    python gpt.py --mode=sample --prompt="ROMEO:"
    python gpt.py --mode=eval          # val loss and bits per byte of the checkpoint
    python gpt.py --resume             # continue an interrupted run

Every key of config.py can be overridden as --key=value. This file holds the model,
the data pipeline, training and sampling; gpt_.py reuses all of it and swaps in fused
attention, so the two files show exactly what differs.
"""
from __future__ import annotations

import codecs
import dataclasses
import difflib
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import urllib.request
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import config as default_config
from minbpe import RegexTokenizer
from minbpe.base import atomic_open

HERE = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A mistake in the user's input: reported as one line `error: ...`, exit code 2."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: reported as one line, exit code 1."""


# -----------------------------------------------------------------------------------------
# Model


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = False


class Head(nn.Module):
    """One head of causal self-attention, with its own key, query and value projections."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        head_size = cfg.n_embd // cfg.n_head
        self.key = nn.Linear(cfg.n_embd, head_size, bias=cfg.bias)
        self.query = nn.Linear(cfg.n_embd, head_size, bias=cfg.bias)
        self.value = nn.Linear(cfg.n_embd, head_size, bias=cfg.bias)
        self.register_buffer("tril", torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool)),
                             persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.record = False  # keep this head's attention weights and output (for --mode=heads)
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, T) affinities
        wei = wei.masked_fill(~self.tril[:T, :T], float("-inf"))  # a token never sees the future
        wei = F.softmax(wei, dim=-1)
        out = self.dropout(wei) @ self.value(x)  # (B, T, hs)
        if self.record:
            self.recorded = (wei.detach(), out.detach())
        return out


class MultiHeadAttention(nn.Module):
    """n_head heads run one after another; their outputs are concatenated and projected."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = nn.ModuleList([Head(cfg) for _ in range(cfg.n_head)])
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.masked: set[int] = set()  # switched-off heads contribute zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head_size = x.shape[-1] // len(self.heads)
        out = torch.cat([x.new_zeros(*x.shape[:-1], head_size) if i in self.masked else head(x)
                         for i, head in enumerate(self.heads)], dim=-1)  # (B, T, C)
        return self.dropout(self.proj(out))

    def mask_heads(self, heads: set[int]) -> None:
        self.masked = set(heads)

    def set_record(self, on: bool) -> None:
        for head in self.heads:
            head.record, head.recorded = on, None

    def recorded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights (B, nh, T, T) and head outputs (B, nh, T, hs) of the last forward."""
        weights, outputs = zip(*(head.recorded for head in self.heads))
        return torch.stack(weights, dim=1), torch.stack(outputs, dim=1)


class MLP(nn.Module):

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig, attention: type[nn.Module]):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, *attn_args) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), *attn_args)  # attn_args: a layer's KV cache in gpt_.py
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 style decoder. Subclasses swap `attention` (gpt_.py: fused heads)."""

    attention: type[nn.Module] = MultiHeadAttention
    layout = "looped"  # written into checkpoints, so each script knows how to read the other's

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, self.attention) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy if targets are given.
        cache (gpt_.py's KVCache) holds the keys and values of the tokens before idx."""
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x) if cache is None else block(x, cache.layers[i])
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def configure(self, cfg: dict) -> None:
        """Apply run-time settings from the config: the head mask (gpt_.py adds its own keys)."""
        mask = parse_head_mask(cfg.get("head_mask", ""))
        for layer, head in mask:
            if layer >= self.cfg.n_layer or head >= self.cfg.n_head:
                raise UserError(f"head_mask: head {layer}.{head} does not exist (the model has {self.cfg.n_layer} "
                                f"layers x {self.cfg.n_head} heads, numbered from 0)")
        self.set_head_mask(mask)

    def set_head_mask(self, mask: set[tuple[int, int]]) -> None:
        """Switch off heads, given as (layer, head) pairs; an empty set switches all back on."""
        for i, block in enumerate(self.blocks):
            block.attn.mask_heads({h for layer, h in mask if layer == i})

    def record_attention(self, on: bool) -> None:
        for block in self.blocks:
            block.attn.set_record(on)

    def decoder(self) -> "Decoder":
        """What sampling calls for next-token logits; gpt_.py returns one with a KV cache."""
        return Decoder(self)

    def adapt_state_dict(self, state: dict, layout: str) -> dict:
        """Turn a checkpoint's state dict into this layout (gpt_.py holds the weight mapping)."""
        if layout == self.layout:
            return state
        from gpt_ import fused_to_looped  # only needed for checkpoints written by gpt_.py
        return fused_to_looped(state, self.cfg.n_head)


class Decoder:
    """Next-token logits without a cache: re-reads the last block_size tokens every step."""

    def __init__(self, model: GPT):
        self.model = model

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(ids[:, -self.model.cfg.block_size:])
        return logits[:, -1, :]


# -----------------------------------------------------------------------------------------
# Configuration


def load_config(argv: list[str], script: str) -> dict:
    """config.py's values, the device preset, then --key=value overrides; validated."""
    defaults = {k: v for k, v in vars(default_config).items()
                if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str))}
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__.strip() + "\n\nconfig keys:\n" + "\n".join(f"  --{k}={v!r}" for k, v in defaults.items()))
            sys.exit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; use --key=value")
        key, eq, value = arg[2:].partition("=")
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            raise UserError(f"unknown config key {key!r}" + (f"; did you mean --{close[0]}?" if close else ""))
        overrides[key] = parse_value(key, value if eq else "true", defaults[key])
    cfg = dict(defaults)
    cfg.update(overrides)
    cfg["device"] = resolve_device(cfg["device"])
    if cfg["preset"] not in ("auto", "none"):
        raise UserError(f"preset must be auto or none, got {cfg['preset']!r}")
    if cfg["preset"] == "auto" and cfg["device"].startswith("cuda"):
        cfg.update({k: v for k, v in default_config.GPU_PRESET.items() if k not in overrides})
    cfg["dtype"] = resolve_dtype(cfg["dtype"], cfg["device"])
    cfg["compile"] = cfg["compile"].lower()
    cfg["script"] = script
    cfg["ckpt"] = cfg["ckpt"] or os.path.join(HERE, "model_dict", f"{script}.pt")
    cfg["sample_file"] = cfg["sample_file"] or os.path.join(HERE, "generate_text", f"{script}.txt")
    validate(cfg)
    return cfg


def parse_value(key: str, value: str, default):
    try:
        if isinstance(default, bool):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise UserError(f"--{key}={value}: expected {type(default).__name__} like {default!r}") from None
    return value


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use --device=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' requested but MPS is not available; use --device=cpu")
    if device != "cpu" and not device.startswith(("cuda", "mps")):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    return device


def cpu_has_bf16() -> bool:
    """Native bfloat16 matmuls (AVX512-BF16 or AMX): there autocast to bf16 runs about 4x the fp32 matmul rate."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        return "bfloat16" if device == "cpu" and cpu_has_bf16() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def validate(cfg: dict) -> None:
    checks = [
        (cfg["n_embd"] % cfg["n_head"] == 0 if cfg["n_head"] > 0 else False,
         f"n_embd ({cfg['n_embd']}) must be divisible by n_head ({cfg['n_head']})"),
        (cfg["n_layer"] >= 1, "n_layer must be at least 1"),
        (cfg["block_size"] >= 1, "block_size must be at least 1"),
        (0 <= cfg["dropout"] < 1, f"dropout must be in [0, 1), got {cfg['dropout']}"),
        (cfg["vocab_size"] >= 256, f"vocab_size must be at least 256 (the byte alphabet), got {cfg['vocab_size']}"),
        (cfg["batch_size"] >= 1 and cfg["grad_accum_steps"] >= 1, "batch_size and grad_accum_steps must be >= 1"),
        (cfg["max_iters"] >= 0 and cfg["max_minutes"] >= 0, "max_iters and max_minutes must be >= 0"),
        (cfg["eval_interval"] >= 1 and cfg["eval_iters"] >= 1 and cfg["log_interval"] >= 1,
         "eval_interval, eval_iters and log_interval must be >= 1"),
        (cfg["learning_rate"] > 0 and 0 <= cfg["min_lr"] <= cfg["learning_rate"],
         "learning_rate must be > 0 and min_lr in [0, learning_rate]"),
        (cfg["warmup_iters"] >= 0 and cfg["lr_decay_iters"] >= cfg["warmup_iters"],
         "warmup_iters must be >= 0 and lr_decay_iters >= warmup_iters"),
        (cfg["temperature"] >= 0, "temperature must be >= 0 (0 = greedy)"),
        (cfg["top_k"] >= 0, "top_k must be >= 0 (0 = off)"),
        (0 < cfg["top_p"] <= 1, "top_p must be in (0, 1]"),
        (cfg["num_samples"] >= 1 and cfg["max_new_tokens"] >= 0, "num_samples must be >= 1, max_new_tokens >= 0"),
        (cfg["mode"] in ("auto", "train", "sample", "eval", "heads"),
         f"mode must be auto, train, sample, eval or heads, got {cfg['mode']!r}"),
        (cfg["attn_impl"] in ("sdpa", "matmul"), f"attn_impl must be sdpa or matmul, got {cfg['attn_impl']!r}"),
        (not (cfg["resume"] and cfg["overwrite"]), "--resume and --overwrite contradict each other"),
        (cfg["compile"] in ("auto", "true", "false"), f"compile must be auto, true or false, got {cfg['compile']!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    parse_head_mask(cfg["head_mask"])


def parse_head_mask(spec: str) -> set[tuple[int, int]]:
    """"0.3,2.1" -> {(0, 3), (2, 1)}: layer.head pairs, numbered from 0."""
    mask = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        layer, dot, head = item.partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise UserError(f"head_mask: {item!r} is not layer.head (example: --head_mask=0.3,2.1)")
        mask.add((int(layer), int(head)))
    return mask


def model_config(cfg: dict) -> ModelConfig:
    return ModelConfig(**{f.name: cfg[f.name] for f in dataclasses.fields(ModelConfig)})


# -----------------------------------------------------------------------------------------
# Data and tokenizer


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, path: str, sha256: str | None) -> None:
    """Fetch url to path with a progress bar; checksum verified before the file is kept."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r, atomic_open(path, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            h = hashlib.sha256()
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                for block in iter(lambda: r.read(1 << 16), b""):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
            if sha256 and h.hexdigest() != sha256:
                raise UserError(f"{url}: checksum mismatch (got sha256 {h.hexdigest()[:16]}..., "
                                f"expected {sha256[:16]}...); the file was not kept")
    except OSError as e:
        raise UserError(f"could not download {url} ({getattr(e, 'reason', e)}); put the text file at {path} "
                        f"or pass --data=PATH") from None


def resolve_data(cfg: dict) -> str:
    """The local path of the training text, downloading it if it is the default or a URL."""
    data = cfg["data"]
    if data.startswith(("http://", "https://")):
        path = os.path.join(HERE, "data", os.path.basename(data.split("?")[0]) or "download.txt")
        if not os.path.exists(path):
            download(data, path, cfg["data_sha256"] if data == cfg["data_url"] else None)
        return path
    if data == default_config.data:  # the default lives in the repo, wherever the script is run from
        path = os.path.join(HERE, data)
        if not os.path.exists(path):
            download(cfg["data_url"], path, cfg["data_sha256"])
    else:
        path = os.path.abspath(data)
    if not os.path.isfile(path):
        raise UserError(f"data file {data} not found; pass --data=PATH to a UTF-8 text file")
    return path


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it or pass another --data") from None


def load_tokenizer_text(model_text: str) -> RegexTokenizer:
    """A tokenizer from the .model text stored in a checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.model")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(model_text)
        tok = RegexTokenizer()
        tok.load(path)
    return tok


def get_tokenizer(text: str, data_path: str, data_hash: str, vocab_size: int) -> tuple[RegexTokenizer, str]:
    """Train a RegexTokenizer on text, or reuse the one in tokenizers/ for the same data and vocab size.
    Returns (tokenizer, path of its .model file)."""
    stem = os.path.splitext(os.path.basename(data_path))[0]
    prefix = os.path.join(HERE, "tokenizers", f"{stem}_v{vocab_size}_{data_hash[:8]}")
    tok = RegexTokenizer()
    if os.path.exists(prefix + ".model"):
        try:
            tok.load(prefix + ".model")
            if len(tok.vocab) == vocab_size:
                return tok, prefix + ".model"
        except ValueError as e:
            print(f"note: retraining the tokenizer ({e})")
    print(f"training a {vocab_size}-token BPE tokenizer on {os.path.basename(data_path)}")
    tok.train(text, vocab_size, verbose=True)
    tok.save(prefix)
    return tok, prefix + ".model"


def encode_with_progress(tok: RegexTokenizer, text: str, block: int = 1 << 18) -> np.ndarray:
    """Encode text in ~256 KB pieces cut just before a letter that starts a line, where the split
    pattern always breaks, so the ids equal those of one encode() call."""
    pieces, start = [], 0
    while start < len(text):
        end = min(start + block, len(text))
        while end < len(text) and not (text[end - 1] == "\n" and text[end].isalpha()):
            end += 1
        pieces.append(text[start:end])
        start = end
    dtype = np.uint16 if len(tok.vocab) <= 1 << 16 else np.uint32
    ids = [np.array(tok.encode_ordinary(p), dtype=dtype)
           for p in tqdm(pieces, desc="encoding", unit="piece")]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=dtype)


class Dataset:
    """Token ids of the text (cached in data/), split 90/10, with random-offset batches."""

    def __init__(self, cfg: dict, tok: RegexTokenizer | None = None, tokenizer_text: str | None = None,
                 rank: int = 0, world: int = 1):
        path = resolve_data(cfg)
        text = read_text(path)
        data_hash = sha256_file(path)
        if tok is None:
            tok, model_path = get_tokenizer(text, path, data_hash, cfg["vocab_size"])
            with open(model_path, encoding="utf-8") as f:
                tokenizer_text = f.read()
        self.tok, self.tokenizer_text = tok, tokenizer_text
        tok_hash = hashlib.sha256(tokenizer_text.encode("utf-8")).hexdigest()
        stem = os.path.splitext(os.path.basename(path))[0]
        cache = os.path.join(HERE, "data", f"{stem}_{data_hash[:8]}_{tok_hash[:8]}.npy")
        if not os.path.exists(cache):
            ids = encode_with_progress(tok, text)
            with atomic_open(cache, "wb") as f:
                np.save(f, ids)
        ids = np.load(cache, mmap_mode="r")
        n = int(0.9 * len(ids))
        self.splits = {"train": ids[:n], "val": ids[n:]}
        for split, arr in self.splits.items():
            if len(arr) < cfg["block_size"] + 1:
                raise UserError(f"{path} is too small: its {split} split has {len(arr)} tokens, fewer than "
                                f"block_size + 1 = {cfg['block_size'] + 1}; use more text or a smaller --block_size")
        token_bytes = np.array([len(tok.vocab[i]) for i in range(len(tok.vocab))], dtype=np.int64)
        # bytes per token of each split: converts loss per token into bits per byte
        self.bytes_per_token = {s: float(token_bytes[a].sum()) / len(a) for s, a in self.splits.items()}
        self.block_size, self.batch_size, self.device = cfg["block_size"], cfg["batch_size"], cfg["device"]
        self.rank, self.world = rank, world

    def batch(self, split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """batch_size random windows. With several processes every rank draws the same global batch of
        batch_size x world windows and keeps its own slice, so the samples seen do not depend on the
        number of processes: 2 ranks of batch b see exactly what 1 process of batch 2b sees."""
        data, T, b = self.splits[split], self.block_size, self.batch_size
        offsets = torch.randint(len(data) - T, (b * self.world,), generator=generator)[self.rank * b:(self.rank + 1) * b]
        offsets = offsets.tolist()
        xy = torch.from_numpy(np.stack([data[i:i + T + 1] for i in offsets]).astype(np.int64))
        if self.device.startswith("cuda"):
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        else:
            xy = xy.to(self.device)
        return xy[:, :-1], xy[:, 1:]

    def windows(self, split: str):
        """Every token of the split once: non-overlapping block_size windows, in batches."""
        data, T = self.splits[split], self.block_size
        starts = list(range(0, len(data) - 1, T))
        for i in range(0, len(starts), self.batch_size):
            chunk = [torch.from_numpy(data[s:min(s + T, len(data) - 1) + 1].astype(np.int64))
                     for s in starts[i:i + self.batch_size]]
            for xy in chunk:  # the last window may be short; run it on its own
                if len(xy) != T + 1:
                    yield xy[None, :-1].to(self.device), xy[None, 1:].to(self.device)
            full = [xy for xy in chunk if len(xy) == T + 1]
            if full:
                xy = torch.stack(full).to(self.device)
                yield xy[:, :-1], xy[:, 1:]

    def bpb(self, loss: float, split: str) -> float:
        return loss / self.bytes_per_token[split] / math.log(2)


# -----------------------------------------------------------------------------------------
# Checkpoints


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
    missing = {"model", "best_model", "model_config", "layout", "tokenizer", "iter_num"} - set(ckpt if isinstance(ckpt, dict) else {})
    if missing:
        raise UserError(f"{path} is not a Dual-GPT checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def build_model(cls: type[GPT], mcfg: ModelConfig, cfg: dict) -> GPT:
    model = cls(mcfg)
    model.configure(cfg)
    return model


def model_from_checkpoint(cls: type[GPT], ckpt: dict, cfg: dict) -> GPT:
    """The best-val weights of a checkpoint (either layout), with the run-time settings of cfg."""
    try:
        model = build_model(cls, ModelConfig(**ckpt["model_config"]), cfg)
        model.load_state_dict(model.adapt_state_dict(ckpt["best_model"], ckpt["layout"]))
    except (TypeError, RuntimeError, KeyError) as e:
        raise UserError(f"{cfg['ckpt']}: incompatible checkpoint ({str(e).splitlines()[0][:160]})") from None
    return model.to(cfg["device"])


# -----------------------------------------------------------------------------------------
# Training


def autocast(cfg: dict):
    if cfg["dtype"] == "float32":
        return nullcontext()
    return torch.autocast(device_type=cfg["device"].split(":")[0], dtype=getattr(torch, cfg["dtype"]))


def lr_at(it: int, cfg: dict, time_fraction: float | None = None) -> float:
    """Linear warm-up, then cosine decay to min_lr: at lr_decay_iters, or with a max_minutes budget
    at the end of the budget (time_fraction = training time so far / budget)."""
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if time_fraction is None:
        ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    else:
        ratio = time_fraction
    if ratio >= 1:
        return cfg["min_lr"]
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


def matmul_peak(device: str, dtype: str) -> float:
    """This machine's measured matmul rate (FLOP/s) for the dtype: the denominator of MFU."""
    n, reps = 2048, 4
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG streams untouched
    a, b = (torch.randn(n, n, device=device, generator=gen).to(getattr(torch, dtype)) for _ in range(2))
    a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (embedding lookups do not; the tied head
    does) plus attention's score and weighted-sum matmuls, 12 * n_layer * n_embd * block_size."""
    c = model.cfg
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported only when plotting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(log_path: str, path: str, title: str) -> None:
    """Train and val bits per byte against training minutes, from the JSON-lines log."""
    plt = pyplot()

    evals = [r for r in map(json.loads, open(log_path, encoding="utf-8")) if "val_bpb" in r]
    minutes = [r["train_s"] / 60 for r in evals]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(minutes, [r["train_bpb"] for r in evals], marker="o", label="train")
    ax.plot(minutes, [r["val_bpb"] for r in evals], marker="o", label="val")
    ax.set_xlabel("training time, minutes (evaluation excluded)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def make_optimizer(model: GPT, cfg: dict) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = cfg["device"].startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


@torch.no_grad()
def estimate_loss(model: GPT, data: Dataset, cfg: dict) -> dict[str, float]:
    """Mean loss over eval_iters batches per split; the same batches every time (own generator)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        losses = []
        for _ in range(cfg["eval_iters"]):
            x, y = data.batch(split, gen)
            with autocast(cfg):
                losses.append(model(x, y)[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


@torch.no_grad()
def full_loss(model: GPT, data: Dataset, split: str, cfg: dict) -> float:
    """Exact mean loss over every token of the split (deterministic)."""
    model.eval()
    total, count = 0.0, 0
    n = math.ceil((len(data.splits[split]) - 1) / data.block_size / data.batch_size)
    for x, y in tqdm(data.windows(split), total=n, desc=f"eval {split}", leave=False):
        with autocast(cfg):
            loss = model(x, y)[1]
        total += loss.item() * y.numel()
        count += y.numel()
    return total / count


class StopRequest:
    """First Ctrl-C: finish the current step, save and exit; a second one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("stopping after this step (Ctrl-C again to abort without saving)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def should_compile(cfg: dict) -> bool:
    """compile=auto: only where compiling pays back within the run. Measured on a 2-core CPU at the default
    shape: about 26 s to compile, then 1.47x faster steps, so it breaks even after about 80 s of training."""
    if cfg["compile"] != "auto":
        return cfg["compile"] == "true"
    if cfg["max_minutes"]:
        return cfg["max_minutes"] >= 2
    return cfg["device"].startswith("cuda") and cfg["max_iters"] >= 1000


def compile_model(model: GPT, cfg: dict) -> nn.Module:
    """torch.compile the model and compile it now, on a dummy batch with the RNG state put back (so a resumed
    run stays exact); if compiling fails (no C++ compiler, an unsupported platform) train without it."""
    compiled = torch.compile(model)
    rng = torch.get_rng_state(), torch.cuda.get_rng_state() if cfg["device"].startswith("cuda") else None
    try:
        x = torch.zeros(cfg["batch_size"], cfg["block_size"], dtype=torch.long, device=cfg["device"])
        with autocast(cfg):
            loss = compiled(x, x)[1]
        loss.backward()
        return compiled
    except Exception as e:  # any compiler failure: eager training still works
        tqdm.write(f"note: torch.compile failed ({e.__class__.__name__}: {str(e).splitlines()[0][:100]}); "
                   f"training without it (--compile=false skips the attempt)")
        return model
    finally:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1])


class Distributed:
    """The torchrun process group when launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK), else one process."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.active = "RANK" in os.environ and self.world > 1
        self.master = self.rank == 0

    def start(self, cfg: dict) -> None:
        if not self.active:
            return
        if cfg["device"].startswith("cuda"):
            cfg["device"] = f"cuda:{self.local_rank}"
            torch.cuda.set_device(cfg["device"])
        torch.distributed.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")

    def stop(self, clean: bool) -> None:
        """Tear down; after a normal finish all ranks first meet (gloo aborts if one leaves while another
        still works), after an error they do not wait for each other."""
        if torch.distributed.is_initialized():
            if clean:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def mean(self, value: float, device: str) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def agree(self, *flags: bool, device: str) -> tuple[bool, ...]:
        """Each flag True on every rank if it is True on one (so all ranks stop at the same step);
        one all-reduce for all of them."""
        if not self.active:
            return flags
        t = torch.tensor(flags, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def check_previous_run(cls: type[GPT], cfg: dict, ddp: Distributed) -> dict | None:
    """The checkpoint to resume, or None for a fresh run (which never silently replaces one)."""
    path, log_path = cfg["ckpt"], os.path.splitext(cfg["ckpt"])[0] + ".jsonl"
    if cfg["resume"]:
        ckpt = load_checkpoint(path)
        if ckpt["layout"] != cls.layout:
            raise UserError(f"{path} was written with {ckpt['layout']} attention; resume it with that script "
                            f"(sample and eval work from either)")
        for key, value in ckpt["model_config"].items():
            if cfg[key] != value:
                raise UserError(f"{path} was trained with {key}={value}, but the config says {cfg[key]}; "
                                f"pass --{key}={value} to resume it")
        return ckpt
    if os.path.exists(path):
        if not cfg["overwrite"]:
            raise UserError(f"{path} already exists; pass --resume to continue it, or --overwrite to start over "
                            f"(the old one is kept as {os.path.basename(path)}.bak)")
        ddp.barrier()  # every rank has seen the old checkpoint before rank 0 moves it
        if ddp.master:
            os.replace(path, path + ".bak")
            if os.path.exists(log_path):
                os.replace(log_path, log_path + ".bak")
    return None


def train(cls: type[GPT], cfg: dict, ddp: Distributed | None = None) -> None:
    ddp = ddp or Distributed()
    if cfg["grad_accum_steps"] % ddp.world:
        raise UserError(f"grad_accum_steps={cfg['grad_accum_steps']} cannot be split across {ddp.world} processes; "
                        f"use a multiple of {ddp.world} (each process runs grad_accum_steps / {ddp.world} micro-steps)")
    micro_steps = cfg["grad_accum_steps"] // ddp.world
    path = cfg["ckpt"]
    log_path = os.path.splitext(path)[0] + ".jsonl"
    resume_ckpt = check_previous_run(cls, cfg, ddp)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    echo = tqdm.write if ddp.master else (lambda *a, **k: None)

    if not ddp.master:
        ddp.barrier()  # rank 0 trains the tokenizer and writes the token cache first
    if resume_ckpt is None:
        data = Dataset(cfg, rank=ddp.rank, world=ddp.world)
    else:
        data = Dataset(cfg, load_tokenizer_text(resume_ckpt["tokenizer"]), resume_ckpt["tokenizer"], ddp.rank, ddp.world)
    if ddp.master:
        ddp.barrier()
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    mcfg = model_config(cfg)
    model = build_model(cls, mcfg, cfg).to(cfg["device"])
    optimizer = make_optimizer(model, cfg)
    torch.manual_seed(cfg["seed"] + ddp.rank)  # dropout differs across ranks
    batch_gen = torch.Generator().manual_seed(cfg["seed"])  # shared: every rank draws the global batch
    iter_num, best_val, best_state, train_s = 0, float("inf"), None, 0.0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        iter_num, best_val = resume_ckpt["iter_num"], resume_ckpt["best_val_loss"]
        best_state, train_s = resume_ckpt["best_model"], resume_ckpt["train_s"]
        batch_gen.set_state(resume_ckpt["rng_batches"])
        if len(resume_ckpt["rng_cpu"]) == ddp.world:  # exact resume needs the same number of processes
            torch.set_rng_state(resume_ckpt["rng_cpu"][ddp.rank])
            if cfg["device"].startswith("cuda") and resume_ckpt.get("rng_cuda"):
                torch.cuda.set_rng_state(resume_ckpt["rng_cuda"][ddp.rank])
        else:
            torch.manual_seed(cfg["seed"] + ddp.rank + iter_num)
        echo(f"resuming {path} at iteration {iter_num}")
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = cfg["batch_size"] * cfg["grad_accum_steps"] * cfg["block_size"]
    budget_s = cfg["max_minutes"] * 60  # 0: stop at max_iters instead
    peak = matmul_peak(cfg["device"], cfg["dtype"]) * ddp.world
    step_flops = flops_per_token(model) * tokens_per_step
    echo(f"{cfg['script']}.py: {n_params / 1e6:.2f}M parameters, {cfg['device']} {cfg['dtype']} "
         f"(matmul peak {peak / 1e9:,.0f} GFLOP/s), {len(data.splits['train']):,} train / "
         f"{len(data.splits['val']):,} val tokens, {tokens_per_step:,} tokens per step (batch_size "
         f"{cfg['batch_size']} x grad_accum_steps {micro_steps} x {ddp.world} processes x block_size {cfg['block_size']}); "
         + (f"training for {cfg['max_minutes']:g} minutes" if budget_s else f"training for {cfg['max_iters']} steps"))
    train_model = model
    if should_compile(cfg):
        t_compile = time.perf_counter()
        echo("compiling the model (torch.compile; the time counts against the budget)")
        train_model = compile_model(model, cfg)
        train_s += time.perf_counter() - t_compile
    if ddp.active:
        cuda = cfg["device"].startswith("cuda")
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[ddp.local_rank] if cuda else None)
    scaler = torch.amp.GradScaler(enabled=cfg["dtype"] == "float16" and cfg["device"].startswith("cuda"))

    def checkpoint(losses: dict | None) -> None:
        nonlocal best_val, best_state
        if losses is not None and losses["val"] < best_val:
            best_val = losses["val"]
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        rng_cpu = ddp.gather(torch.get_rng_state())  # every rank's dropout stream, for an exact resume
        rng_cuda = ddp.gather(torch.cuda.get_rng_state()) if cfg["device"].startswith("cuda") else []
        if not ddp.master:
            return
        save_checkpoint(path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "best_model": best_state if best_state is not None else model.state_dict(),
            "best_val_loss": best_val, "model_config": dataclasses.asdict(mcfg), "layout": cls.layout,
            "config": dict(cfg), "iter_num": iter_num, "train_s": train_s, "tokenizer": data.tokenizer_text,
            "rng_cpu": rng_cpu, "rng_cuda": rng_cuda, "rng_batches": batch_gen.get_state(),
        })

    def log(record: dict) -> None:
        if ddp.master:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(record, train_s=train_s, elapsed_s=time.time() - t_start)) + "\n")

    def evaluate() -> dict:
        losses = {k: ddp.mean(v, cfg["device"]) for k, v in estimate_loss(model, data, cfg).items()}
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingDiverged(f"loss is {losses['train']} at iteration {iter_num}")
        record = {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                  "train_bpb": data.bpb(losses["train"], "train"), "val_bpb": data.bpb(losses["val"], "val"),
                  "lr": lr, "tokens_per_s": tokens_per_s}
        log(record)
        echo(f"iter {iter_num} ({train_s / 60:.1f} min): train loss {losses['train']:.4f} ({record['train_bpb']:.3f} bpb), "
             f"val loss {losses['val']:.4f} ({record['val_bpb']:.3f} bpb)")
        return losses

    t_start, tokens_per_s, log_tokens, log_s = time.time(), 0.0, 0, 0.0
    lr = lr_at(iter_num, cfg, train_s / budget_s if budget_s else None)
    resumed_at = iter_num if resume_ckpt is not None else None  # that checkpoint already holds this evaluation
    bar = tqdm(total=round(budget_s) if budget_s else cfg["max_iters"], initial=round(train_s) if budget_s else iter_num,
               desc="training", unit="s" if budget_s else "it", dynamic_ncols=True, disable=not ddp.master,
               bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]" if budget_s else None)
    stopping = done = False
    try:
        with StopRequest() as stop:
            while True:
                done = train_s >= budget_s if budget_s else iter_num >= cfg["max_iters"]
                done, stopping = ddp.agree(done, stop.requested, device=cfg["device"])
                at_eval = (iter_num % cfg["eval_interval"] == 0 or done) and iter_num != resumed_at
                if at_eval or stopping:
                    checkpoint(evaluate() if at_eval else None)
                if done or stopping:
                    break
                t_step = time.perf_counter()
                lr = lr_at(iter_num, cfg, train_s / budget_s if budget_s else None)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for micro in range(micro_steps):
                    x, y = data.batch("train", batch_gen)
                    # all-reduce gradients only on the last micro-step
                    sync = nullcontext() if not ddp.active or micro == micro_steps - 1 else train_model.no_sync()
                    with sync, autocast(cfg):
                        _, loss = train_model(x, y)
                    with sync:
                        scaler.scale(loss / micro_steps).backward()
                if cfg["grad_clip"] > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                iter_num += 1
                if iter_num % cfg["log_interval"] == 0:
                    loss_value = ddp.mean(loss.item(), cfg["device"])  # syncs the device: only at log points
                    if not math.isfinite(loss_value):
                        raise TrainingDiverged(f"loss is {loss_value} at iteration {iter_num}")
                step_s = time.perf_counter() - t_step
                train_s += step_s
                log_tokens, log_s = log_tokens + tokens_per_step, log_s + step_s
                bar.update(min(step_s, max(0.0, bar.total - bar.n)) if budget_s else 1)
                if iter_num % cfg["log_interval"] == 0:
                    tokens_per_s, mfu = log_tokens / log_s, step_flops / tokens_per_step * log_tokens / log_s / peak
                    log_tokens, log_s = 0, 0.0
                    log({"iter": iter_num, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu})
                    bar.set_postfix(it=iter_num, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                    mfu=f"{mfu:.0%}")
    except TrainingDiverged as e:
        bar.close()
        raise TrainingDiverged(f"{e}; stopped without saving, the last good checkpoint {path} is kept "
                               f"(try a lower --learning_rate)") from None
    bar.close()
    echo(f"saved {path} at iteration {iter_num} after {train_s / 60:.1f} min of training (best val loss "
         f"{best_val:.4f}, {data.bpb(best_val, 'val'):.3f} bpb); log: {log_path}")
    if ddp.master and done:
        plot_losses(log_path, os.path.splitext(path)[0] + ".loss.png", f"{os.path.basename(path)}: bits per byte")
        echo(f"loss curve: {os.path.splitext(path)[0] + '.loss.png'}")
    if stopping:
        echo("interrupted: continue with --resume")
        sys.exit(130)


# -----------------------------------------------------------------------------------------
# Sampling and evaluation


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the top-p nucleus."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model: GPT, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None):
    """Yield max_new_tokens next-token tensors (B,) continuing ids (B, T)."""
    model.eval()
    decoder = model.decoder()
    for _ in range(max_new_tokens):
        logits = decoder(ids).float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        yield nxt


def read_prompt(cfg: dict) -> str:
    prompt = cfg["prompt"]
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {prompt[5:]} ({e.__class__.__name__})") from None
    return prompt or "\n"


def sample(cls: type[GPT], cfg: dict) -> None:
    ckpt = load_checkpoint(cfg["ckpt"])
    model = model_from_checkpoint(cls, ckpt, cfg)
    tok = load_tokenizer_text(ckpt["tokenizer"])
    prompt = read_prompt(cfg)
    prompt_ids = tok.encode(prompt, allowed_special="none")[-model.cfg.block_size:]
    gen = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"])
    settings = {k: cfg[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens", "seed")}
    header = (f"# {cfg['script']}.py samples from {cfg['ckpt']} (iteration {ckpt['iter_num']}, "
              f"val loss {ckpt.get('best_val_loss', float('nan')):.4f}); {json.dumps(settings)}\n")
    samples = []
    for i in range(cfg["num_samples"]):
        print(f"--- sample {i + 1}/{cfg['num_samples']} ---")
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tokens may split characters
        print(prompt, end="", flush=True)
        text = prompt
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=cfg["device"])
        with autocast(cfg):
            for nxt in generate(model, ids, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"], cfg["top_p"], gen):
                piece = utf8.decode(tok.vocab[int(nxt[0])])
                text += piece
                print(piece, end="", flush=True)
        text += utf8.decode(b"", final=True)
        print()
        samples.append(text)
    with atomic_open(cfg["sample_file"], "w", encoding="utf-8") as f:
        f.write(header + "".join(f"\n--- sample {i + 1} ---\n{s}\n" for i, s in enumerate(samples)))
    print(f"samples written to {cfg['sample_file']}")


def checkpoint_with_data(cls: type[GPT], cfg: dict) -> tuple[dict, GPT, Dataset]:
    """The checkpoint, its best model, and the data encoded with its own tokenizer at its block size."""
    ckpt = load_checkpoint(cfg["ckpt"])
    model = model_from_checkpoint(cls, ckpt, cfg)
    data = Dataset(dict(cfg, block_size=model.cfg.block_size), load_tokenizer_text(ckpt["tokenizer"]), ckpt["tokenizer"])
    return ckpt, model, data


def evaluate_checkpoint(cls: type[GPT], cfg: dict) -> dict:
    ckpt, model, data = checkpoint_with_data(cls, cfg)
    result = {}
    for split in ("train", "val"):
        loss = full_loss(model, data, split, cfg)
        result[split] = {"loss": loss, "bpb": data.bpb(loss, split)}
        print(f"{split}: loss {loss:.4f}, {result[split]['bpb']:.4f} bits per byte")
    return result


# -----------------------------------------------------------------------------------------
# Head-level research: attention maps, per-head statistics, ablation


@torch.no_grad()
def head_statistics(model: GPT, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head averages over every query position of the batches; each value is (n_layer, n_head)."""
    sums: dict[str, torch.Tensor] = {}
    model.record_attention(True)
    try:
        for x in batches:
            model(x)
            for layer, block in enumerate(model.blocks):
                att, out = block.attn.recorded()  # (B, nh, T, T), (B, nh, T, hs)
                T = att.shape[-1]
                pos = torch.arange(T, device=att.device)
                stats = {
                    "entropy": -(att * att.clamp_min(1e-12).log()).sum(-1).mean((0, 2)),
                    "mean_distance": (att * (pos[:, None] - pos[None, :]).clamp_min(0)).sum(-1).mean((0, 2)),
                    "previous_token": att[..., 1:, :].diagonal(offset=0, dim1=-2, dim2=-1).mean((0, 2)),
                    "first_token": att[..., 1:, 0].mean((0, 2)),
                    "output_norm": out.norm(dim=-1).mean((0, 2)),
                }
                for name, value in stats.items():
                    sums.setdefault(name, torch.zeros(len(model.blocks), value.numel()))[layer] += value.float().cpu()
    finally:
        model.record_attention(False)
    return {name: total / len(batches) for name, total in sums.items()}


@torch.no_grad()
def ablation(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: dict) -> tuple[float, torch.Tensor]:
    """Val loss with all heads on, and its increase when each head alone is switched off (n_layer, n_head)."""

    def loss() -> float:
        total = 0.0
        for x, y in batches:
            with autocast(cfg):
                total += model(x, y)[1].item()
        return total / len(batches)

    base_mask = parse_head_mask(cfg["head_mask"])
    base = loss()
    delta = torch.zeros(model.cfg.n_layer, model.cfg.n_head)
    for layer, head in tqdm([(l, h) for l in range(model.cfg.n_layer) for h in range(model.cfg.n_head)],
                            desc="ablating heads", leave=False):
        model.set_head_mask(base_mask | {(layer, head)})
        delta[layer, head] = loss() - base
    model.set_head_mask(base_mask)
    return base, delta


def plot_attention(weights: list[torch.Tensor], labels: list[str], title: str, path: str) -> None:
    """A grid of attention maps: rows are layers, columns heads; weights[layer] is (nh, T, T)."""
    plt = pyplot()

    n_layer, n_head, T = len(weights), weights[0].shape[0], weights[0].shape[-1]
    size = max(2.5, T * 0.14)
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head + 1.5, size * n_layer + 1), squeeze=False,
                             layout="constrained")
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(weights[layer][head].cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.set_xticklabels(labels, rotation=90, fontsize=5)
            ax.set_yticklabels(labels, fontsize=5)
            ax.set_xlabel("attended token (key)", fontsize=7)
            ax.set_ylabel("query token", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(title, fontsize=14)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(delta: torch.Tensor, title: str, path: str) -> None:
    plt = pyplot()

    n_layer, n_head = delta.shape
    fig, ax = plt.subplots(figsize=(1.2 * n_head + 2.5, 0.9 * n_layer + 1.8))
    image = ax.imshow(delta.numpy(), cmap="magma")
    for (layer, head), value in np.ndenumerate(delta.numpy()):
        ax.text(head, layer, f"{value:+.3f}", ha="center", va="center", fontsize=8, color="grey")
    ax.set_xticks(range(n_head))
    ax.set_yticks(range(n_layer))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="val loss increase (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyse_heads(cls: type[GPT], cfg: dict) -> dict:
    """--mode=heads: attention maps of a prompt, per-head statistics and ablation over the val split."""
    from minbpe.base import render_token

    ckpt, model, data = checkpoint_with_data(cls, cfg)
    model.eval()
    tok = data.tok
    name = os.path.splitext(os.path.basename(cfg["ckpt"]))[0]
    prefix = os.path.join(HERE, "generate_text", name)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    n_map = min(64, model.cfg.block_size)  # beyond ~64 tokens the labels are unreadable
    if cfg["prompt"]:
        ids = tok.encode(read_prompt(cfg), allowed_special="none")[-n_map:]
    else:  # an excerpt of the val split
        ids = data.splits["val"][:n_map].astype(np.int64).tolist()
    model.record_attention(True)
    try:
        model(torch.tensor([ids], device=cfg["device"]))
        weights = [block.attn.recorded()[0][0] for block in model.blocks]  # (nh, T, T) per layer
    finally:
        model.record_attention(False)
    labels = [render_token(tok.vocab[i].replace(b"\n", "↵".encode())).replace(" ", "␣") for i in ids]  # visible
    title = f"{name}: attention maps (iteration {ckpt['iter_num']})"
    files = [prefix + ".heads.png"]
    plot_attention(weights, labels, title, files[0])
    if cfg["heads_per_layer"]:
        for layer, w in enumerate(weights):
            files.append(f"{prefix}.heads.layer{layer}.png")
            plot_attention([w], labels, f"{title}, layer {layer}", files[-1])

    gen = torch.Generator().manual_seed(cfg["seed"])
    batches = [data.batch("val", gen) for _ in range(cfg["eval_iters"])]
    stats = head_statistics(model, [x for x, _ in batches])
    base, delta = ablation(model, batches, cfg)
    files.append(prefix + ".ablation.png")
    plot_ablation(delta, f"{name}: val loss increase when one head is switched off", files[-1])

    rows = []
    for layer in range(model.cfg.n_layer):
        for head in range(model.cfg.n_head):
            row = {"layer": layer, "head": head, "loss_increase": delta[layer, head].item(),
                   "bpb_increase": data.bpb(delta[layer, head].item(), "val")}
            row.update({k: v[layer, head].item() for k, v in stats.items()})
            rows.append(row)
    rows.sort(key=lambda r: -r["loss_increase"])
    print(f"val loss {base:.4f} ({data.bpb(base, 'val'):.3f} bpb) over {len(batches)} batches; heads by importance:")
    print(f"{'head':>6} {'+loss':>8} {'+bpb':>7} {'entropy':>8} {'distance':>9} {'prev tok':>9} "
          f"{'first tok':>10} {'out norm':>9}")
    for r in rows:
        print(f"{r['layer']:>4}.{r['head']:<1} {r['loss_increase']:>+8.4f} {r['bpb_increase']:>+7.3f} "
              f"{r['entropy']:>8.3f} {r['mean_distance']:>9.2f} {r['previous_token']:>9.3f} "
              f"{r['first_token']:>10.3f} {r['output_norm']:>9.3f}")
    report = {"checkpoint": cfg["ckpt"], "iter_num": ckpt["iter_num"], "head_mask": cfg["head_mask"],
              "val_batches": len(batches), "val_loss": base, "heads": rows}
    files.append(prefix + ".heads.json")
    with atomic_open(files[-1], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print("wrote " + ", ".join(files))
    return report


# -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, cls: type[GPT] = GPT, script: str = "gpt") -> None:
    ddp = Distributed()
    clean = False
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv, script)
        ddp.start(cfg)
        mode = cfg["mode"]
        if mode == "auto":
            if os.path.exists(cfg["ckpt"]):
                print(f"found {cfg['ckpt']}: sampling from it (train again with --mode=train --overwrite, "
                      f"or continue with --mode=train --resume)")
                mode = "sample"
            else:
                train(cls, cfg, ddp)
                mode = "sample"
        elif mode == "train":
            train(cls, cfg, ddp)
        if ddp.master:  # sampling and analysis run in one process
            if mode == "sample":
                sample(cls, cfg)
            elif mode == "eval":
                evaluate_checkpoint(cls, cfg)
            elif mode == "heads":
                analyse_heads(cls, cfg)
        clean = True
    except UserError as e:
        if ddp.master:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        if ddp.master:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        ddp.stop(clean)


if __name__ == "__main__":
    main()
