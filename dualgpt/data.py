"""The training text: read, tokenized with a cached BPE tokenizer, split 90/10, batched."""
from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch

import config as default_config
from dualgpt import UserError, repo_path
from dualgpt.checkpoint import load_tokenizer_text
from dualgpt.files import atomic_open, write_text
from dualgpt.runtime import progress
from minbpe import RegexTokenizer


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_data(data: str) -> str:
    """The text's path: config.py's default is the clone's from any folder; another, the user's."""
    path = repo_path(data) if data == default_config.data else os.path.abspath(data)
    if not os.path.isfile(path):
        raise UserError(f"data file {data} not found; pass --data=PATH to a UTF-8 text file")
    return path


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it or pass "
                        "another --data") from None


def get_tokenizer(text: str, data_path: str, data_hash: str,
                  vocab_size: int) -> tuple[RegexTokenizer, str]:
    """A RegexTokenizer and its .model file: a previous run's in tokenizers/ for the same data and
    vocab size, else the one the clone ships in tokenizers/shipped/, else trained on text."""
    name = f"{os.path.splitext(os.path.basename(data_path))[0]}_v{vocab_size}_{data_hash[:8]}"
    prefix = repo_path("tokenizers", name)
    for candidate in (prefix + ".model", repo_path("tokenizers", "shipped", name + ".model")):
        if os.path.exists(candidate):
            tok = RegexTokenizer()
            try:
                tok.load(candidate)
                if len(tok.vocab) == vocab_size:
                    return tok, candidate
                print(f"note: not using {candidate} (it has {len(tok.vocab)} tokens, not "
                      f"{vocab_size}); training anew")
            except ValueError as e:  # minbpe's message names the file and the line
                print(f"note: not using {candidate}, which is unreadable ({e}); training anew")
    tok = RegexTokenizer()
    print(f"training a {vocab_size}-token BPE tokenizer on {os.path.basename(data_path)}")
    tok.train(text, vocab_size)  # shows a bar when it takes long, on a terminal
    write_text(prefix + ".vocab", tok.vocab_text())
    write_text(prefix + ".model", tok.model_text())
    return tok, prefix + ".model"


def load_token_cache(path: str, vocab_size: int) -> np.ndarray | None:
    """The token ids cached at path (memory-mapped), or None to encode again: when there is no
    cache, or, with a one-line notice, when it is unreadable or holds what no encoding gives."""
    if not os.path.exists(path):
        return None
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
        if ids.ndim == 1 and ids.dtype.kind in "iu" and len(ids) and 0 <= ids.min() \
                and ids.max() < vocab_size:
            return ids
        problem = "its contents are not token ids of this tokenizer"
    except Exception as e:  # a cache: whatever np.load makes of a damaged header, encode again
        problem = f"{e.__class__.__name__}: {(str(e).splitlines() or [''])[0][:80]}"
    print(f"note: the token cache {path} is unreadable ({problem}); encoding the text again")
    return None


def corpus_pieces(text: str, block: int = 1 << 16) -> list[str]:
    """text in ~64 KB pieces cut just before a letter that starts a line, where the GPT-2 and GPT-4
    split patterns always break: the pieces' ids, one after another, equal one encode() call's."""
    pieces, start = [], 0
    while start < len(text):
        end = min(start + block, len(text))
        while end < len(text) and not (text[end - 1] == "\n" and text[end].isalpha()):
            end += 1
        pieces.append(text[start:end])
        start = end
    return pieces


def encode_corpus(tok: RegexTokenizer, text: str, name: str, block: int = 1 << 16) -> np.ndarray:
    """The ids of text, encoded piece by piece (so that a progress bar moves)."""
    print(f"encoding {name} ({len(text) / 1e6:.1f} M characters)")
    dtype = np.uint16 if len(tok.vocab) <= 1 << 16 else np.uint32
    ids = [np.array(tok.encode_ordinary(piece), dtype=dtype)
           for piece in progress(corpus_pieces(text, block), desc="encoding", unit="piece")]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=dtype)


def check_size(path: str, block_size: int) -> None:
    """Fail before the slow steps (tokenizer training, encoding) when the text cannot fill one val
    window: a token is at least one byte, so n bytes give at most n - int(0.9 n) val tokens."""
    n_bytes = os.path.getsize(path)
    most_val_tokens = n_bytes - int(0.9 * n_bytes)
    if most_val_tokens < block_size + 1:
        raise UserError(f"{path} is too small: {n_bytes} bytes make at most {most_val_tokens} val "
                        f"tokens, fewer than block_size + 1 = {block_size + 1}; use more text or "
                        "a smaller --block_size")


