"""Training: the schedule, end to end, never destroying a checkpoint, exact resume, Ctrl-C, NaN, budgets, bf16, compile."""
import json
import os
import signal
import time

import pytest
import torch
from conftest import run_main, run_script, tiny_args

from dualgpt import train


def test_lr_schedule():
    lr_at = train.LRSchedule(learning_rate=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)
    assert lr_at(0) < lr_at(9) < 1.0
    assert lr_at(10) == pytest.approx(1.0)
    assert lr_at(60) == pytest.approx(0.55)
    assert lr_at(110) == lr_at(500) == 0.1


def test_lr_schedule_follows_the_clock():
    by_steps = train.LRSchedule(learning_rate=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110)
    by_clock = train.LRSchedule(learning_rate=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, budget_s=1.0)
    assert by_clock(5, 0.9) == by_steps(5)  # warm-up is counted in steps
    assert by_clock(500, 0.0) == pytest.approx(1.0)
    assert by_clock(11, 0.5) == pytest.approx(0.55)
    assert by_clock(11, 1.0) == by_clock(11, 3.0) == 0.1


def test_train_sample_eval_end_to_end(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=30", "--eval_interval=10")
    assert run_main(args + ["--mode=train"]) == 0
    ckpt = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 30
    assert ckpt["layout"] == "looped"
    records = [json.loads(line) for line in open(home / "model_dict" / "gpt.jsonl")]
    log = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in log] == [0, 10, 20, 30]
    assert [r["iter"] for r in records if "loss" in r] == [10, 20, 30]  # step records at log_interval
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert {"train_loss", "val_bpb", "lr", "tokens_per_s", "elapsed_s"} <= set(log[-1])
    assert ckpt["best_val_loss"] == min(r["val_loss"] for r in log)

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


def test_resume_equals_uninterrupted(home, corpus):
    common = tiny_args(home, corpus, "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=16", "--mode=train")
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


def test_nan_loss_stops_and_keeps_checkpoint(home, corpus, capsys):
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


def test_resume_with_other_shape_is_an_error(home, corpus, capsys):
    args = tiny_args(home, corpus, "--max_iters=2", "--eval_interval=2", "--mode=train")
    assert run_main(args) == 0
    assert run_main(args + ["--resume", "--n_embd=64"]) == 2
    assert "n_embd=32" in capsys.readouterr().err


def test_max_minutes_budget_decays_fully_and_plots(home, corpus):
    args = tiny_args(home, corpus, "--max_minutes=0.05", "--max_iters=0", "--eval_interval=50", "--mode=train")
    t0 = time.time()
    assert run_main(args) == 0
    wall = time.time() - t0
    ckpt = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)
    assert ckpt["iter_num"] > 10  # evaluation time is not counted
    assert 3.0 <= ckpt["train_s"] < wall
    records = [json.loads(line) for line in open(home / "model_dict" / "gpt.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["lr"] < 2e-4 + 0.05 * (3e-3 - 2e-4)  # ended (almost) fully decayed to min_lr
    assert all(0 < r["mfu"] < 1 for r in steps)
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


@pytest.mark.parametrize("overrides, expected", [
    ({"compile": "true"}, True), ({"compile": "false", "max_minutes": 10.0}, False),
    ({"max_minutes": 5.0}, True), ({"max_minutes": 1.0}, False),
    ({"max_minutes": 0.0, "max_iters": 50000}, False),  # CPU, duration unknown
    ({"max_minutes": 0.0, "max_iters": 5000, "device": "cuda"}, True),
    ({"max_minutes": 0.0, "max_iters": 200, "device": "cuda"}, False),
])
def test_compile_auto_decision(overrides, expected):
    cfg = dict({"compile": "auto", "max_minutes": 0.0, "max_iters": 100, "device": "cpu"}, **overrides)
    assert train.should_compile(**cfg) is expected


def test_compiled_training_matches_eager(home, corpus):
    args = tiny_args(home, corpus, "--max_iters=8", "--eval_interval=8", "--mode=train")
    assert run_main(args + ["--compile=false", f"--ckpt={home / 'eager.pt'}"]) == 0
    assert run_main(args + ["--compile=True", f"--ckpt={home / 'compiled.pt'}"]) == 0
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
