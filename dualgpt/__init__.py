"""
The core engine of gpt.py (LB-GPT) and gpt_.py (SM-GPT). The scripts pass their model classes in;
nothing here imports them, nor the RLHF layer (rlhf_lib/) built on top. In reading order:

    cli.py              main(): parse the run config, run its mode (each mode's module loaded then)
    runconfig.py        config.py, a config file and --key=value overrides: the run config, checked
    runtime.py          device, dtype, autocast, Ctrl-C, progress bars, one process's collectives
    files.py            atomic writes, the output lock, a dead run's temp files
    data.py             the text, its BPE tokenizer and token cache, batches
    checkpoint.py       checkpoints saved and loaded (no unpickling), their tokenizer
    layouts.py          LB-GPT's state dict <-> SM-GPT's (a checkpoint read by the other script)
    train.py            the training loop (--mode=train), its evaluations, a Run with its state
    distributed.py      several processes under torchrun (DDP): loaded only there
    evaluation.py       a checkpoint and its data, the loss over a split, --mode=eval and export
    sampling.py         next-token logits (SM-GPT's KV cache), top-k/top-p, --mode=sample
    plots.py            matplotlib on a file-only backend, atomic PNGs, the loss curve
    probes.py           repeated random tokens: probe scores of heads, in-context learning
    patching.py         --mode=patch: activation patching, direct logit attribution
    heads.py            --mode=heads: attention maps, per-head statistics, ablation, their figures
    atlas.py            --mode=heads's offline page (atlas.html with the data inline)
    tokenizer_files.py  byte-level BPE tokenizer files both ways (GPT-2's, tokenizers')
    hf_gpt2.py          Hugging Face GPT-2 folders both ways: --mode=import, --export_format=hf
"""
from __future__ import annotations

import os

# data/, tokenizers/, ... live here
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_path(*parts: str) -> str:
    """A path under the repository's output folders (data/, tokenizers/, model_dict/,
    generate_text/)."""
    return os.path.join(ROOT, *parts)


def in_repo(path: str) -> str:
    """A path from config.py or the command line: as it is if absolute, else under the
    repository."""
    return path if os.path.isabs(path) else repo_path(path)


class UserError(Exception):
    """A mistake in the user's input: reported as one line `error: ...`, exit code 2."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: reported as one line, exit code 1."""


class WriteFailed(Exception):
    """An output could not be written (disk full, a file-size limit, a read-only folder): the file
    keeps its last good content, the run stops; reported as one line, exit code 1."""
