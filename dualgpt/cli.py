"""The command line of gpt.py and gpt_.py: parse the run config, run its mode, turn mistakes into one line."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext

import torch.nn as nn

from dualgpt import TrainingDiverged, UserError, WriteFailed, repo_path
from dualgpt.evaluation import evaluate_checkpoint, export_checkpoint
from dualgpt.files import OutputLock, remove_dead_temps
from dualgpt.heads import analyse_heads
from dualgpt.hf_gpt2 import export_hf, import_checkpoint
from dualgpt.runconfig import script_config
from dualgpt.runtime import Distributed
from dualgpt.sampling import sample
from dualgpt.train import train


def export(model_class: type[nn.Module], cfg: dict) -> None:
    (export_hf if cfg["export_format"] == "hf" else export_checkpoint)(model_class, cfg)


ONE_PROCESS_MODES = {"sample": sample, "eval": evaluate_checkpoint, "heads": analyse_heads, "export": export,
                     "import": import_checkpoint}


def run_mode(model_class: type[nn.Module], cfg: dict, ddp: Distributed) -> None:
    mode = cfg["mode"]
    if mode == "auto" and os.path.exists(cfg["ckpt"]) and not (cfg["resume"] or cfg["overwrite"]):
        print(f"found {cfg['ckpt']}: sampling from it (continue training with --resume, "
              f"or start over with --overwrite)")
        mode = "sample"
    elif mode in ("auto", "train"):  # train (then, in auto mode, sample), holding the checkpoint for the run's life
        with OutputLock(cfg["ckpt"]) if ddp.master else nullcontext():
            train(model_class, cfg, ddp)
        mode = "sample" if mode == "auto" else mode
    if ddp.master and mode in ONE_PROCESS_MODES:  # sampling and analysis run in one process
        ONE_PROCESS_MODES[mode](model_class, cfg)


@contextmanager
def exit_codes(report: bool = True):
    """The scripts' way out: a user mistake is one line `error: ...` and exit 2, a diverged run or a failed write
    one line and exit 1, Ctrl-C exit 130. report: whether this process prints the line (under torchrun, rank 0
    only)."""
    try:
        yield
    except (UserError, TrainingDiverged, WriteFailed) as e:
        if report:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


def main(model_class: type[nn.Module], script: str, argv: list[str] | None = None) -> None:
    """`python <script>.py --key=value ...`: exit 2 with one line for a user mistake, 1 if training
    diverged, 130 after Ctrl-C."""
    ddp = Distributed()
    clean = False
    try:
        with exit_codes(report=ddp.master):
            usage = sys.modules[model_class.__module__].__doc__ or ""
            cfg = script_config(sys.argv[1:] if argv is None else argv, script, usage)
            if ddp.master:  # what killed runs left behind, never a live run's
                remove_dead_temps(*{os.path.dirname(os.path.abspath(cfg[k])) for k in ("ckpt", "sample_file")},
                                  repo_path("data"), repo_path("tokenizers"))
            ddp.start(cfg["device"])
            run_mode(model_class, cfg, ddp)
            clean = True
    finally:
        ddp.stop(clean)
    ddp.leave()
