"""The run of gpt.py and gpt_.py, read top to bottom like nanoGPT's train.py.

`python gpt.py` reads the settings (main), then trains (train): the data, the model, the optimizer,
then the loop. Each step is a forward and backward pass, a clipped gradient and an optimizer step
at the scheduled learning rate; on schedule, an evaluation and a checkpoint. Then it samples
(sampling.py). With a checkpoint already there, it only samples. The other modes (eval, heads,
patch, export, import) load their own modules.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

from dualgpt import TrainingDiverged, exit_codes, repo_path
from dualgpt.checkpoint import (build_model, checkpoint_to_resume, cpu_copy, log_path,
                                make_checkpoint, save_checkpoint, set_aside)
from dualgpt.corpus import resolve_data
from dualgpt.data import Dataset
from dualgpt.files import OutputLock, append_json_line, keep_json_lines, remove_dead_temps
from dualgpt.runconfig import model_config, model_options, parse_head_mask, script_config
from dualgpt.runtime import StopRequest, autocast, cpu_has_bf16, machine_name, say, training_bar
from dualgpt.sampling import sample

# the modes besides training and sampling: module and function, loaded only when asked for
MODES = {"eval": "evaluation.evaluate_checkpoint", "export": "evaluation.export_checkpoint",
         "heads": "heads.analyse_heads", "patch": "patching.patch",
         "import": "hf_gpt2.import_checkpoint"}


def main(model_class: type[nn.Module], script: str, argv: list[str] | None = None) -> None:
    """`python <script>.py [config file] --key=value ...`: exit 2 with one line for a user's
    mistake, 1 if training diverged or a write failed, 130 after Ctrl-C."""
    # one process, or under torchrun one of several (DDP), each running this same code; torchrun
    # sets RANK, and only then is torch.distributed's machinery loaded
    ddp = None
    if "RANK" in os.environ:
        from dualgpt.distributed import Torchrun, launched_by_torchrun
        ddp = Torchrun() if launched_by_torchrun() else None
    master = ddp is None or ddp.rank == 0
    clean = False
    try:
        with exit_codes(report=master):
            # settings: config.py, then a config file, then --key=value, every value checked
            usage = sys.modules[model_class.__module__].__doc__ or ""
            cfg = script_config(sys.argv[1:] if argv is None else argv, script, usage)
            if master:  # what killed runs left behind, never a live run's files
                outputs = [os.path.dirname(os.path.abspath(cfg[key]))
                           for key in ("ckpt", "sample_file")]
                remove_dead_temps(*outputs, repo_path("data"), repo_path("tokenizers"))
            if ddp:
                ddp.start(cfg["device"])
            mode = cfg["mode"]
            fresh = not (cfg["resume"] or cfg["overwrite"])
            if mode == "auto" and os.path.exists(cfg["ckpt"]) and fresh:
                print(f"found {cfg['ckpt']}: sampling from it (continue training with --resume, "
                      "or start over with --overwrite)")
                mode = "sample"
            if mode in ("auto", "train"):  # the lock: no second run writes this checkpoint
                with OutputLock(cfg["ckpt"]) if master else nullcontext():
                    train(model_class, cfg, ddp)
            if master and mode in ("auto", "sample"):
                sample(model_class, cfg)
            elif master and mode in MODES:  # the other modes run in one process
                module, function = MODES[mode].split(".")
                run_mode = getattr(importlib.import_module(f"dualgpt.{module}"), function)
                # import writes the checkpoint: locked, as training is
                with OutputLock(cfg["ckpt"]) if mode == "import" else nullcontext():
                    run_mode(model_class, cfg)
            clean = True
    finally:
        if ddp:
            ddp.stop(clean)  # after a clean run, this ends the process (distributed.py)


@dataclasses.dataclass
class TrainState:
    """Where a run is: what its checkpoint stores besides weights, optimizers and RNG states."""
    iter_num: int = 0
    train_s: float = 0.0  # seconds of training steps and compiling: the time budget's clock
    compile_s: float = 0.0  # of which compiling, which the learning rate's clock leaves out
    best_val: float = math.inf
    best_weights: dict | None = None  # the weights of the best val loss so far, on the CPU


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up over warmup_iters steps, then cosine decay to min_lr. The decay follows
    whichever is further along: the steps after warm-up, out of decay_iters - warmup_iters, or
    the training seconds, out of budget_s (a limit of 0 is not in force). So it ends fully decayed
    at whichever limit ends the run."""
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
        # the cosine goes from 1 to 0; past the end the learning rate stays at min_lr
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1)))
        return self.min_lr + cosine * (self.learning_rate - self.min_lr)


