"""Training (--mode=train), read top to bottom like nanoGPT's train.py: start() gathers what a run
trains with into one Run, train() steps it, evaluating and checkpointing on schedule. One process,
or several under torchrun (DDP: gloo on CPU, NCCL on CUDA); Ctrl-C saves, and --resume continues
exactly where it stopped."""
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
from dualgpt.checkpoint import (build_model, cpu_copy, layout_of, load_checkpoint, log_path,
                                make_checkpoint, save_checkpoint)
from dualgpt.data import Dataset, resolve_data
from dualgpt.probes import probe_length, probe_scores, repeated_tokens, training_tokens
from dualgpt.runconfig import model_config, model_options, parse_head_mask, require
from dualgpt.runtime import OneProcess, StopRequest, autocast, cpu_has_bf16, training_bar


@dataclasses.dataclass
class TrainState:
    """Where a run is: what a checkpoint stores besides weights, optimizer and RNG states."""
    iter_num: int = 0
    train_s: float = 0.0  # seconds of training steps and compiling: the time budget's clock
    compile_s: float = 0.0  # of which compiling: the learning-rate schedule's clock leaves it out
    best_val: float = math.inf
    best_state: dict | None = None  # the weights of the best val loss so far, on the CPU
    next_eval_s: float = 0.0  # with a time budget: the training time of the next evaluation


