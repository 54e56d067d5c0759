"""
The engine shared by the programs: gpt.py (LB-GPT), gpt_.py (SM-GPT), rlhf.py (the RLHF pipeline) and
rlhf_heads.py (its head study). The scripts pass their model classes in; nothing here imports them.

    runconfig.py        config.py + --key=value overrides -> the run config of one program (its own keys)
    runtime.py          device, dtype, autocast, DDP, Ctrl-C, progress output, matmul peak
    files.py            atomic writes (a temp file renamed over the target), JSON in and out
    data.py             the text, its BPE tokenizer and token cache, batches
    checkpoint.py       the checkpoint dict (built in one place), save and load (never unpickling code),
                        the LB-GPT <-> SM-GPT weight mapping and LB-GPT's parameter names
    compiling.py        torch.compile, and whether it pays on this machine (compile=auto)
    train.py            the training loop
    evaluation.py       losses over batches and over a whole split, --mode=eval, --mode=export
    sampling.py         next-token logits (with SM-GPT's KV cache), top-k/top-p, generate, --mode=sample
    heads.py            --mode=heads: attention maps, per-head statistics, ablation
    tokenizer_files.py  byte-level BPE tokenizer files both ways (GPT-2's, the tokenizers library's)
    hf_gpt2.py          Hugging Face GPT-2 folders both ways: --mode=import, --mode=export --export_format=hf
    head_comparison.py  two models head by head: weight change, attention divergence, transplants (rlhf_heads.py)
    plots.py            every figure (matplotlib, imported only when drawing)
    cli.py              gpt.py's and gpt_.py's main(): one entry point per mode; the exit codes of every program
    oracles.py          RLHF's programmatic oracles: the oracle score and the held-out judge
    preference.py       RLHF's math: labels, log-probabilities and KL, the reward model, DPO, RLOO, PPO, best-of-n
    preference_data.py  preference pairs as text (prompt/chosen/rejected JSON lines): checked, encoded, padded
    labelling.py        --rlhf_stage=label: pairs labelled by hand in the terminal, one key each
    tuning.py           what rlhf.py and rlhf_heads.py share: setup, named seeds, policies, files, the RL loop
    rlhf_report.py      measuring tuned policies, and rlhf.py's report, tables and samples
"""
from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # data/, tokenizers/, ... live here


def repo_path(*parts: str) -> str:
    """A path under the repository's output folders (data/, tokenizers/, model_dict/, generate_text/)."""
    return os.path.join(ROOT, *parts)


def in_repo(path: str) -> str:
    """A path from config.py or the command line: as it is if absolute, else under the repository."""
    return path if os.path.isabs(path) else repo_path(path)


class UserError(Exception):
    """A mistake in the user's input: reported as one line `error: ...`, exit code 2."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: reported as one line, exit code 1."""


class WriteFailed(Exception):
    """An output could not be written (disk full, a file-size limit, a read-only folder): the file keeps its last
    good content, the run stops; reported as one line, exit code 1."""