def train(model_class: type[nn.Module], cfg: dict, ddp=None) -> None:
    """--mode=train: train a model of model_class as cfg says, checkpointing to cfg["ckpt"]. ddp:
    torchrun's process group (distributed.py), None in one process."""
    rank, world = (ddp.rank, ddp.world) if ddp else (0, 1)
    master = rank == 0
    path, device, dtype = cfg["ckpt"], cfg["device"], cfg["dtype"]
    cuda = device.startswith("cuda")

    # the checkpoint to continue, if --resume: it must be of this script, optimizer and shape
    config = model_config(cfg, model_class.config_class)
    previous = checkpoint_to_resume(path, cfg["resume"], cfg["overwrite"], cfg["optimizer"],
                                    model_class.layout, dataclasses.asdict(config))

    # data: the text as token ids (the tokenizer is trained and the ids are cached on first use)
    with ddp.rank_zero_first() if ddp else nullcontext():
        data = Dataset(resolve_data(cfg["data"]), cfg["block_size"], cfg["batch_size"], device,
                       vocab_size=cfg["vocab_size"],
                       tokenizer_text=previous and previous["tokenizer"], rank=rank, world=world,
                       workers=cfg["data_workers"], sample_mb=cfg["tokenizer_sample_mb"])

    # the model and its optimizers; every rank starts from the same weights
    torch.manual_seed(cfg["seed"])
    head_mask = parse_head_mask(cfg["head_mask"])
    model = build_model(model_class, config, head_mask, model_options(cfg, model_class)).to(device)
    optimizers = make_optimizers(model, cfg["optimizer"], cfg["learning_rate"], cfg["muon_lr"],
                                 cfg["weight_decay"], (cfg["beta1"], cfg["beta2"]), device)
    # each optimizer's peak learning rate, as a multiple of the schedule's
    peak = {key: cfg["muon_lr"] / cfg["learning_rate"] if key == "muon" else 1.0
            for key in optimizers}
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs across ranks
    # in-context learning and each head's probe scores at each evaluation, if asked for
    probe = None
    if cfg["log_probe"]:
        from dualgpt.probes import probe_length, probe_scores, repeated_tokens, training_tokens
        length = probe_length(cfg["probe_length"], config.block_size)
        tokens = repeated_tokens(cfg["probe_sequences"], length,
                                 training_tokens(data.splits["train"]), cfg["seed"])
        probe = (tokens.to(device), length)
    # float16 on CUDA only: scales the loss so that small gradients do not underflow
    scaler = torch.amp.GradScaler(enabled=dtype == "float16" and cuda)
    batch_gen = torch.Generator().manual_seed(cfg["seed"])  # every rank draws the global batch
    micro_steps = max(1, cfg["grad_accum_steps"] // world)  # the processes share them out
    tokens_per_step = cfg["batch_size"] * micro_steps * world * cfg["block_size"]
    max_iters, budget_s = cfg["max_iters"], cfg["max_minutes"] * 60
    state, resumed_at = TrainState(), None
    if previous:  # continue exactly where the checkpoint stopped
        resumed_at = previous["iter_num"]  # evaluated there already, or stopped there by Ctrl-C
        state = restore(previous, model, optimizers, scaler, batch_gen, rank, world, cfg["seed"],
                        device)
    if master:
        if previous:
            say(f"resuming {path} at iteration {state.iter_num}")
            if max_iters and state.iter_num >= max_iters:
                say(f"note: it is at or past --max_iters={max_iters}: nothing to train")
        say(describe_run(cfg, model, data, device, dtype, micro_steps, world, tokens_per_step))
        if cfg["optimizer"] == "muon" and device == "cpu" and not cpu_has_bf16():
            say("note: Muon's Newton-Schulz iterations run in bfloat16, which this CPU emulates, "
                "slowly: AdamW may train further in the same time (docs/benchmarks.md)")

    # what the steps run: compiled if asked for, wrapped for DDP under torchrun
    train_model = model
    if cfg["compile"]:
        if master:
            say("compiling the model (torch.compile; the time counts against the budget)")
        from dualgpt.compiling import compile_model
        t_compile = time.perf_counter()
        train_model = compile_model(model, cfg)
        compile_s = time.perf_counter() - t_compile
        state.compile_s += compile_s
        state.train_s += compile_s
    if ddp:  # a masked head gets no gradient: DDP must be told to expect unused parameters
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[ddp.local_rank] if cuda else None,
            find_unused_parameters=bool(head_mask))
    # the schedule's clock counts training steps only: compiling counts against the budget but
    # does not age the learning rate (else a 60 s compile in a 3-minute budget would start the
    # cosine a third of the way down)
    schedule = LRSchedule(cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"],
                          cfg["lr_decay_iters"] or max_iters,
                          budget_s and max(budget_s - state.compile_s, 1e-9))
    # with a time budget, evaluate at every eval_points-th of it (a resumed run: from the next one)
    eval_every_s = budget_s / cfg["eval_points"]
    next_eval_s = next_multiple(state.train_s, eval_every_s) if budget_s and previous else 0.0
    # the log: a fresh run sets an old one aside (as .bak, with the old checkpoint under
    # --overwrite), only now that it has started, so that a mistake found above leaves them be; a
    # resumed run drops what a killed run logged after its checkpoint, to log it again
    log = log_path(path)
    if master:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if previous:
            keep_json_lines(log, lambda record: record["iter"] <= resumed_at)
        else:
            set_aside(path)

    # the training loop
    loss = None  # the last step's loss, a tensor: reading it waits for the device
    last_log_iter, last_log_s = state.iter_num, state.train_s
    tokens_per_s, t_start = 0.0, time.time()
    bar = training_bar(budget_s or max_iters, state.train_s if budget_s else state.iter_num,
                       timed=bool(budget_s), disable=not master)
    try:
        with StopRequest() as stop:
            while True:
                # every rank on one clock (the slowest one's), so that all stop, evaluate and set
                # the learning rate at the same step; and all stop if one was asked to (Ctrl-C)
                stopping = stop.requested
                if ddp:
                    stopping, state.train_s = ddp.agree(stopping, state.train_s, device=device)
                done = bool(max_iters and state.iter_num >= max_iters
                            or budget_s and state.train_s >= budget_s)
                lr = schedule(state.iter_num, state.train_s - state.compile_s)

                # evaluate on schedule and at the end: keep the best val weights, log, print
                due = (state.train_s >= next_eval_s if budget_s
                       else state.iter_num % cfg["eval_interval"] == 0)
                evaluating = (due or done) and state.iter_num != resumed_at
                if evaluating:
                    losses = estimate_loss(model, data, cfg["eval_iters"], cfg["seed"], device,
                                           dtype)
                    if ddp:
                        losses = {split: ddp.mean(v, device) for split, v in losses.items()}
                    for loss_value in losses.values():
                        check_finite(loss_value, state.iter_num)
                    if losses["val"] < state.best_val:
                        state.best_val = losses["val"]
                        if master:  # only rank 0 saves
                            state.best_weights = cpu_copy(model.state_dict())
                    if budget_s:
                        next_eval_s = next_multiple(state.train_s, eval_every_s)
                    bpb = {split: data.bpb(loss, split) for split, loss in losses.items()}
                    record = {"iter": state.iter_num, "train_loss": losses["train"],
                              "val_loss": losses["val"], "train_bpb": bpb["train"],
                              "val_bpb": bpb["val"], "lr": lr, "tokens_per_s": tokens_per_s,
                              "train_s": state.train_s, "elapsed_s": time.time() - t_start}
                    if probe and master:  # whether induction heads have formed: one forward
                        scores, record["icl_score"] = probe_scores(model, *probe)
                        record["probe_scores"] = {  # (n_layer, n_head) each, to 4 decimals
                            name: [[round(v, 4) for v in row] for row in s.tolist()]
                            for name, s in scores.items()}
                    if master:
                        append_json_line(log, record)
                        say(f"iter {state.iter_num} ({state.train_s / 60:.1f} min): train loss "
                            f"{losses['train']:.4f} ({bpb['train']:.3f} bpb), val loss "
                            f"{losses['val']:.4f} ({bpb['val']:.3f} bpb)")

                # checkpoint what was evaluated, or where Ctrl-C stopped the run (not weights
                # that went NaN since the last look at the loss)
                if stopping and not evaluating and loss is not None:
                    check_finite(ddp.mean(loss.item(), device) if ddp else loss.item(),
                                 state.iter_num)
                if evaluating or stopping:
                    # every rank's dropout stream, for an exact resume
                    rng_cpu = ddp.gather(torch.get_rng_state()) if ddp else [torch.get_rng_state()]
                    rng_cuda = []
                    if cuda:
                        rng_cuda = ddp.gather(torch.cuda.get_rng_state()) if ddp else [
                            torch.cuda.get_rng_state()]
                    if master:
                        save_checkpoint(path, make_checkpoint(
                            model.state_dict(), dataclasses.asdict(config), model.layout,
                            data.tokenizer_text, state.iter_num, cfg,
                            best_weights=state.best_weights, best_val_loss=state.best_val,
                            **{key: opt.state_dict() for key, opt in optimizers.items()},
                            scaler=scaler.state_dict(), train_s=state.train_s,
                            compile_s=state.compile_s, rng_cpu=rng_cpu, rng_cuda=rng_cuda,
                            rng_batches=batch_gen.get_state()))
                if done or stopping:
                    break

                # one optimizer step at the scheduled learning rate
                t_step = time.perf_counter()
                for key, optimizer in optimizers.items():
                    for group in optimizer.param_groups:
                        group["lr"] = lr * peak[key]
                # forward and backward over the micro-batches: their gradients add up
                for micro in range(micro_steps):
                    x, y = data.batch("train", batch_gen, cfg["repeat_fraction"])
                    # DDP syncs the gradients once, in the last micro-batch's backward
                    last = micro == micro_steps - 1
                    with train_model.no_sync() if ddp and not last else nullcontext():
                        with autocast(device, dtype):
                            _, loss = train_model(x, y)
                        scaler.scale(loss / micro_steps).backward()
                # clip the true gradients' norm (float16's scaling undone first)
                for optimizer in optimizers.values():
                    scaler.unscale_(optimizer)
                norm = nn.utils.clip_grad_norm_(train_model.parameters(),
                                                cfg["grad_clip"] or math.inf)
                # a float16 overflow skips every optimizer's step: the scaler alone would skip only
                # the one whose gradients overflowed, and the other would step on clipped zeros
                overflow = scaler.is_enabled() and not torch.isfinite(norm).item()
                for optimizer in optimizers.values():
                    if not overflow:
                        scaler.step(optimizer)
                    optimizer.zero_grad(set_to_none=True)
                scaler.update()
                state.iter_num += 1

                # read the loss at log points only: reading it waits for the device
                log_now = state.iter_num % cfg["log_interval"] == 0
                if log_now:
                    loss_value = ddp.mean(loss.item(), device) if ddp else loss.item()
                    check_finite(loss_value, state.iter_num)
                step_s = time.perf_counter() - t_step
                state.train_s += step_s
                # the bar counts seconds of the budget (never past its end), or steps
                bar.update(min(step_s, max(0.0, bar.total - bar.n)) if budget_s else 1)
                if log_now:  # the speed of the steps since the last log point
                    steps = state.iter_num - last_log_iter
                    tokens_per_s = steps * tokens_per_step / (state.train_s - last_log_s)
                    last_log_iter, last_log_s = state.iter_num, state.train_s
                    if master:
                        append_json_line(log, {
                            "iter": state.iter_num, "loss": loss_value, "lr": lr,
                            "bpb": data.bpb(loss_value, "train"), "tokens_per_s": tokens_per_s,
                            "train_s": state.train_s, "elapsed_s": time.time() - t_start})
                    bar.set_postfix(it=state.iter_num, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{tokens_per_s:,.0f}", refresh=False)
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}; stopped without saving, the last good checkpoint {path} is "
                               "kept (try a lower --learning_rate)") from None
    finally:
        bar.close()

    # the end: where the run stopped, and its loss curve
    if master:
        say(f"saved {path} at iteration {state.iter_num} after {state.train_s / 60:.1f} min of "
            f"training (best val loss {state.best_val:.4f}, "
            f"{data.bpb(state.best_val, 'val'):.3f} bpb); log: {log}")
        if done:
            from dualgpt.plots import plot_losses  # matplotlib only when drawing
            plot_path = os.path.splitext(path)[0] + ".loss.png"
            plot_losses(log, plot_path, f"{os.path.basename(path)}: bits per byte",
                        cfg["repeat_fraction"])
            say(f"loss curve: {plot_path}")
    if stopping and not done:
        if master:
            say("interrupted: continue with --resume")
        raise SystemExit(130)


