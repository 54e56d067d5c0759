"""Several processes under torchrun (DistributedDataParallel: gloo on CPU, NCCL on CUDA): the
collectives a training run needs. Loaded only when torchrun launched the run."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """torchrun sets RANK and WORLD_SIZE in every process it starts."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


class Torchrun:
    """The process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK in the environment)."""

    def __init__(self):
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    def start(self, device: str) -> None:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    def stop(self, clean: bool) -> None:
        """Tear down. After an error the ranks do not wait for each other. After a normal finish
        they first meet (gloo aborts if one leaves while another still works), and the process
        ends here, with the group destroyed and every file closed, before the interpreter's
        shutdown: there torch's gloo teardown now and then aborts the process ("terminate called
        without an active exception"; about 1 in 20 runs of tests/test_ddp.py with torch 2.13 on
        CPU), which would turn a complete run into a failed one."""
        if dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()
        if clean:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    @contextmanager
    def rank_zero_first(self):
        """Rank 0 runs the block first (it may train the tokenizer and write the token file);
        the others then find its files."""
        if self.rank != 0:
            dist.barrier()
        yield
        if self.rank == 0:
            dist.barrier()

    def mean(self, value: float, device: str) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item() / self.world

    def agree(self, stopping: bool, seconds: float, device: str) -> tuple[bool, float]:
        """Whether any rank was asked to stop, and the slowest rank's clock, in one all-reduce:
        each rank's own clock runs on while rank 0 saves, so they drift apart."""
        t = torch.tensor([float(stopping), seconds], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item()), t[1].item()

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
