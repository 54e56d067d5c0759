"""Training: the schedule, end to end, never destroying a checkpoint, exact resume, Ctrl-C, NaN, budgets, bf16, compile."""
import json
import os
import signal
import time
import types

import pytest
import torch
from conftest import dataset, run_main, run_script, stop_after, tiny_args

import gpt
import gpt_

from dualgpt import compiling, run
from dualgpt.runconfig import script_config


def test_lr_schedule():
    lr_at = run.LRSchedule(learning_rate=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)
    assert lr_at(0) < lr_at(9) < 1.0
    assert lr_at(10) == pytest.approx(1.0)
    assert lr_at(60) == pytest.approx(0.55)
    assert lr_at(110) == lr_at(500) == 0.1


def test_lr_schedule_follows_the_clock():
    by_steps = run.LRSchedule(learning_rate=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)
    by_clock = run.LRSchedule(learning_rate=1.0, min_lr=0.1, warmup_iters=10, decay_iters=0, budget_s=1.0)
    assert by_clock(5, 0.9) == by_steps(5)  # warm-up is counted in steps
    assert by_clock(500, 0.0) == pytest.approx(1.0)
    assert by_clock(11, 0.5) == pytest.approx(0.55)
    assert by_clock(11, 1.0) == by_clock(11, 3.0) == 0.1


def test_lr_schedule_with_both_limits_follows_whichever_is_further_along():
    both = run.LRSchedule(learning_rate=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, budget_s=100.0)
    assert both(60, 10.0) == pytest.approx(0.55)  # half the steps, a tenth of the time
    assert both(20, 50.0) == pytest.approx(0.55)  # a tenth of the steps, half the time
    assert both(110, 1.0) == both(20, 100.0) == 0.1  # fully decayed at whichever limit comes first
    assert both(60, 10.0) == run.LRSchedule(1.0, 0.1, 10, 110)(60)  # as if only the step limit were in force


@pytest.mark.parametrize("max_iters, budget_s, text", [
    (3000, 0, "training for 3000 steps"), (0, 300, "training for 5 minutes"),
    (3000, 300, "training for 5 minutes or 3000 steps, whichever comes first")])
def test_limits_describe_themselves(max_iters, budget_s, text):
    assert run.describe_limits(max_iters, budget_s) == text


def test_train_sample_eval_end_to_end(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=30", "--eval_interval=10")
    assert run_main(args + ["--mode=train"]) == 0
    ckpt = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 30
    assert ckpt["layout"] == "LB-GPT"
    records = [json.loads(line) for line in open(home / "model_dict" / "gpt.jsonl")]
    log = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in log] == [0, 10, 20, 30]
    assert [r["iter"] for r in records if "loss" in r] == [10, 20, 30]  # step records at log_interval
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert {"train_loss", "val_bpb", "lr", "tokens_per_s", "elapsed_s"} <= set(log[-1])
    assert ckpt["best_val_loss"] == min(r["val_loss"] for r in log)
    for weights in (ckpt["model"], ckpt["best_model"]):  # the tied head is stored once, not twice
        pointer = weights["wte.weight"].untyped_storage().data_ptr()
        assert weights["lm_head.weight"].untyped_storage().data_ptr() == pointer

    capsys.readouterr()
    assert run_main(args + ["--mode=sample", "--prompt=ROMEO:", "--temperature=0"]) == 0
    out = capsys.readouterr().out
    sample_text = (home / "generate_text" / "gpt.txt").read_text()
    assert sample_text.startswith("# gpt.py samples from")
    assert "iteration 30" in sample_text
    streamed = out.split("--- sample 1/1 ---\n")[1].split("\nsamples written")[0]
    assert streamed.startswith("ROMEO:")
    assert streamed in sample_text

    for _ in range(2):
        assert run_main(args + ["--mode=eval"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("train:", "val:"))]
    assert len(lines) == 4
    assert lines[:2] == lines[2:]
    assert "bits per byte" in lines[1]


