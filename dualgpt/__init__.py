"""
The engine shared by gpt.py (LB-GPT) and gpt_.py (SM-GPT). The scripts pass their model class in;
nothing here imports them.

    runconfig.py   config.py + --key=value overrides -> one validated run config
    runtime.py     device, dtype, autocast, DDP, Ctrl-C, progress output, matmul peak
    data.py        the text, its BPE tokenizer and token cache, batches
    checkpoint.py  save and load (never unpickling code), looped <-> fused weight mapping
    train.py       the training loop
    sampling.py    next-token logits (with gpt_.py's KV cache), top-k/top-p, generate, --mode=sample
    evaluation.py  losses over batches and over a whole split, --mode=eval
    heads.py       --mode=heads: attention maps, per-head statistics, ablation
    plots.py       every figure (matplotlib, imported only when drawing)
    cli.py         main(): one entry point per mode
"""
from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # data/, tokenizers/, ... live here


def repo_path(*parts: str) -> str:
    """A path under the repository's output folders (data/, tokenizers/, model_dict/, generate_text/)."""
    return os.path.join(ROOT, *parts)


class UserError(Exception):
    """A mistake in the user's input: reported as one line `error: ...`, exit code 2."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: reported as one line, exit code 1."""
