"""The training text as token ids (corpus.py prepares them), split 90/10, in batches."""
from __future__ import annotations

import math

import numpy as np
import torch

from dualgpt import UserError
from dualgpt.checkpoint import load_tokenizer_text
from dualgpt.corpus import Corpus, open_corpus, token_ids, tokenizer_for


def check_size(corpus: Corpus, block_size: int) -> None:
    """Fail before the slow steps (tokenizer training, encoding) when the text cannot fill one val
    window: a token is at least one byte, so n bytes give at most n - int(0.9 n) val tokens."""
    most_val_tokens = corpus.bytes - int(0.9 * corpus.bytes)
    if most_val_tokens < block_size + 1:
        raise UserError(f"{corpus.path} is too small: {corpus.bytes} bytes make at most "
                        f"{most_val_tokens} val tokens, fewer than block_size + 1 = "
                        f"{block_size + 1}; use more text or a smaller --block_size")


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
    """Token ids of the corpus at path (a file or a folder; its token file in data/), split 90/10:
    the last tenth of the tokens is val. Random-offset batches. The tokenizer is given as .model
    text (a checkpoint's) or else corpus.tokenizer_for's; workers and sample_mb: see corpus.py."""

    def __init__(self, path: str, block_size: int, batch_size: int, device: str, *,
                 vocab_size: int = 0, tokenizer_text: str | None = None, rank: int = 0,
                 world: int = 1, workers: int = 0, sample_mb: int = 20):
        corpus = open_corpus(path)
        check_size(corpus, block_size)
        self.data_hash = corpus.hash
        if tokenizer_text is None:
            self.tok, tokenizer_text = tokenizer_for(corpus, vocab_size, sample_mb)
        else:
            self.tok = load_tokenizer_text(tokenizer_text)
        self.tokenizer_text, vocab = tokenizer_text, self.tok.vocab
        ids = token_ids(corpus, tokenizer_text, len(vocab), workers)
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