def make_optimizers(model: nn.Module, optimizer: str, learning_rate: float, muon_lr: float,
                    weight_decay: float, betas: tuple[float, float],
                    device: str) -> dict[str, torch.optim.Optimizer]:
    """AdamW, weight decay on matrices only (not biases, LayerNorm weights); with optimizer=muon,
    torch.optim.Muon on the blocks' weight matrices (each update orthogonalised: every direction of
    a matrix moves at the same rate), AdamW on the rest. Keyed as the checkpoint stores them."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    to_muon = {name for name, p in named
               if optimizer == "muon" and name.startswith("blocks.") and p.dim() == 2}
    hidden = [p for name, p in named if name in to_muon]
    rest = [p for name, p in named if name not in to_muon]
    adamw = torch.optim.AdamW(
        [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
        lr=learning_rate, betas=betas, fused=device.startswith("cuda"))
    optimizers = {"optimizer": adamw}
    if hidden:  # no weight decay there, as in the speedrun records Muon comes from
        optimizers["muon"] = torch.optim.Muon(hidden, lr=muon_lr, weight_decay=0.0)
    return optimizers


def restore(ckpt: dict, model: nn.Module, optimizers: dict, scaler: torch.amp.GradScaler,
            batch_gen: torch.Generator, rank: int, world: int, seed: int,
            device: str) -> TrainState:
    """Weights, optimizers, float16's loss scale and the random streams of a checkpoint: the run
    goes on exactly as it was, given the same number of processes (else each rank's dropout is
    seeded anew)."""
    model.load_state_dict(ckpt["model"])
    for key, optimizer in optimizers.items():
        optimizer.load_state_dict(ckpt[key])
    if ckpt.get("scaler"):  # checkpoints before it was kept start at float16's initial scale
        scaler.load_state_dict(ckpt["scaler"])
    batch_gen.set_state(ckpt["rng_batches"])
    if len(ckpt["rng_cpu"]) == world:
        torch.set_rng_state(ckpt["rng_cpu"][rank])
        if device.startswith("cuda") and ckpt.get("rng_cuda"):
            torch.cuda.set_rng_state(ckpt["rng_cuda"][rank])
    else:
        torch.manual_seed(seed + rank + ckpt["iter_num"])
    return TrainState(iter_num=ckpt["iter_num"], train_s=ckpt["train_s"],
                      compile_s=ckpt.get("compile_s", 0.0), best_val=ckpt["best_val_loss"],
                      best_weights=ckpt["best_model"])


@torch.no_grad()
def estimate_loss(model: nn.Module, data: Dataset, eval_iters: int, seed: int, device: str,
                  dtype: str) -> dict[str, float]:
    """The mean loss of each split over eval_iters fixed batches (the same at every evaluation:
    they have a generator of their own), without dropout."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(seed + 1)
        total = 0.0
        for _ in range(eval_iters):
            with autocast(device, dtype):
                total += model(*data.batch(split, gen))[1].item()
        losses[split] = total / eval_iters
    model.train()
    return losses


