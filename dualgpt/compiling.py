"""torch.compile for training (--compile): compiled before the first step, on a dummy batch, with
the RNG state put back so that a resumed run stays exact; eager where the compiler fails."""
from __future__ import annotations

import torch
import torch.nn as nn

from dualgpt.runtime import autocast


def compile_model(model: nn.Module, cfg: dict) -> nn.Module:
    """The model compiled now; the model itself if compiling fails (no C++ compiler, say)."""
    compiled, device = torch.compile(model), cfg["device"]
    try:
        with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
            # two distinct contiguous tensors, as training's batches: an aliased or strided pair
            # fails dynamo's guards and compiles everything again at the first step
            x, y = (torch.zeros(cfg["batch_size"], cfg["block_size"], dtype=torch.long,
                                device=device) for _ in range(2))
            with autocast(device, cfg["dtype"]):
                compiled(x, y)[1].backward()
        return compiled
    except Exception as e:  # any compiler failure: eager training still works
        print(f"note: torch.compile failed ({e.__class__.__name__}: "
              f"{str(e).splitlines()[0][:100]}); training without it (--compile=false skips it)")
        return model
    finally:
        model.zero_grad(set_to_none=True)
