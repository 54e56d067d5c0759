"""Several processes under torchrun (DistributedDataParallel: gloo on CPU, NCCL on CUDA): the
collectives a training run needs, with the same methods as runtime.OneProcess. Loaded only when
torchrun launched the run."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from dualgpt.runtime import OneProcess


class Torchrun(OneProcess):
    """The process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK in the environment)."""

    def __init__(self):
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.active, self.master = True, self.rank == 0

    def start(self, device: str) -> None:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    def stop(self, clean: bool) -> None:
        """Tear down. After an error the ranks do not wait for each other. After a normal finish
        they first meet (gloo aborts if one leaves while another still works), and the process
        ends here, the group destroyed and every file written and closed, without the
        interpreter's shutdown: there, torch's gloo teardown now and then aborts the process
        ("terminate called without an active exception", after Python has finished; about 1 in
        20 runs of tests/test_ddp.py with torch 2.13 on CPU), turning a complete run into a
        failed one."""
        if dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()
        if clean:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def mean(self, value: float, device: str) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item() / self.world

    def agree(self, *flags: bool, device: str) -> tuple[bool, ...]:
        """Each flag True on every rank if it is True on one (so all ranks stop at the same step);
        one all-reduce for all of them."""
        t = torch.tensor(flags, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def print(self, message: str) -> None:
        """Rank 0 alone prints."""
        if self.master:
            super().print(message)
