"""Where and how the model runs: device, dtype, autocast, several processes (torchrun), Ctrl-C."""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from dualgpt import UserError


def resolve_device(device: str) -> str:
    """"auto" -> cuda, mps or cpu; under torchrun "cuda" means this process's GPU (LOCAL_RANK)."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        else:
            return "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use --device=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' requested but MPS is not available; use --device=cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def cpu_has_bf16() -> bool:
    """Native bfloat16 matmuls (AVX512-BF16 or AMX): there autocast to bf16 runs about 4x the fp32
    matmul rate; elsewhere bf16 is emulated and far slower than float32. Both oneDNN, which runs
    the matmuls (and honours ONEDNN_MAX_CPU_ISA), and the CPU flags where they can be read must
    say so: oneDNN also reports bf16 on AVX-512 cores that only emulate it."""
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = None  # no answer: the flags decide
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: oneDNN's word alone, when it gave one
        return bool(onednn)
    return onednn is not False and ("avx512_bf16" in flags or "amx_bf16" in flags)


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        return "bfloat16" if device == "cpu" and cpu_has_bf16() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def autocast(device: str, dtype: str):
    """Mixed precision for the forward pass (weights stay float32); float32 runs as written."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def progress(iterable=None, show: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on a terminal; none when the output goes to a file or pipe, where its
    carriage-return updates would pile up in the log, or when show is False."""
    return tqdm(iterable, disable=None if show else True, **kwargs)


class PlainProgress:
    """The training bar for logs (output not a terminal): the same facts as plain lines, every
    every_s seconds. Same interface as the tqdm bar the loop uses: update(), set_postfix(),
    close(), n, total."""

    def __init__(self, total: float, initial: float, unit: str, every_s: float = 30.0,
                 disable: bool = False):
        self.total, self.n, self.unit, self.every_s = total, initial, unit, every_s
        self.disable = disable
        self.postfix: dict = {}
        self.last = time.perf_counter()

    def update(self, n: float) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.every_s:
            self.print()

    def set_postfix(self, **postfix) -> None:
        self.postfix = postfix

    def print(self) -> None:
        self.last = time.perf_counter()
        if not self.disable:
            details = " ".join(f"{k}={v}" for k, v in self.postfix.items())
            print(f"training: {self.n:.0f}/{self.total:.0f} {self.unit} {details}".rstrip(),
                  flush=True)

    def close(self) -> None:
        self.print()


def training_bar(total: float, initial: float, timed: bool, disable: bool) -> tqdm | PlainProgress:
    """The training progress bar: in seconds of the time budget (timed) or in steps."""
    if not sys.stderr.isatty():
        return PlainProgress(total, initial, "s" if timed else "it", disable=disable)
    return tqdm(total=total, initial=initial, desc="training", unit="s" if timed else "it",
                dynamic_ncols=True,
                disable=disable, bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} {unit} "
                "[{elapsed}<{remaining}{postfix}]"
                if timed else None)


class Distributed:
    """The torchrun process group when launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK), else
    one process."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.active = "RANK" in os.environ and self.world > 1
        self.master = self.rank == 0

    def start(self, device: str) -> None:
        if not self.active:
            return
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    def stop(self, clean: bool) -> None:
        """Tear down; after a normal finish all ranks first meet (gloo aborts if one leaves while
        another still works), after an error they do not wait for each other."""
        if torch.distributed.is_initialized():
            if clean:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def leave(self) -> None:
        """End a torchrun process that finished its work (the group destroyed, every file written
        and closed) without the interpreter's shutdown: there, torch's gloo teardown now and then
        aborts the process ("terminate called without an active exception", after Python has
        finished; about 1 in 20 runs of tests/test_ddp.py with torch 2.13 on CPU), which turns a
        complete run into a failed one."""
        if self.active:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def mean(self, value: float, device: str) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def agree(self, *flags: bool, device: str) -> tuple[bool, ...]:
        """Each flag True on every rank if it is True on one (so all ranks stop at the same step);
        one all-reduce for all of them."""
        if not self.active:
            return flags
        t = torch.tensor(flags, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def print(self, message: str) -> None:
        """Print on rank 0 only, above any progress bar, at once (also when the output is a log
        file)."""
        if self.master:
            tqdm.write(message)
            sys.stdout.flush()


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
