"""The core engine of gpt.py (LB-GPT) and gpt_.py (SM-GPT). The scripts pass their model classes
in; nothing here imports them, nor the RLHF layer (rlhf/). Start with run.py: the default run, top
to bottom. docs/development.md maps every module."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

# data/, tokenizers/, model_dict/ and generate_text/ live here
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


@contextmanager
def exit_codes(report: bool = True):
    """A user's mistake is one line `error: ...` and exit 2; a diverged run or a failed write, one
    line and exit 1; Ctrl-C, exit 130. report: whether this process prints (torchrun: rank 0)."""
    try:
        yield
    except (UserError, TrainingDiverged, WriteFailed) as e:
        if report:  # one line, even where the message quotes a value with a line break in it
            print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