@dataclasses.dataclass(frozen=True)
class Limits:
    """A run ends after max_iters steps or budget_s s of training, whichever is first (0: none)."""
    max_iters: int
    budget_s: float

    def reached(self, state: TrainState) -> bool:
        return bool(self.max_iters and state.iter_num >= self.max_iters
                    or self.budget_s and state.train_s >= self.budget_s)

    def describe(self) -> str:
        minutes = f"{self.budget_s / 60:g} minutes" if self.budget_s else ""
        steps = f"{self.max_iters} steps" if self.max_iters else ""
        both = ", whichever comes first" if minutes and steps else ""
        return f"training for {' or '.join(filter(None, (minutes, steps)))}{both}"


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up over warmup_iters steps, then cosine decay to min_lr. The decay follows the
    fraction of decay_iters steps done or of the time budget budget_s, whichever is further along
    (0 = not in force), so it ends fully decayed at whichever limit ends the run."""
    learning_rate: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    budget_s: float = 0.0

    def __call__(self, it: int, train_s: float = 0.0) -> float:
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        steps = max(1, self.decay_iters - self.warmup_iters)
        progress = max((it - self.warmup_iters) / steps if self.decay_iters else 0,
                       train_s / self.budget_s if self.budget_s else 0)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1)))  # 1 -> 0, then min_lr
        return self.min_lr + cosine * (self.learning_rate - self.min_lr)


@dataclasses.dataclass
class Run:
    """One training run: its settings, what it trains with, and where it is (state)."""
    cfg: dict
    ddp: OneProcess  # this process and the others of a torchrun launch
    data: Dataset
    model: nn.Module  # what is evaluated and saved
    optimizers: dict[str, torch.optim.Optimizer]  # checkpoint key -> optimizer (make_optimizers)
    scaler: torch.amp.GradScaler  # float16 on CUDA only: scales the loss against underflow
    batch_gen: torch.Generator  # the batch stream, shared by every rank
    limits: Limits
    micro_steps: int  # micro-batches per optimizer step on this process
    tokens_per_step: int  # of every process together
    probe: tuple[torch.Tensor, int]  # repeated random tokens and their copy length (probes.py)
    train_model: nn.Module | None = None  # what the steps run: compiled, wrapped for DDP if asked
    state: TrainState = dataclasses.field(default_factory=TrainState)
    resumed_at: int | None = None  # the step whose evaluation the resumed checkpoint holds
    schedule: LRSchedule | None = None  # set once compiling is done: it leaves compile time out
    lr: float = 0.0
    tokens_per_s: float = 0.0  # of the steps between the last two log points
    logged_at: tuple[int, float] = (0, 0.0)  # the step and training seconds of the last log point
    t_start: float = dataclasses.field(default_factory=time.time)
    # --overwrite: the old checkpoint and log, moved to .bak only at the first write, so that a run
    # that fails before it has anything to save leaves them where they were
    set_aside: list[str] = dataclasses.field(default_factory=list)

    def schedule_next_eval(self) -> None:  # under a time budget, at every eval_points-th of it
        if self.limits.budget_s:
            every = self.limits.budget_s / self.cfg["eval_points"]
            self.state.next_eval_s = (math.floor(self.state.train_s / every) + 1) * every


def train(model_class: type[nn.Module], cfg: dict, ddp: OneProcess | None = None) -> None:
    """--mode=train: train a model of model_class as cfg says, checkpointing to cfg["ckpt"]."""
    run = start(model_class, cfg, ddp or OneProcess())
    state, timed = run.state, bool(run.limits.budget_s)
    bar = training_bar(run.limits.budget_s or run.limits.max_iters,
                       state.train_s if timed else state.iter_num, timed,
                       disable=not run.ddp.master)
    done = stopping = False
    try:
        with StopRequest() as stop:
            while True:
                # stop at a limit, or after Ctrl-C: every rank at the same step
                done, stopping = run.ddp.agree(run.limits.reached(state), stop.requested,
                                               device=cfg["device"])
                # evaluate on schedule and at the end, then checkpoint what was evaluated
                due = (state.train_s >= state.next_eval_s if timed
                       else state.iter_num % cfg["eval_interval"] == 0)
                if (due or done) and state.iter_num != run.resumed_at:
                    evaluate(run)
                    save(run)
                elif stopping:  # Ctrl-C between evaluations: keep where it stopped
                    save(run)
                if done or stopping:
                    break
                training_step(run, bar)
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}; stopped without saving, the last good checkpoint "
                               f"{cfg['ckpt']} is kept (try a lower --learning_rate)") from None
    finally:
        bar.close()
    finish(run, plot=done, interrupted=stopping)


def start(model_class: type[nn.Module], cfg: dict, ddp: OneProcess) -> Run:
    """What a run trains with: data, model, optimizers (a checkpoint's when resuming), compiled and
    wrapped for DDP where asked."""
    device = cfg["device"]
    config = model_config(cfg, model_class.config_class)
    previous = check_previous_run(cfg, model_class.layout, dataclasses.asdict(config))
    if not ddp.master:  # rank 0 first: it may train the tokenizer and write the token cache
        ddp.barrier()
    data = Dataset(resolve_data(cfg["data"]), cfg["block_size"], cfg["batch_size"], device,
                   vocab_size=cfg["vocab_size"], tokenizer_text=previous and previous["tokenizer"],
                   rank=ddp.rank, world=ddp.world)
    if ddp.master:
        ddp.barrier()
    torch.manual_seed(cfg["seed"])  # every rank starts from the same weights
    model = build_model(model_class, config, parse_head_mask(cfg["head_mask"]),
                        model_options(cfg, model_class)).to(device)
    optimizers = make_optimizers(model, cfg)
    torch.manual_seed(cfg["seed"] + ddp.rank)  # dropout differs across ranks
    # each evaluation also measures in-context learning on a fixed probe (probes.py)
    length = probe_length(cfg["probe_length"], config.block_size)
    probe = repeated_tokens(cfg["probe_sequences"], length, training_tokens(data.splits["train"]),
                            cfg["seed"])
    fp16_on_cuda = cfg["dtype"] == "float16" and device.startswith("cuda")
    # grad_accum_steps shared out across the processes (runconfig.py checks it divides)
    micro_steps = max(1, cfg["grad_accum_steps"] // ddp.world)
    run = Run(cfg, ddp, data, model, optimizers, torch.amp.GradScaler(enabled=fp16_on_cuda),
              torch.Generator().manual_seed(cfg["seed"]),  # every rank draws the global batch
              Limits(cfg["max_iters"], cfg["max_minutes"] * 60), micro_steps,
              cfg["batch_size"] * micro_steps * ddp.world * cfg["block_size"],
              (probe.to(device), length), train_model=model)
    if previous is None and cfg["overwrite"]:
        run.set_aside = [p for p in (cfg["ckpt"], log_path(cfg["ckpt"])) if os.path.exists(p)]
    if previous is not None:  # continue exactly where the checkpoint stopped
        restore(run, previous)
        ddp.print(f"resuming {cfg['ckpt']} at iteration {run.state.iter_num}")
    ddp.print(describe(run))
    if cfg["optimizer"] == "muon" and device == "cpu" and not cpu_has_bf16():
        ddp.print("note: Muon's Newton-Schulz iterations run in bfloat16, which this CPU "
                  "emulates, slowly: AdamW may train further in the same time "
                  "(docs/benchmarks.md)")
    if cfg["compile"]:
        ddp.print("compiling the model (torch.compile; the time counts against the budget)")
        from dualgpt.compiling import compile_model  # torch.compile's machinery only when asked
        t_compile = time.perf_counter()
        run.train_model = compile_model(model, cfg)
        compile_s = time.perf_counter() - t_compile
        run.state.compile_s += compile_s
        run.state.train_s += compile_s
    if ddp.active:
        run.train_model = nn.parallel.DistributedDataParallel(
            run.train_model, device_ids=[ddp.local_rank] if device.startswith("cuda") else None)
    # the schedule's clock counts training steps only: compiling counts against the budget but
    # does not age the learning rate (else a 60 s compile in a 3-minute budget starts the cosine
    # a third of the way down)
    budget_s = run.limits.budget_s and max(run.limits.budget_s - run.state.compile_s, 1e-9)
    run.schedule = LRSchedule(cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"],
                              cfg["lr_decay_iters"] or cfg["max_iters"], budget_s)
    run.lr = run.schedule(run.state.iter_num, run.state.train_s - run.state.compile_s)
    run.logged_at = (run.state.iter_num, run.state.train_s)
    return run


def training_step(run: Run, bar) -> None:
    """One optimizer step at the scheduled learning rate; at log points, read and log the loss."""
    state, cfg = run.state, run.cfg
    t_step = time.perf_counter()
    run.lr = run.schedule(state.iter_num, state.train_s - state.compile_s)
    for key, optimizer in run.optimizers.items():
        for group in optimizer.param_groups:  # Muon at its own peak, on the same schedule
            group["lr"] = run.lr * (cfg["muon_lr"] / cfg["learning_rate"] if key == "muon" else 1)
    loss = optimizer_step(run)
    state.iter_num += 1
    logging = state.iter_num % cfg["log_interval"] == 0
    if logging:  # reading the loss waits for the device, so only at log points
        loss_value = run.ddp.mean(loss.item(), cfg["device"])
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"loss is {loss_value} at iteration {state.iter_num}")
    step_s = time.perf_counter() - t_step
    state.train_s += step_s
    bar.update(min(step_s, max(0.0, bar.total - bar.n)) if run.limits.budget_s else 1)
    if logging:  # the speed of the steps since the last log point (evaluations excluded)
        steps, seconds = state.iter_num - run.logged_at[0], state.train_s - run.logged_at[1]
        run.tokens_per_s = steps * run.tokens_per_step / seconds
        run.logged_at = (state.iter_num, state.train_s)
        log(run, {"iter": state.iter_num, "loss": loss_value, "lr": run.lr,
                  "bpb": run.data.bpb(loss_value, "train"), "tokens_per_s": run.tokens_per_s})
        bar.set_postfix(it=state.iter_num, loss=f"{loss_value:.4f}", lr=f"{run.lr:.2e}",
                        tok_s=f"{run.tokens_per_s:,.0f}", refresh=False)  # drawn at next update


def optimizer_step(run: Run) -> torch.Tensor:
    """Gradients summed over the micro-batches, clipped, one step: the last micro-batch's loss."""
    model, cfg = run.train_model, run.cfg
    for micro in range(run.micro_steps):
        x, y = run.data.batch("train", run.batch_gen, cfg["repeat_fraction"])
        # all-reduce gradients only on the last micro-step (no_sync: one context, entered once)
        last = micro == run.micro_steps - 1
        with nullcontext() if not run.ddp.active or last else model.no_sync():
            with autocast(cfg["device"], cfg["dtype"]):
                _, loss = model(x, y)
            run.scaler.scale(loss / run.micro_steps).backward()
    optimizers = run.optimizers.values()
    for optimizer in optimizers:  # the true gradients, not fp16's scaled ones (else a no-op)
        run.scaler.unscale_(optimizer)
    if cfg["grad_clip"] > 0 or run.scaler.is_enabled():
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or math.inf)
    # an fp16 overflow skips every optimizer's step: the scaler alone would skip only the one whose
    # gradients overflowed, and the other would step on gradients the clip zeroed
    overflow = run.scaler.is_enabled() and not torch.isfinite(norm).item()
    for optimizer in optimizers:
        if not overflow:
            run.scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    run.scaler.update()
    return loss


