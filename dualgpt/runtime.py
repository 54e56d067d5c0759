"""Where and how the model runs: device, dtype, autocast, several processes (torchrun), Ctrl-C."""
from __future__ import annotations

import os
import signal
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
    if device != "cpu" and not device.startswith(("cuda", "mps")):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def cpu_has_bf16() -> bool:
    """Native bfloat16 matmuls (AVX512-BF16 or AMX): there autocast to bf16 runs about 4x the fp32 matmul rate."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: str) -> float:
    """This machine's measured matmul rate (FLOP/s) for the dtype: the denominator of MFU."""
    n, reps = 2048, 4
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG streams untouched
    a, b = (torch.randn(n, n, device=device, generator=gen).to(getattr(torch, dtype)) for _ in range(2))
    a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


class Distributed:
    """The torchrun process group when launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK), else one process."""

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
        """Tear down; after a normal finish all ranks first meet (gloo aborts if one leaves while another
        still works), after an error they do not wait for each other."""
        if torch.distributed.is_initialized():
            if clean:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

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
        """Print on rank 0 only, above any progress bar."""
        if self.master:
            tqdm.write(message)


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
