"""The standard probe of head research, repeated random tokens, for --mode=heads and each
evaluation in training. A head's score is its mean attention on the probe's target positions
(TransformerLens's head detector): in the second copy a duplicate-token head attends to a token's
earlier occurrence, an induction head to the token after it, whose copy comes next."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualgpt import UserError
from dualgpt.hooks import patterns, run_with_cache


PROBES = ("previous_token", "duplicate_token", "induction")


def probe_length(requested: int, block_size: int) -> int:
    """Tokens per copy: as requested, or (0) 24 (49 tokens in all) or what fits the window."""
    fits = (block_size - 1) // 2
    if requested > fits:
        raise UserError(f"probe_length {requested} does not fit the model's block_size "
                        f"{block_size}: a probe is 1 + 2 x probe_length tokens, so at most {fits}")
    return requested or min(24, fits)


def repeated_tokens(n: int, length: int, tokens: int | torch.Tensor, seed: int) -> torch.Tensor:
    """The probe, (n, 1 + 2 length): a random token, then `length` more, repeated once; each drawn
    uniformly from `tokens` (ids), or from every id below it if an int."""
    gen = torch.Generator().manual_seed(seed)
    pool = tokens if isinstance(tokens, torch.Tensor) else torch.arange(int(tokens))
    first = pool[torch.randint(len(pool), (n, 1 + length), generator=gen)]
    return torch.cat([first, first[:, 1:]], dim=1)


def training_tokens(train_ids: np.ndarray) -> torch.Tensor:
    """The ids in the training split, the probe's tokens: a model never reads the others (192 of
    512 in config/induction.py's vocabulary), so their embeddings carry nothing to copy."""
    return torch.from_numpy(np.flatnonzero(np.bincount(train_ids)))


@torch.no_grad()
def probe_scores(model: nn.Module, tokens: torch.Tensor,
                 length: int) -> tuple[dict[str, torch.Tensor], float]:
    """Each head's previous-token, duplicate-token and induction score on the probe tokens (each
    (n_layer, n_head)), and the model's in-context-learning score, in eval mode (no dropout); the
    model is left in the mode it was in."""
    training = model.training
    logits, cache = run_with_cache(model.eval(), tokens, patterns(model))
    model.train(training)
    att = torch.stack([cache[name] for name in patterns(model)], dim=1)
    # att: (B, n_layer, n_head, T, T), query positions first
    T, L = tokens.shape[1], length
    every = torch.arange(1, T)  # the queries with a predecessor
    repeat = torch.arange(L + 1, T)  # the queries of the second copy
    scores = {"previous_token": att[..., every, every - 1],  # every token to its predecessor
              "duplicate_token": att[..., repeat, repeat - L],  # to its earlier occurrence
              "induction": att[..., repeat, repeat - L + 1]}  # to the token after that occurrence
    scores = {name: s.mean((0, -1)).float().cpu() for name, s in scores.items()}
    return scores, icl_score(logits, tokens, L)


def icl_score(logits: torch.Tensor, tokens: torch.Tensor, length: int) -> float:
    """The in-context-learning score: mean loss (nats) on the first copy minus on the second,
    positive when the model uses the repeat. The first token of each copy is left out of both:
    nothing before it predicts it."""
    # losses[:, j]: the loss of predicting the token at position j + 1
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:],
                             reduction="none")
    return (losses[:, 1:length].mean() - losses[:, length + 1:].mean()).item()