@torch.no_grad()
def evaluate(run: Run) -> None:
    """Train and val loss over fixed batches (the same every time: a generator of their own),
    averaged across processes: logged, printed, and the best val weights kept."""
    state, data, cfg = run.state, run.data, run.cfg
    run.model.eval()
    losses = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        total = 0.0
        for _ in range(cfg["eval_iters"]):
            with autocast(cfg["device"], cfg["dtype"]):
                total += run.model(*data.batch(split, gen))[1].item()
        losses[split] = run.ddp.mean(total / cfg["eval_iters"], cfg["device"])
    run.model.train()
    if not all(math.isfinite(v) for v in losses.values()):
        raise TrainingDiverged(f"loss is {losses['train']} at iteration {state.iter_num}")
    if losses["val"] < state.best_val:
        state.best_val = losses["val"]
        state.best_state = cpu_copy(run.model.state_dict())
    run.schedule_next_eval()
    bpb = {split: data.bpb(loss, split) for split, loss in losses.items()}
    record = {"iter": state.iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
              "train_bpb": bpb["train"], "val_bpb": bpb["val"], "lr": run.lr,
              "tokens_per_s": run.tokens_per_s}
    if run.ddp.master:  # whether induction heads have formed: the probe's scores (one forward)
        scores, icl = probe_scores(run.model, *run.probe)
        record.update(icl_score=icl, induction_max=scores["induction"].max().item())
    log(run, record)
    run.ddp.print(f"iter {state.iter_num} ({state.train_s / 60:.1f} min): train loss "
                  f"{losses['train']:.4f} ({bpb['train']:.3f} bpb), val loss {losses['val']:.4f} "
                  f"({bpb['val']:.3f} bpb)")


