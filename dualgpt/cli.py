"""The command line of gpt.py and gpt_.py: parse the run config, run its mode, turn mistakes into
one line. A mode's module is imported when it runs: sampling never loads the Hugging Face code."""
from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager, nullcontext

import torch.nn as nn

from dualgpt import TrainingDiverged, UserError, WriteFailed, repo_path
from dualgpt.files import OutputLock, remove_dead_temps
from dualgpt.runconfig import script_config
from dualgpt.runtime import OneProcess, processes

# mode -> module and function of the modes that run in one process, after any training
MODES = {"sample": "sampling.sample", "eval": "evaluation.evaluate_checkpoint",
         "heads": "heads.analyse_heads", "patch": "patching.patch",
         "import": "hf_gpt2.import_checkpoint", "export": "evaluation.export_checkpoint",
         "export_hf": "hf_gpt2.export_hf"}


def run_mode(model_class: type[nn.Module], cfg: dict, ddp: OneProcess) -> None:
    mode = cfg["mode"]
    if mode == "auto" and os.path.exists(cfg["ckpt"]) and not (cfg["resume"] or cfg["overwrite"]):
        print(f"found {cfg['ckpt']}: sampling from it (continue training with --resume, "
              f"or start over with --overwrite)")
        mode = "sample"
    elif mode in ("auto", "train"):  # train (then sample), holding the checkpoint all along
        from dualgpt.train import train
        with OutputLock(cfg["ckpt"]) if ddp.master else nullcontext():
            train(model_class, cfg, ddp)
        mode = "sample" if mode == "auto" else mode
    if mode == "export" and cfg["export_format"] == "hf":
        mode = "export_hf"
    if ddp.master and mode != "train":  # sampling and analysis run in one process
        module, function = MODES[mode].split(".")
        getattr(importlib.import_module(f"dualgpt.{module}"), function)(model_class, cfg)


@contextmanager
def exit_codes(report: bool = True):
    """A user mistake is one line `error: ...` and exit 2, a diverged run or a failed write one
    line and exit 1, Ctrl-C exit 130. report: whether this process prints (torchrun: rank 0)."""
    try:
        yield
    except (UserError, TrainingDiverged, WriteFailed) as e:
        if report:  # one line, even where the message quotes a value with a line break in it
            print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


def main(model_class: type[nn.Module], script: str, argv: list[str] | None = None) -> None:
    """`python <script>.py [config file] --key=value ...`: exit 2 with one line for a user mistake,
    1 if training diverged, 130 after Ctrl-C."""
    ddp = processes()
    clean = False
    try:
        with exit_codes(report=ddp.master):
            usage = sys.modules[model_class.__module__].__doc__ or ""
            cfg = script_config(sys.argv[1:] if argv is None else argv, script, usage)
            if ddp.master:  # what killed runs left behind, never a live run's
                outputs = {os.path.dirname(os.path.abspath(cfg[key]))
                           for key in ("ckpt", "sample_file")}
                remove_dead_temps(*outputs, repo_path("data"), repo_path("tokenizers"))
            ddp.start(cfg["device"])
            run_mode(model_class, cfg, ddp)
            clean = True
    finally:
        ddp.stop(clean)  # under torchrun, a clean stop ends the process (distributed.py)
