"""The core engine of gpt.py (LB-GPT) and gpt_.py (SM-GPT): training, sampling, evaluation, head
research, import and export. The scripts pass their model classes in; nothing here imports them,
nor the RLHF layer (rlhf/). docs/development.md maps every module in reading order."""
from __future__ import annotations

import os

# data/, tokenizers/, ... live here
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_path(*parts: str) -> str:
    """A path under the repository (data/, tokenizers/, model_dict/, generate_text/)."""
    return os.path.join(ROOT, *parts)


class UserError(Exception):
    """A mistake in the user's input: reported as one line `error: ...`, exit code 2."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: reported as one line, exit code 1."""


class WriteFailed(Exception):
    """An output could not be written (disk full, a file-size limit, a read-only folder): the file
    keeps its last good content, the run stops; reported as one line, exit code 1."""