def with_repeats(windows: torch.Tensor, fraction: float, generator: torch.Generator,
                 rank: int = 0, world: int = 1) -> torch.Tensor:
    """Windows (B, T) of which `fraction` repeat their first p tokens to the end, p drawn per row
    from a quarter to a half of the window (config/induction.py). Predicting a repeat is what
    induction heads do; a period that varies keeps a head from solving it by position. The rows
    and periods are drawn over the global batch: the same however many processes share it."""
    b, T = windows.shape
    mine = slice(rank * b, (rank + 1) * b)
    rows = (torch.rand(b * world, generator=generator) < fraction)[mine]
    period = torch.randint(T // 4, T // 2 + 1, (b * world,), generator=generator)[mine]
    repeated = windows.gather(1, torch.arange(T)[None, :] % period[:, None])
    return torch.where(rows[:, None], repeated, windows)


class Dataset:
    """Token ids of the text at path (cached in data/), split 90/10, with random-offset batches, by
    the tokenizer given as .model text (a checkpoint's) or else get_tokenizer's."""

    def __init__(self, path: str, block_size: int, batch_size: int, device: str, *,
                 vocab_size: int = 0, tokenizer_text: str | None = None, rank: int = 0,
                 world: int = 1):
        text = read_text(path)
        check_size(path, block_size)
        self.data_hash = sha256_file(path)
        if tokenizer_text is None:
            self.tok, model_path = get_tokenizer(text, path, self.data_hash, vocab_size)
            with open(model_path, encoding="utf-8") as f:
                tokenizer_text = f.read()
        else:
            self.tok = load_tokenizer_text(tokenizer_text)
        self.tokenizer_text, vocab = tokenizer_text, self.tok.vocab
        tok_hash = hashlib.sha256(tokenizer_text.encode("utf-8")).hexdigest()
        stem = os.path.splitext(os.path.basename(path))[0]
        cache = repo_path("data", f"{stem}_{self.data_hash[:8]}_{tok_hash[:8]}.npy")
        ids = load_token_cache(cache, len(vocab))
        if ids is None:
            with atomic_open(cache, "wb") as f:
                np.save(f, encode_corpus(self.tok, text, os.path.basename(path)))
            ids = np.load(cache, mmap_mode="r")
        n = int(0.9 * len(ids))
        self.splits = {"train": ids[:n], "val": ids[n:]}
        for split, arr in self.splits.items():
            if len(arr) < block_size + 1:
                raise UserError(f"{path} is too small: its {split} split has {len(arr)} tokens, "
                                f"fewer than block_size + 1 = {block_size + 1}; use more text or "
                                "a smaller --block_size")
        # bytes per token of each split: converts loss per token into bits per byte
        token_bytes = np.array([len(vocab[i]) for i in range(len(vocab))], dtype=np.int64)
        self.bytes_per_token = {s: float(token_bytes[a].sum()) / len(a)
                                for s, a in self.splits.items()}
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.rank, self.world = rank, world

    def batch(self, split: str, generator: torch.Generator,
              repeat_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """batch_size random windows (x, and y one token on). Every rank draws the same global
        batch of batch_size x world windows and keeps its slice, so 2 ranks of batch b see exactly
        what 1 process of batch 2b sees. repeat_fraction: see with_repeats."""
        data, T, b = self.splits[split], self.block_size, self.batch_size
        offsets = torch.randint(len(data) - T, (b * self.world,), generator=generator).tolist()
        xy = np.stack([data[i:i + T + 1] for i in offsets[self.rank * b:(self.rank + 1) * b]])
        xy = torch.from_numpy(xy.astype(np.int64))
        if repeat_fraction:  # the default draws nothing: its runs stay as they were
            xy = with_repeats(xy, repeat_fraction, generator, self.rank, self.world)
        if self.device.startswith("cuda"):
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        else:
            xy = xy.to(self.device)
        # contiguous, like the batch torch.compile is warmed up on: a strided view would fail its
        # guard and compile everything a second time at the first step
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    def bpb(self, loss: float, split: str) -> float:
        return loss / self.bytes_per_token[split] / math.log(2)
