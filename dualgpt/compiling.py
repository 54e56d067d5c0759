"""torch.compile, used where it pays back on this machine, as measured here (compile=auto).

Compiling costs time up front (26 s to over a minute on a laptop CPU) and then makes each step faster by
a factor that depends on the machine (1.2x here with native bf16, none at all on an AVX2 laptop CPU). In a
run of R seconds it gives (R - compile_s) / compiled_step_s steps against R / eager_step_s. compile=auto
compiles where that is at least 10% more steps (less is within the noise of the timings):
R >= compile_s / (1 - 1.1 * compiled_step_s / eager_step_s). `python bench.py --only=compile` measures the
three numbers for the model in config.py and records them in model_dict/compile_timings.json; without such
a record compile=auto does not compile.
"""
from __future__ import annotations

import json
import math
import os
import platform

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dualgpt import repo_path
from dualgpt.runtime import autocast
from dualgpt.files import write_json


def timings_path() -> str:
    return repo_path("model_dict", "compile_timings.json")


def machine_name(device: str) -> str:
    """The processor that runs the steps: the GPU's name, or the CPU's model and the instruction set torch uses."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def timing_key(model: nn.Module, device: str, dtype: str, batch_size: int) -> str:
    """What a measurement holds for: torch version, processor, dtype, attention layout, model shape and batch."""
    c = model.config
    return (f"torch {torch.__version__} | {machine_name(device)} | {dtype} | {model.layout} {c.n_layer}x{c.n_head}x"
            f"{c.n_embd} vocab {c.vocab_size} block {c.block_size} dropout {c.dropout:g} | batch {batch_size}")


TIMING_KEYS = {"compile_s", "eager_step_s", "compiled_step_s"}  # one measurement


def read_timings() -> dict:
    """Every recorded measurement, by timing_key; none if the file is missing, and none with a one-line notice if
    it is unreadable (the next `python bench.py --only=compile` writes it anew)."""
    path = timings_path()
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            timings = json.load(f)
        if isinstance(timings, dict) and all(isinstance(v, dict) and TIMING_KEYS <= v.keys() for v in timings.values()):
            return timings
    except (OSError, ValueError):
        pass
    print(f"note: {path} is unreadable (cut short or overwritten?); compile=auto treats this machine as unmeasured "
          f"until python bench.py --only=compile records it again")
    return {}


def load_timing(key: str) -> dict | None:
    return read_timings().get(key)


def record_timing(key: str, compile_s: float, eager_step_s: float, compiled_step_s: float) -> None:
    timings = read_timings()
    timings[key] = {"compile_s": compile_s, "eager_step_s": eager_step_s, "compiled_step_s": compiled_step_s}
    write_json(timings_path(), timings)


MIN_GAIN = 0.1  # compile only for at least 10% more steps


def pays_back_after_s(timing: dict) -> float:
    """The shortest run (seconds) in which compiling buys MIN_GAIN more steps; inf if it never does."""
    saved = 1 - (1 + MIN_GAIN) * timing["compiled_step_s"] / timing["eager_step_s"]
    return timing["compile_s"] / saved if saved > 0 else math.inf


def should_compile(compile: str, budget_s: float, max_iters: int, timing: dict | None) -> tuple[bool, str]:
    """The decision, and for compile=auto a line saying why. The run's length is its time budget, or its
    step limit at the measured eager speed, whichever is shorter."""
    if compile != "auto":
        return compile == "true", ""
    if timing is None:
        return False, ("compile=auto: off (torch.compile was not measured on this machine for this model and batch; "
                       "python bench.py --only=compile measures it)")
    run_s = min(s for s in (budget_s, max_iters * timing["eager_step_s"]) if s > 0)
    pays_after = pays_back_after_s(timing)
    speedup = timing["eager_step_s"] / timing["compiled_step_s"]
    when = f"runs of {pays_after:.0f} s or more" if pays_after < math.inf else "no run"
    return run_s >= pays_after, (f"compile=auto: {'on' if run_s >= pays_after else 'off'} (measured here: compiling "
                                 f"takes {timing['compile_s']:.0f} s, then steps run {speedup:.2f}x as fast, which buys "
                                 f"{MIN_GAIN:.0%} more steps in {when}; this run is {run_s:.0f} s)")


def compile_model(model: nn.Module, batch_size: int, block_size: int, device: str, dtype: str) -> nn.Module:
    """torch.compile the model and compile it now, on a dummy batch with the RNG state put back (so a resumed
    run stays exact); if compiling fails (no C++ compiler, an unsupported platform) train without it."""
    compiled = torch.compile(model)
    rng = torch.get_rng_state(), torch.cuda.get_rng_state() if device.startswith("cuda") else None
    try:
        # a batch as training's: two distinct contiguous tensors (an aliased or strided pair fails the guards and
        # compiles everything again at the first step)
        x, y = (torch.zeros(batch_size, block_size, dtype=torch.long, device=device) for _ in range(2))
        with autocast(device, dtype):
            loss = compiled(x, y)[1]
        loss.backward()
        return compiled
    except Exception as e:  # any compiler failure: eager training still works
        tqdm.write(f"note: torch.compile failed ({e.__class__.__name__}: {str(e).splitlines()[0][:100]}); "
                   f"training without it (--compile=false skips the attempt)")
        return model
    finally:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1])
