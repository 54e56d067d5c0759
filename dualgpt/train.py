"""Training (--mode=train): the loop of gpt.py and gpt_.py, read top to bottom like nanoGPT's train.py.

One process, or several under torchrun (DistributedDataParallel: gloo on CPU, NCCL on CUDA). A run stops
at max_iters steps or after max_minutes of training (evaluation excluded), evaluates and checkpoints
along the way, and can be stopped with Ctrl-C and resumed exactly with --resume.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

from dualgpt import TrainingDiverged, UserError, WriteFailed
from dualgpt.checkpoint import build_model, cpu_copy, load_checkpoint, log_path, make_checkpoint, save_checkpoint
from dualgpt.compiling import compile_model, load_timing, should_compile, timing_key
from dualgpt.data import Dataset, resolve_data
from dualgpt.evaluation import estimate_loss
from dualgpt.plots import plot_losses
from dualgpt.runconfig import model_config, model_options, parse_head_mask
from dualgpt.runtime import Distributed, StopRequest, autocast, matmul_peak, training_bar


@dataclasses.dataclass
class TrainState:
    """Where a run is: what a checkpoint stores besides weights, optimizer and RNG states."""
    iter_num: int = 0
    train_s: float = 0.0  # seconds spent in training steps and compiling (not in evaluation): the budget's clock
    compile_s: float = 0.0  # of which compiling: the learning-rate schedule's clock leaves it out
    best_val: float = math.inf
    best_state: dict | None = None  # the weights of the best val loss so far, on the CPU
    next_eval_s: float = 0.0  # with a time budget: the training time at which the next evaluation is due


@dataclasses.dataclass(frozen=True)
class Limits:
    """When a run ends: after max_iters steps or budget_s seconds of training, whichever comes first
    (0 = no limit of that kind)."""
    max_iters: int
    budget_s: float

    def reached(self, state: TrainState) -> bool:
        return bool(self.max_iters and state.iter_num >= self.max_iters
                    or self.budget_s and state.train_s >= self.budget_s)

    def describe(self) -> str:
        minutes = f"{self.budget_s / 60:g} minutes" if self.budget_s else ""
        steps = f"{self.max_iters} steps" if self.max_iters else ""
        if minutes and steps:
            return f"training for {minutes} or {steps}, whichever comes first"
        return f"training for {minutes or steps}"


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up over warmup_iters steps, then cosine decay to min_lr. The decay follows the run's
    progress: the fraction of decay_iters steps done, or of the time budget budget_s (the clock), whichever
    is further along (0 = not in force), so it ends fully decayed at whichever limit ends the run."""
    learning_rate: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    budget_s: float = 0.0

    def __call__(self, it: int, train_s: float = 0.0) -> float:
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        progress = max((it - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters) if self.decay_iters else 0,
                       train_s / self.budget_s if self.budget_s else 0)
        if progress >= 1:
            return self.min_lr
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.learning_rate - self.min_lr)


def micro_steps_per_process(grad_accum_steps: int, world: int) -> int:
    """Micro-batches per optimizer step on each process: grad_accum_steps shared out across the processes,
    or one each when there are more processes than grad_accum_steps (a step then holds world batches)."""
    if grad_accum_steps < world:
        return 1
    if grad_accum_steps % world:
        raise UserError(f"grad_accum_steps={grad_accum_steps} cannot be split across {world} processes; "
                        f"use a multiple of {world} (each process runs grad_accum_steps / {world} micro-steps)")
    return grad_accum_steps // world


def flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (embedding lookups do not; the tied head
    does) plus attention's score and weighted-sum matmuls, 12 * n_layer * n_embd * block_size."""
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size


def make_optimizer(model: nn.Module, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                   device: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and LayerNorm weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device.startswith("cuda"))