def test_auto_mode_trains_then_samples_then_only_samples(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=5", "--eval_interval=5")
    assert run_main(args) == 0
    assert (home / "model_dict" / "gpt.pt").exists()
    assert (home / "generate_text" / "gpt.txt").exists()
    mtime = os.path.getmtime(home / "model_dict" / "gpt.pt")
    capsys.readouterr()
    assert run_main(args) == 0
    assert "sampling from it" in capsys.readouterr().out
    assert os.path.getmtime(home / "model_dict" / "gpt.pt") == mtime


def test_fresh_train_never_destroys_a_checkpoint(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=5", "--eval_interval=5", "--mode=train")
    assert run_main(args) == 0
    before = (home / "model_dict" / "gpt.pt").read_bytes()
    assert run_main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert (home / "model_dict" / "gpt.pt").read_bytes() == before
    assert run_main(args + ["--overwrite", "--seed=2"]) == 0
    assert (home / "model_dict" / "gpt.pt.bak").read_bytes() == before


def state_of(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_equals_uninterrupted(home, corpus, optimizer):
    common = tiny_args(home, corpus, "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=16", "--mode=train",
                       f"--optimizer={optimizer}")
    full = common + [f"--ckpt={home / 'full.pt'}"]
    assert run_main(full + ["--max_iters=16"]) == 0
    part = common + [f"--ckpt={home / 'part.pt'}"]
    assert run_main(part + ["--max_iters=6"]) == 0  # stops between evaluations
    assert run_main(part + ["--max_iters=16", "--resume"]) == 0
    a, b = state_of(home / "full.pt"), state_of(home / "part.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_full = [r for r in map(json.loads, open(home / "full.jsonl")) if "val_loss" in r]
    log_part = [r for r in map(json.loads, open(home / "part.jsonl")) if "val_loss" in r]
    key = lambda log: [(r["iter"], r["train_loss"], r["val_loss"]) for r in log]  # noqa: E731
    assert [r for r in key(log_part) if r[0] != 6] == key(log_full)
    # tokens per second at a log point: of the steps since the last one, or since the (re)start
    step_10 = [r for r in map(json.loads, open(home / "part.jsonl")) if r["iter"] == 10][0]
    resumed_s = [r for r in log_part if r["iter"] == 6][0]["train_s"]
    assert step_10["tokens_per_s"] == pytest.approx(4 * 8 * 32 / (step_10["train_s"] - resumed_s))


def test_a_resume_below_the_checkpoints_step_trains_nothing_and_says_so(home, corpus, capsys):
    """The issue's case: resumed with a lower limit, the bar started past its end, and tqdm raised a
    TypeError in a log (not a terminal)."""
    args = tiny_args(home, corpus, "--eval_interval=3", "--mode=train")
    assert run_main(args + ["--max_iters=6"]) == 0
    before = (home / "model_dict" / "gpt.pt").read_bytes()
    capsys.readouterr()
    assert run_main(args + ["--max_iters=3", "--resume"]) == 0
    out, err = capsys.readouterr()
    assert "at or past --max_iters=3: nothing to train" in out and "Traceback" not in err
    assert (home / "model_dict" / "gpt.pt").read_bytes() == before  # nothing trained, nothing written


def test_ctrl_c_saves_and_resumes_exactly(home, corpus):
    common = tiny_args(home, corpus, "--dropout=0.1", "--eval_interval=1000", "--lr_decay_iters=60", "--mode=train")
    proc = run_script(home, common + [f"--ckpt={home / 'int.pt'}", "--max_iters=100000"])
    deadline = time.time() + 120
    while not (home / "int.pt").exists() and time.time() < deadline:  # written after the first evaluation
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in out
    assert "Traceback" not in err
    stopped_at = torch.load(home / "int.pt", weights_only=True)["iter_num"]
    assert stopped_at > 0
    end = f"--max_iters={stopped_at + 10}"
    assert run_main(common + [f"--ckpt={home / 'full.pt'}", end]) == 0
    assert run_main(common + [f"--ckpt={home / 'int.pt'}", end, "--resume"]) == 0
    a, b = state_of(home / "full.pt"), state_of(home / "int.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_checkpoint(home, corpus, capsys, monkeypatch):
    args = tiny_args(home, corpus, "--max_iters=5", "--eval_interval=1000", "--mode=train")
    assert run_main(args) == 0
    good = (home / "model_dict" / "gpt.pt").read_bytes()
    assert run_main(args + ["--max_iters=30", "--resume", "--learning_rate=1e38", "--min_lr=1e38",
                            "--grad_clip=0", "--log_interval=1"]) == 1
    err = capsys.readouterr().err
    last = err.strip().split("\n")[-1].split("\r")[-1]  # after tqdm's bars
    assert last.startswith("error: loss is")
    assert "kept" in last
    assert "Traceback" not in err
    assert (home / "model_dict" / "gpt.pt").read_bytes() == good

    monkeypatch.setattr(run, "StopRequest", stop_after(3))  # between log points: the loss is not read
    assert run_main(args + ["--max_iters=30", "--resume", "--learning_rate=1e38", "--min_lr=1e38",
                            "--grad_clip=0", "--log_interval=1000"]) == 1
    assert "error: loss is nan at iteration 8" in capsys.readouterr().err
    assert (home / "model_dict" / "gpt.pt").read_bytes() == good  # never the NaN weights


def test_a_fresh_run_sets_an_old_log_aside_and_a_resumed_one_drops_what_a_killed_run_logged(home, corpus):
    """Outputs of one run never mix with another's: the checkpoint deleted, a new run's log starts
    empty (the old one kept as .bak); a run killed after logging steps past its checkpoint, then
    resumed, logs each step once (its cut-short last line gone too)."""
    args = tiny_args(home, corpus, "--eval_interval=4", "--log_interval=1", "--mode=train")
    log = home / "model_dict" / "gpt.jsonl"
    assert run_main(args + ["--max_iters=4"]) == 0
    first = log.read_text()
    (home / "model_dict" / "gpt.pt").unlink()
    assert run_main(args + ["--max_iters=4"]) == 0
    assert (home / "model_dict" / "gpt.jsonl.bak").read_text() == first
    assert [r["iter"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r] == [1, 2, 3, 4]
    with open(log, "a") as f:  # what a run killed at step 6 had logged after its checkpoint at 4
        f.write('{"iter": 5, "loss": 1.0}\n{"iter": 6, "loss": 1.0}\n{"iter": 7, "lo')
    assert run_main(args + ["--max_iters=8", "--resume"]) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 4, 8]


def test_muon_takes_the_blocks_weight_matrices_and_adamw_the_rest_each_on_its_own_schedule(home, corpus):
    """Under --optimizer=muon every parameter has one optimizer: Muon the 2-D matrices inside the blocks (in
    LB-GPT each head's own key, query and value), AdamW the embeddings (the tied head with them), gains and
    biases; a step sets each group's learning rate to its own peak times the schedule's fraction."""
    settings = (2e-3, 0.02, 0.1, (0.9, 0.99), "cpu")  # learning rates, weight decay, betas, device
    for cls in (gpt.LBGPT, gpt_.SMGPT):
        model = cls(gpt.ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=True))
        optimizers = run.make_optimizers(model, "muon", *settings)
        assert isinstance(optimizers["muon"], torch.optim.Muon)
        owner = {id(p): key for key, opt in optimizers.items() for group in opt.param_groups for p in group["params"]}
        names = dict(model.named_parameters())
        assert len(owner) == sum(len(g["params"]) for opt in optimizers.values() for g in opt.param_groups)
        assert {id(p) for p in names.values()} == set(owner)  # every parameter once
        for name, p in names.items():
            assert owner[id(p)] == ("muon" if name.startswith("blocks.") and p.dim() == 2 else "optimizer"), name
        assert model.lm_head.weight is model.wte.weight  # the tied head: AdamW, with the embedding
        if cls is gpt.LBGPT:
            assert "blocks.0.attn.heads.1.query.weight" in names and names["blocks.0.attn.heads.1.query.weight"].dim() == 2
    assert run.make_optimizers(model, "adamw", *settings).keys() == {"optimizer"}
    # through training: the logged lr is AdamW's; Muon's is muon_lr / learning_rate times it
    args = tiny_args(home, corpus, "--max_iters=3", "--eval_interval=3", "--mode=train", "--optimizer=muon",
                     "--muon_lr=0.05", "--log_interval=1")
    assert run_main(args) == 0
    ckpt = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)
    lr = [r["lr"] for r in map(json.loads, open(home / "model_dict" / "gpt.jsonl")) if "loss" in r][-1]
    assert ckpt["muon"]["param_groups"][0]["lr"] == pytest.approx(lr * 0.05 / 3e-3)
    assert all(g["lr"] == pytest.approx(lr) for g in ckpt["optimizer"]["param_groups"])
    assert len(ckpt["muon"]["state"]) == 3 * 2 + 3  # one layer: 2 heads' k, q, v, then proj, fc, proj
    assert run_main(args + ["--max_iters=4", "--resume", "--muon_lr=0.07"]) == 0  # a resume takes its own
    ckpt = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)
    lr = [r["lr"] for r in map(json.loads, open(home / "model_dict" / "gpt.jsonl")) if "loss" in r][-1]
    assert ckpt["muon"]["param_groups"][0]["lr"] == pytest.approx(lr * 0.07 / 3e-3)


@pytest.mark.parametrize("trained_with, resumed_with", [("muon", "adamw"), ("adamw", "muon")])
def test_resume_with_the_other_optimizer_is_one_line(home, corpus, capsys, trained_with, resumed_with):
    args = tiny_args(home, corpus, "--max_iters=2", "--eval_interval=2", "--mode=train")
    assert run_main(args + [f"--optimizer={trained_with}"]) == 0
    assert run_main(args + ["--resume", "--max_iters=4", f"--optimizer={resumed_with}"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {home / 'model_dict' / 'gpt.pt'} was trained with "
                                               f"optimizer={trained_with}; pass --optimizer={trained_with} to resume it")


def test_muon_on_a_cpu_that_emulates_bf16_says_what_it_costs(home, corpus, capsys, monkeypatch):
    monkeypatch.setattr(run, "cpu_has_bf16", lambda: False)
    args = tiny_args(home, corpus, "--mode=train", "--max_iters=1", "--eval_interval=1")
    assert run_main(args + ["--optimizer=adamw"]) == 0
    assert "Newton-Schulz" not in capsys.readouterr().out
    assert run_main(args + ["--optimizer=muon", "--overwrite"]) == 0
    assert "note: Muon's Newton-Schulz iterations run in bfloat16, which this CPU emulates" in capsys.readouterr().out
    monkeypatch.setattr(run, "cpu_has_bf16", lambda: True)
    assert run_main(args + ["--optimizer=muon", "--overwrite"]) == 0
    assert "Newton-Schulz" not in capsys.readouterr().out


def test_muon_on_a_torch_without_it_is_one_line(home, corpus, capsys, monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    assert run_main(tiny_args(home, corpus, "--mode=train", "--optimizer=muon")) == 2
    assert capsys.readouterr().err.startswith("error: optimizer=muon needs torch.optim.Muon, which torch ")
    assert not (home / "model_dict").exists()


def test_resume_with_other_shape_is_an_error(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=2", "--eval_interval=2", "--mode=train")
    assert run_main(args) == 0
    assert run_main(args + ["--resume", "--n_embd=64"]) == 2
    assert "n_embd=32" in capsys.readouterr().err


@pytest.mark.plots
def test_max_minutes_budget_decays_fully_and_plots(home, corpus):
    """A time budget ends the run, the other limit typed too, and the learning rate ends decayed."""
    args = tiny_args(home, corpus, "--max_minutes=0.02", "--max_iters=1000000", "--eval_interval=50",
                     "--mode=train", "--log_interval=1")  # the last step logged: its lr is the schedule's end
    t0 = time.time()
    assert run_main(args) == 0
    wall = time.time() - t0
    ckpt = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)
    assert 10 < ckpt["iter_num"] < 1000000  # stopped by the clock; evaluation time is not counted
    assert 1.2 <= ckpt["train_s"] < wall
    records = [json.loads(line) for line in open(home / "model_dict" / "gpt.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["lr"] < 2e-4 + 0.05 * (3e-3 - 2e-4)  # ended (almost) fully decayed to min_lr
    assert all(r["tokens_per_s"] > 0 for r in steps)
    assert [r["train_s"] for r in records] == sorted(r["train_s"] for r in records)
    png = home / "model_dict" / "gpt.loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib_image(png).shape[0] > 100


def matplotlib_image(path):
    import matplotlib.image
    return matplotlib.image.imread(path)


def test_bfloat16_autocast_trains(home, corpus):
    args = tiny_args(home, corpus, "--max_iters=30", "--eval_interval=30", "--mode=train", "--dtype=bfloat16")
    assert run_main(args) == 0
    evals = [r for r in map(json.loads, open(home / "model_dict" / "gpt.jsonl")) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    weights = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)["model"]
    assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 master weights


def test_compiling_counts_against_the_budget_but_not_against_the_schedule(home, corpus, monkeypatch):
    """A 0.3-second stand-in for torch.compile in a 0.9-second budget: the first logged learning rate is still
    at the peak (the cosine has not aged by a third), and the run still stops after 0.9 s including the 0.3.
    On a clock that moves 1/128 s at each reading (a step reads it twice) and 0.3 s while compiling, so that
    a busy machine cannot move the last log point away from the end."""
    clock = [0.0]

    def perf_counter():
        clock[0] += 1 / 128
        return clock[0]

    def slow_compile(model, *args):
        clock[0] += 0.3
        return model

    monkeypatch.setattr(run, "time", types.SimpleNamespace(perf_counter=perf_counter, time=time.time))
    monkeypatch.setattr(compiling, "compile_model", slow_compile)
    args = tiny_args(home, corpus, "--max_minutes=0.015", "--max_iters=0", "--compile=true", "--mode=train",
                     "--learning_rate=3e-3", "--min_lr=3e-4")
    assert run_main(args) == 0
    ckpt = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)
    compile_s = ckpt["compile_s"]
    assert compile_s >= 0.3
    assert ckpt["train_s"] >= 0.9
    first, *_, last = [r for r in map(json.loads, open(home / "model_dict" / "gpt.jsonl")) if "loss" in r]
    # the clock of the schedule started after compiling: at most the step seconds logged so far have aged it
    schedule = run.LRSchedule(3e-3, 3e-4, warmup_iters=2, decay_iters=0, budget_s=0.9 - compile_s)
    assert first["lr"] >= schedule(first["iter"], first["train_s"] - compile_s)
    assert first["lr"] > 3e-4 + 0.75 * (3e-3 - 3e-4)  # counting the compile second would have aged it by a third
    assert last["lr"] < 3e-4 + 0.05 * (3e-3 - 3e-4)  # and it still ends fully decayed


def test_compiled_training_matches_eager(home, corpus, capsys, monkeypatch):
    """The compiled run really compiled (dynamo built a graph, no fallback note), once (the training batches pass
    the guards of the warm-up batch: no second compile at the first step), and matches eager. Dynamo and
    AOTAutograd trace as under the default backend; inductor's C++ kernels, 20 s of compiling on 2 cores, are
    left to bench.py --only=compile, which times them."""
    args = tiny_args(home, corpus, "--max_iters=8", "--eval_interval=8", "--mode=train")
    assert run_main(args + ["--compile=false", f"--ckpt={home / 'eager.pt'}"]) == 0
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert run_main(args + ["--compile=True", f"--ckpt={home / 'compiled.pt'}"]) == 0
    out = capsys.readouterr().out
    assert "compiling the model" in out
    assert "torch.compile failed" not in out
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    eager, compiled = state_of(home / "eager.pt"), state_of(home / "compiled.pt")
    assert all((eager[k] - compiled[k]).abs().max().item() < 1e-4 for k in eager)


def test_compile_failure_falls_back_to_eager(home, corpus, capsys, monkeypatch):
    def broken_compile(model):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    args = tiny_args(home, corpus, "--max_iters=4", "--eval_interval=4", "--mode=train", "--compile=true")
    assert run_main(args) == 0
    assert "torch.compile failed (RuntimeError: no C++ compiler found); training without it" in capsys.readouterr().out
    assert torch.load(home / "model_dict" / "gpt.pt", weights_only=True)["iter_num"] == 4


@pytest.mark.plots
def test_with_log_probe_each_evaluation_logs_in_context_learning_and_the_plot_shows_it(home, corpus):
    """With --log_probe (config/induction.py sets it), the log's evaluations carry the in-context-learning
    score and each head's probe scores of the model evaluated (the last one: the checkpoint's latest weights),
    and the loss curve gets a second panel for them; without it, neither."""
    import matplotlib.image

    import gpt
    from dualgpt import probes
    from dualgpt.checkpoint import load_checkpoint
    args = tiny_args(home, corpus, "--max_iters=6", "--eval_interval=3", "--mode=train")
    assert run_main(args + ["--max_iters=3", f"--ckpt={home / 'plain.pt'}"]) == 0
    assert not any("icl_score" in r for r in map(json.loads, open(home / "plain.jsonl")))
    assert run_main(args + ["--log_probe"]) == 0
    records = [json.loads(line) for line in open(home / "model_dict" / "gpt.jsonl")]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 3, 6]
    ckpt = load_checkpoint(str(home / "model_dict" / "gpt.pt"))
    model = gpt.LBGPT(gpt.ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    pool = probes.training_tokens(dataset(script_config(args, "gpt")).splits["train"])
    tokens = probes.repeated_tokens(64, 15, pool, 1337)  # the default probe at block 32, seed 1337
    scores, icl = probes.probe_scores(model.eval(), tokens, 15)
    assert evals[-1]["icl_score"] == pytest.approx(icl, abs=1e-5)
    for name in probes.PROBES:  # each head's score, to the 4 decimals logged
        assert torch.allclose(torch.tensor(evals[-1]["probe_scores"][name]), scores[name], atol=5e-5)
    image = matplotlib.image.imread(home / "model_dict" / "gpt.loss.png")
    assert image.shape[0] > 0.9 * image.shape[1]  # two panels: 7 x 8 inches (one is 7 x 4.5)


def test_repeated_windows_repeat_their_start_on_the_same_rows_for_any_number_of_processes():
    """repeat_fraction (config/induction.py): a chosen row repeats its first p tokens to its end, p from a
    quarter to a half of the window; the other rows are as drawn; about that fraction of rows; 2 ranks of batch b
    get exactly the rows one process of batch 2b gets."""
    from dualgpt.data import with_repeats
    T = 15  # windows of 16 tokens (x and y, one token apart, are cut from them): periods 4 to 8
    window = torch.randint(1000, (400, T + 1), generator=torch.Generator().manual_seed(0))
    full = with_repeats(window, 0.5, torch.Generator().manual_seed(1))
    periods = []
    for row, original in zip(full, window):
        if torch.equal(row, original):
            continue
        period = next(p for p in range(4, 9) if torch.equal(row[p:], row[:-p]))
        assert torch.equal(row[:period], original[:period])
        periods.append(period)
    assert 160 < len(periods) < 240 and set(periods) == set(range(4, 9))
    halves = [with_repeats(window[200 * r:200 * (r + 1)], 0.5, torch.Generator().manual_seed(1), rank=r, world=2)
              for r in range(2)]
    assert torch.equal(torch.cat(halves), full)