def check_finite(loss: float, iter_num: int) -> None:
    """A NaN or infinite loss stops the run: what it would save is no model."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"loss is {loss} at iteration {iter_num}")


def next_multiple(seconds: float, every: float) -> float:
    """The first multiple of every after seconds: when a timed run evaluates next."""
    return (math.floor(seconds / every) + 1) * every


def describe_run(cfg: dict, model: nn.Module, data: Dataset, device: str, dtype: str,
                 micro_steps: int, world: int, tokens_per_step: int) -> str:
    """The start-up line: the model's size, where it runs, the data, a step's tokens, the
    limits."""
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    note = (f"; grad_accum_steps={cfg['grad_accum_steps']} is fewer than the {world} processes, "
            "so each runs one micro-batch per step" if cfg["grad_accum_steps"] < world else "")
    return (f"{cfg['script']}.py: {n_params:.2f}M parameters, {device} {dtype} on "
            f"{machine_name(device)}, {len(data.splits['train']):,} train / "
            f"{len(data.splits['val']):,} val tokens, {tokens_per_step:,} tokens per step "
            f"(batch_size {cfg['batch_size']} x grad_accum_steps {micro_steps} x {world} "
            f"processes x block_size {cfg['block_size']}{note}); "
            f"{describe_limits(cfg['max_iters'], cfg['max_minutes'] * 60)}")


def describe_limits(max_iters: int, budget_s: float) -> str:
    """When the run stops: "training for 5 minutes or 3000 steps, whichever comes first"."""
    minutes = f"{budget_s / 60:g} minutes" if budget_s else ""
    steps = f"{max_iters} steps" if max_iters else ""
    both = ", whichever comes first" if minutes and steps else ""
    return f"training for {' or '.join(filter(None, (minutes, steps)))}{both}"