def check_previous_run(path: str, layout: str, model_config_values: dict, resume: bool, overwrite: bool,
                       ddp: Distributed) -> dict | None:
    """The checkpoint to resume, or None for a fresh run (which never silently replaces one)."""
    if resume:
        ckpt = load_checkpoint(path)
        if "optimizer" not in ckpt:
            raise UserError(f"{path} holds weights only (no optimizer state), so it cannot be resumed; sample, eval "
                            f"or study heads with it, or train a new model with --ckpt=ANOTHER_PATH")
        if ckpt["layout"] != layout:
            raise UserError(f"{path} was written with {ckpt['layout']} attention; resume it with that script "
                            f"(sample and eval work from either)")
        for key, value in ckpt["model_config"].items():
            if model_config_values[key] != value:
                raise UserError(f"{path} was trained with {key}={value}, but the config says "
                                f"{model_config_values[key]}; pass --{key}={value} to resume it")
        return ckpt
    if os.path.exists(path):
        if not overwrite:
            raise UserError(f"{path} already exists; pass --resume to continue it, or --overwrite to start over "
                            f"(the old one is kept as {os.path.basename(path)}.bak)")
        ddp.barrier()  # every rank has seen the old checkpoint before rank 0 moves it
        if ddp.master:
            for old in (path, log_path(path)):
                if os.path.exists(old):
                    os.replace(old, old + ".bak")
    return None


def restore(ckpt: dict, model: nn.Module, optimizer: torch.optim.Optimizer, batch_gen: torch.Generator,
            ddp: Distributed, device: str, seed: int, eval_every_s: float) -> TrainState:
    """Weights, optimizer and RNG streams of a checkpoint, so the run continues exactly where it stopped."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    batch_gen.set_state(ckpt["rng_batches"])
    if len(ckpt["rng_cpu"]) == ddp.world:  # exact resume needs the same number of processes
        torch.set_rng_state(ckpt["rng_cpu"][ddp.rank])
        if device.startswith("cuda") and ckpt.get("rng_cuda"):
            torch.cuda.set_rng_state(ckpt["rng_cuda"][ddp.rank])
    else:
        torch.manual_seed(seed + ddp.rank + ckpt["iter_num"])
    state = TrainState(ckpt["iter_num"], ckpt["train_s"], ckpt.get("compile_s", 0.0), ckpt["best_val_loss"],
                       ckpt["best_model"])
    state.next_eval_s = next_evaluation(state.train_s, eval_every_s)
    return state


def next_evaluation(train_s: float, eval_every_s: float) -> float:
    """With a time budget, evaluations fall on multiples of eval_every_s: the next one after train_s."""
    return (math.floor(train_s / eval_every_s) + 1) * eval_every_s if eval_every_s else 0.0


def evaluate(model: nn.Module, data: Dataset, state: TrainState, eval_iters: int, seed: int, device: str,
             dtype: str, ddp: Distributed, eval_every_s: float) -> dict[str, float]:
    """Train and val loss over fixed batches, averaged across processes; keeps the best val weights and
    schedules the next evaluation of a time budget."""
    losses = {k: ddp.mean(v, device) for k, v in estimate_loss(model, data, eval_iters, seed, device, dtype).items()}
    if not all(math.isfinite(v) for v in losses.values()):
        raise TrainingDiverged(f"loss is {losses['train']} at iteration {state.iter_num}")
    if losses["val"] < state.best_val:
        state.best_val = losses["val"]
        state.best_state = cpu_copy(model.state_dict())
    state.next_eval_s = next_evaluation(state.train_s, eval_every_s)
    return losses


def save(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, batch_gen: torch.Generator,
         data: Dataset, run_config: dict, ddp: Distributed, device: str) -> None:
    """Write the checkpoint (rank 0), with every rank's RNG state for an exact resume."""
    rng_cpu = ddp.gather(torch.get_rng_state())  # every rank's dropout stream
    rng_cuda = ddp.gather(torch.cuda.get_rng_state()) if device.startswith("cuda") else []
    if not ddp.master:
        return
    save_checkpoint(path, make_checkpoint(
        model.state_dict(), dataclasses.asdict(model.config), model.layout, data.tokenizer_text, state.iter_num,
        run_config, best_weights=state.best_state, best_val_loss=state.best_val, optimizer=optimizer.state_dict(),
        train_s=state.train_s, compile_s=state.compile_s, rng_cpu=rng_cpu, rng_cuda=rng_cuda,
        rng_batches=batch_gen.get_state()))


