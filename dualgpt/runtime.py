"""Where and how the model runs: device, dtype, autocast, the machine's name, progress bars,
Ctrl-C."""
from __future__ import annotations

import os
import platform
import signal
import sys
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from dualgpt import UserError


def resolve_device(device: str) -> str:
    """"auto" -> cuda, mps or cpu; under torchrun "cuda" means this process's GPU (LOCAL_RANK)."""
    if device == "auto":
        mps = "mps" if torch.backends.mps.is_available() else "cpu"
        device = "cuda" if torch.cuda.is_available() else mps
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    kind = device.split(":")[0]
    if kind in available and not available[kind]():
        raise UserError(f"device {device!r} requested but {kind.upper()} is not available; use "
                        "--device=cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def machine_name(device: str) -> str:
    """The processor that runs the steps: the GPU's name, or the CPU's model and the instruction
    set torch uses (what every benchmark and report names beside its figures)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":",
                                   1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def cpu_has_bf16() -> bool:
    """Native bfloat16 matmuls (AVX512-BF16 or AMX): there autocast to bf16 trains about 2.6x as
    fast as float32 (bench_scaling.md's largest step); elsewhere bf16 is emulated, and slower.
    oneDNN, which runs the matmuls (and honours ONEDNN_MAX_CPU_ISA), and the CPU's flags where
    they can be read must both say so: oneDNN also reports bf16 on AVX-512 cores that only
    emulate it."""
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = None  # no answer: the flags decide
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: oneDNN's word alone
        return bool(onednn)
    return onednn is not False and ("avx512_bf16" in flags or "amx_bf16" in flags)


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" -> bfloat16 where the chip computes it natively, else float32."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device == "cpu" and cpu_has_bf16() else "float32"


def autocast(device: str, dtype: str):
    """Mixed precision for the forward pass (weights stay float32); float32 runs as written."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def progress(iterable=None, show: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on a terminal (in a log its carriage returns would pile up), if show."""
    return tqdm(iterable, disable=None if show else True, **kwargs)


def say(message: str) -> None:
    """Print above any progress bar, at once (also into a file)."""
    tqdm.write(message)
    sys.stdout.flush()


class LineWriter:
    """tqdm's output where it is not a terminal: each refresh a plain line of its own."""

    def write(self, text: str) -> None:
        if text.strip():
            print(text.strip(), flush=True)

    def flush(self) -> None:
        pass


def training_bar(total: float, initial: float, timed: bool, disable: bool) -> tqdm:
    """The training bar, in seconds of the time budget (timed) or in steps; where the output is
    not a terminal, a plain line every 30 seconds."""
    # a run resumed past a lower limit starts at its end (tqdm cannot draw a bar past its total)
    bar = dict(total=total, initial=min(initial, total), desc="training",
               unit="s" if timed else "it", disable=disable)
    if not sys.stderr.isatty():
        return tqdm(**bar, file=LineWriter(), mininterval=30, miniters=1,
                    bar_format="{desc}: {n:.0f}/{total:.0f} {unit} [{elapsed}{postfix}]")
    return tqdm(**bar, dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} {unit} "
                "[{elapsed}<{remaining}{postfix}]" if timed else None)


class StopRequest:
    """First Ctrl-C: finish the current step, save and exit; a second one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("stopping after this step (Ctrl-C again to abort without saving)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