def save(run: Run) -> None:
    """Write the checkpoint (rank 0), with every rank's RNG state for an exact resume."""
    rng_cpu = run.ddp.gather(torch.get_rng_state())  # every rank's dropout stream
    cuda = run.cfg["device"].startswith("cuda")
    rng_cuda = run.ddp.gather(torch.cuda.get_rng_state()) if cuda else []
    if not run.ddp.master:
        return
    set_aside_previous(run)
    state, model = run.state, run.model
    save_checkpoint(run.cfg["ckpt"], make_checkpoint(
        model.state_dict(), dataclasses.asdict(model.config), model.layout,
        run.data.tokenizer_text, state.iter_num, run.cfg,
        best_weights=state.best_state, best_val_loss=state.best_val,
        **{key: optimizer.state_dict() for key, optimizer in run.optimizers.items()},
        train_s=state.train_s, compile_s=state.compile_s,
        rng_cpu=rng_cpu, rng_cuda=rng_cuda, rng_batches=run.batch_gen.get_state()))


def set_aside_previous(run: Run) -> None:  # --overwrite's .bak, at the first write
    for old in run.set_aside:
        os.replace(old, old + ".bak")
    run.set_aside = []


def check_previous_run(cfg: dict, layout: str, config_values: dict) -> dict | None:
    """The checkpoint to resume, or None for a fresh run (which never silently replaces one)."""
    path = cfg["ckpt"]
    if cfg["resume"]:
        ckpt = load_checkpoint(path)
        trained_with = "muon" if "muon" in ckpt else "adamw"
        changed = [(k, v) for k, v in ckpt["model_config"].items() if config_values.get(k) != v]
        key, value = changed[0] if changed else ("", "")
        require([("optimizer" in ckpt, f"{path} holds weights only (no optimizer state), so it "
                  "cannot be resumed; sample, eval or study heads with it, or train a new model "
                  "with --ckpt=ANOTHER_PATH"),
                 (layout_of(ckpt) == layout, f"{path} was written with {layout_of(ckpt)} "
                  "attention; resume it with that script (sample and eval work from either)"),
                 (trained_with == cfg["optimizer"], f"{path} was trained with optimizer="
                  f"{trained_with}; pass --optimizer={trained_with} to resume it"),
                 (not changed, f"{path} was trained with {key}={value}, but the config says "
                  f"{config_values.get(key)}; pass --{key}={value} to resume it")])
        return ckpt
    if os.path.exists(path) and not cfg["overwrite"]:
        raise UserError(f"{path} already exists; pass --resume to continue it, or --overwrite "
                        f"to start over (the old one is kept as {os.path.basename(path)}.bak)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return None


def restore(run: Run, ckpt: dict) -> None:
    """Weights, optimizers and RNG streams of a checkpoint: the run goes on exactly as it was."""
    run.model.load_state_dict(ckpt["model"])
    for key, optimizer in run.optimizers.items():
        optimizer.load_state_dict(ckpt[key])
    run.batch_gen.set_state(ckpt["rng_batches"])
    ddp = run.ddp
    if len(ckpt["rng_cpu"]) == ddp.world:  # exact resume needs the same number of processes
        torch.set_rng_state(ckpt["rng_cpu"][ddp.rank])
        if run.cfg["device"].startswith("cuda") and ckpt.get("rng_cuda"):
            torch.cuda.set_rng_state(ckpt["rng_cuda"][ddp.rank])
    else:
        torch.manual_seed(run.cfg["seed"] + ddp.rank + ckpt["iter_num"])
    run.state = TrainState(ckpt["iter_num"], ckpt["train_s"], ckpt.get("compile_s", 0.0),
                           ckpt["best_val_loss"], ckpt["best_model"])
    run.schedule_next_eval()
    run.resumed_at = run.state.iter_num  # that checkpoint already holds this step's evaluation


def make_optimizers(model: nn.Module, cfg: dict) -> dict[str, torch.optim.Optimizer]:
    """AdamW, weight decay on matrices only (not biases, LayerNorm weights); with optimizer=muon,
    torch.optim.Muon on the blocks' weight matrices (each update orthogonalised: every direction of
    a matrix moves at the same rate), AdamW on the rest. Keyed as the checkpoint stores them."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    to_muon = {name for name, p in named
               if cfg["optimizer"] == "muon" and name.startswith("blocks.") and p.dim() == 2}
    hidden = [p for name, p in named if name in to_muon]
    rest = [p for name, p in named if name not in to_muon]
    adamw = torch.optim.AdamW(
        [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
         {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
        fused=cfg["device"].startswith("cuda"))
    optimizers = {"optimizer": adamw}
    if hidden:  # no weight decay there, as in the speedrun records Muon comes from
        optimizers["muon"] = torch.optim.Muon(hidden, lr=cfg["muon_lr"], weight_decay=0.0)
    return optimizers


def describe(run: Run) -> str:
    """The start-up line: model size, device, data, the tokens of a step, when training stops."""
    cfg, world, splits = run.cfg, run.ddp.world, run.data.splits
    note = (f"; grad_accum_steps={cfg['grad_accum_steps']} is fewer than the {world} processes, "
            "so each runs one micro-batch per step" if cfg["grad_accum_steps"] < world else "")
    n_params = sum(p.numel() for p in run.model.parameters()) / 1e6
    return (f"{cfg['script']}.py: {n_params:.2f}M parameters, {cfg['device']} {cfg['dtype']}, "
            f"{len(splits['train']):,} train / {len(splits['val']):,} val tokens, "
            f"{run.tokens_per_step:,} tokens per step (batch_size {cfg['batch_size']} x "
            f"grad_accum_steps {run.micro_steps} x {world} processes x block_size "
            f"{cfg['block_size']}{note}); {run.limits.describe()}")


def log(run: Run, record: dict) -> None:
    """Append a record to the JSON-lines log (rank 0), with the training and wall-clock seconds."""
    if not run.ddp.master:
        return
    set_aside_previous(run)
    path = log_path(run.cfg["ckpt"])
    line = dict(record, train_s=run.state.train_s, elapsed_s=time.time() - run.t_start)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as e:
        raise WriteFailed(f"could not append to {path} ({e.__class__.__name__}: {e.strerror}); "
                          "the run stopped: free some disk space or fix the folder's "
                          "permissions, then --resume") from None


def finish(run: Run, plot: bool, interrupted: bool) -> None:
    """Report where the run ended; draw the loss curve at its end; exit 130 after Ctrl-C."""
    path, state, ddp = run.cfg["ckpt"], run.state, run.ddp
    ddp.print(f"saved {path} at iteration {state.iter_num} after {state.train_s / 60:.1f} min of "
              f"training (best val loss {state.best_val:.4f}, "
              f"{run.data.bpb(state.best_val, 'val'):.3f} bpb); log: {log_path(path)}")
    if ddp.master and plot:
        from dualgpt.plots import plot_losses  # matplotlib only when drawing
        plot_path = os.path.splitext(path)[0] + ".loss.png"
        plot_losses(log_path(path), plot_path, f"{os.path.basename(path)}: bits per byte")
        ddp.print(f"loss curve: {plot_path}")
    if interrupted:
        ddp.print("interrupted: continue with --resume")
        raise SystemExit(130)