def optimizer_step(train_model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   data: Dataset, batch_gen: torch.Generator, micro_steps: int, grad_clip: float, device: str,
                   dtype: str, ddp: Distributed) -> torch.Tensor:
    """Accumulate gradients over micro_steps batches, clip, step; returns the last micro-batch's loss."""
    for micro in range(micro_steps):
        x, y = data.batch("train", batch_gen)
        # all-reduce gradients only on the last micro-step
        sync = nullcontext() if not ddp.active or micro == micro_steps - 1 else train_model.no_sync()
        with sync, autocast(device, dtype):
            _, loss = train_model(x, y)
        with sync:
            scaler.scale(loss / micro_steps).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(train_model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


def load_training_data(cfg: dict, tokenizer_text: str | None, ddp: Distributed) -> Dataset:
    """The dataset; rank 0 goes first, since it may train the tokenizer and write the token cache."""
    if not ddp.master:
        ddp.barrier()
    path = resolve_data(cfg["data"], cfg["data_url"], cfg["data_sha256"])
    data = Dataset(path, cfg["block_size"], cfg["batch_size"], cfg["device"], vocab_size=cfg["vocab_size"],
                   tokenizer_text=tokenizer_text, rank=ddp.rank, world=ddp.world)
    if ddp.master:
        ddp.barrier()
    return data


class Meter:
    """Tokens per second and MFU of the training steps since the last log point. MFU never exceeds 100%: a
    faster rate than the measured matmul peak raises the peak (the machine can evidently do that)."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, peak: float):
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak
        self.steps, self.seconds, self.tokens_per_s = 0, 0.0, 0.0

    def add(self, step_s: float) -> None:
        self.steps, self.seconds = self.steps + 1, self.seconds + step_s

    def read(self) -> tuple[float, float]:
        """(tokens/s, MFU) since the last read."""
        self.tokens_per_s = self.steps * self.tokens_per_step / self.seconds
        flops_per_s = self.steps * self.flops_per_step / self.seconds
        self.peak = max(self.peak, flops_per_s)
        self.steps, self.seconds = 0, 0.0
        return self.tokens_per_s, flops_per_s / self.peak


def train(model_class: type[nn.Module], cfg: dict, ddp: Distributed | None = None) -> None:
    """--mode=train: train a model of model_class as cfg says, checkpointing to cfg["ckpt"]."""
    ddp = ddp or Distributed()
    device, dtype, path, log_file = cfg["device"], cfg["dtype"], cfg["ckpt"], log_path(cfg["ckpt"])
    micro_steps = micro_steps_per_process(cfg["grad_accum_steps"], ddp.world)
    config = model_config(cfg, model_class.config_class)
    resume_ckpt = check_previous_run(path, model_class.layout, dataclasses.asdict(config), cfg["resume"],
                                     cfg["overwrite"], ddp)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    # setup: data, then model and optimizer; every rank starts from the same weights
    data = load_training_data(cfg, resume_ckpt and resume_ckpt["tokenizer"], ddp)
    torch.manual_seed(cfg["seed"])
    model = build_model(model_class, config, parse_head_mask(cfg["head_mask"]), model_options(cfg, model_class))
    model.to(device)
    optimizer = make_optimizer(model, cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), device)
    torch.manual_seed(cfg["seed"] + ddp.rank)  # dropout differs across ranks
    batch_gen = torch.Generator().manual_seed(cfg["seed"])  # shared: every rank draws the global batch
    limits = Limits(cfg["max_iters"], cfg["max_minutes"] * 60)
    eval_every_s = limits.budget_s / cfg["eval_points"]  # with a time budget; else every eval_interval steps
    # restore: continue exactly where a checkpoint stopped
    state = TrainState()
    if resume_ckpt is not None:
        state = restore(resume_ckpt, model, optimizer, batch_gen, ddp, device, cfg["seed"], eval_every_s)
        ddp.print(f"resuming {path} at iteration {state.iter_num}")
    resumed_at = state.iter_num if resume_ckpt is not None else None  # that checkpoint already holds this evaluation

    tokens_per_step = cfg["batch_size"] * micro_steps * ddp.world * cfg["block_size"]
    meter = Meter(tokens_per_step, flops_per_token(model) * tokens_per_step, matmul_peak(device, dtype) * ddp.world)
    ddp.print(describe_run(cfg["script"], model, device, dtype, meter.peak, data, tokens_per_step, cfg["batch_size"],
                           cfg["grad_accum_steps"], micro_steps, ddp.world, cfg["block_size"], limits))
    train_model = model
    timing = load_timing(timing_key(model, device, dtype, cfg["batch_size"]))
    compiling, reason = should_compile(cfg["compile"], limits.budget_s, limits.max_iters, timing)
    if reason:
        ddp.print(reason)
    if compiling:
        t_compile = time.perf_counter()
        ddp.print("compiling the model (torch.compile; the time counts against the budget)")
        train_model = compile_model(model, cfg["batch_size"], cfg["block_size"], device, dtype)
        compile_s = time.perf_counter() - t_compile
        state.compile_s += compile_s
        state.train_s += compile_s
    if ddp.active:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[ddp.local_rank] if device.startswith("cuda") else None)
    scaler = torch.amp.GradScaler(enabled=dtype == "float16" and device.startswith("cuda"))
    # the schedule's clock counts training steps only: compiling counts against the budget but does not age the
    # learning rate (else a 60 s compile in a 3-minute budget starts the cosine a third of the way down)
    schedule = LRSchedule(cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], cfg["lr_decay_iters"] or
                          cfg["max_iters"], max(limits.budget_s - state.compile_s, 1e-9) if limits.budget_s else 0.0)
    lr, t_start = schedule(state.iter_num, state.train_s - state.compile_s), time.time()
    timed = bool(limits.budget_s)  # the bar counts seconds of the budget, else steps
    bar = training_bar(limits.budget_s if timed else limits.max_iters, state.train_s if timed else state.iter_num,
                       timed, disable=not ddp.master)
    try:
        with StopRequest() as stop:
            while True:
                # stop at a limit, or after Ctrl-C: every rank at the same step
                done, stopping = ddp.agree(limits.reached(state), stop.requested, device=device)
                # evaluate on schedule and at the end, then checkpoint what was evaluated
                due = state.train_s >= state.next_eval_s if timed else state.iter_num % cfg["eval_interval"] == 0
                if (due or done) and state.iter_num != resumed_at:
                    losses = evaluate(model, data, state, cfg["eval_iters"], cfg["seed"], device, dtype, ddp, eval_every_s)
                    log(ddp, log_file, {"iter": state.iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                                        "train_bpb": data.bpb(losses["train"], "train"),
                                        "val_bpb": data.bpb(losses["val"], "val"), "lr": lr,
                                        "tokens_per_s": meter.tokens_per_s}, state, t_start)
                    ddp.print(f"iter {state.iter_num} ({state.train_s / 60:.1f} min): train loss {losses['train']:.4f} "
                              f"({data.bpb(losses['train'], 'train'):.3f} bpb), val loss {losses['val']:.4f} "
                              f"({data.bpb(losses['val'], 'val'):.3f} bpb)")
                    save(path, model, optimizer, state, batch_gen, data, cfg, ddp, device)
                elif stopping:  # Ctrl-C between evaluations: keep where it stopped
                    save(path, model, optimizer, state, batch_gen, data, cfg, ddp, device)
                if done or stopping:
                    break
                # one optimizer step at the scheduled learning rate
                t_step = time.perf_counter()
                lr = schedule(state.iter_num, state.train_s - state.compile_s)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = optimizer_step(train_model, optimizer, scaler, data, batch_gen, micro_steps, cfg["grad_clip"],
                                      device, dtype, ddp)
                state.iter_num += 1
                logging = state.iter_num % cfg["log_interval"] == 0
                if logging:  # reading the loss waits for the device, so only at log points
                    loss_value = ddp.mean(loss.item(), device)
                    if not math.isfinite(loss_value):
                        raise TrainingDiverged(f"loss is {loss_value} at iteration {state.iter_num}")
                step_s = time.perf_counter() - t_step
                state.train_s += step_s
                meter.add(step_s)
                bar.update(min(step_s, max(0.0, bar.total - bar.n)) if timed else 1)
                if logging:
                    tokens_per_s, mfu = meter.read()
                    log(ddp, log_file, {"iter": state.iter_num, "loss": loss_value, "bpb": data.bpb(loss_value, "train"),
                                        "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu}, state, t_start)
                    bar.set_postfix(it=state.iter_num, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.0%}")
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}; stopped without saving, the last good checkpoint {path} is kept "
                               f"(try a lower --learning_rate)") from None
    finally:
        bar.close()
    finish(path, state, data, ddp, plot=done, interrupted=stopping)


def describe_run(script: str, model: nn.Module, device: str, dtype: str, peak: float, data: Dataset,
                 tokens_per_step: int, batch_size: int, grad_accum_steps: int, micro_steps: int, world: int,
                 block_size: int, limits: Limits) -> str:
    """The start-up line: model size, device, data, how many tokens a step holds (and of what), and when
    training stops."""
    note = ""
    if grad_accum_steps < world:
        note = (f"; grad_accum_steps={grad_accum_steps} is fewer than the {world} processes, so each runs one "
                f"micro-batch per step")
    return (f"{script}.py: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {device} {dtype} "
            f"(matmul peak {peak / 1e9:,.0f} GFLOP/s), {len(data.splits['train']):,} train / "
            f"{len(data.splits['val']):,} val tokens, {tokens_per_step:,} tokens per step (batch_size {batch_size} x "
            f"grad_accum_steps {micro_steps} x {world} processes x block_size {block_size}{note}); {limits.describe()}")


def log(ddp: Distributed, log_file: str, record: dict, state: TrainState, t_start: float) -> None:
    """Append a record to the JSON-lines log (rank 0), with the training and wall-clock seconds so far."""
    if ddp.master:
        try:
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(record, train_s=state.train_s, elapsed_s=time.time() - t_start)) + "\n")
        except OSError as e:
            raise WriteFailed(f"could not append to {log_file} ({e.__class__.__name__}: {e.strerror}); the run "
                              f"stopped: free some disk space or fix the folder's permissions, then --resume") from None


def finish(path: str, state: TrainState, data: Dataset, ddp: Distributed, plot: bool, interrupted: bool) -> None:
    """Report where the run ended; draw the loss curve at the end of a run; exit 130 after Ctrl-C."""
    ddp.print(f"saved {path} at iteration {state.iter_num} after {state.train_s / 60:.1f} min of training (best val "
              f"loss {state.best_val:.4f}, {data.bpb(state.best_val, 'val'):.3f} bpb); log: {log_path(path)}")
    if ddp.master and plot:
        plot_path = os.path.splitext(path)[0] + ".loss.png"
        plot_losses(log_path(path), plot_path, f"{os.path.basename(path)}: bits per byte")
        ddp.print(f"loss curve: {plot_path}")
    if interrupted:
        ddp.print("interrupted: continue with --resume")
        raise SystemExit(130)
