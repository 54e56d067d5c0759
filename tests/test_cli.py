"""What a new user types, as the README says: the real scripts in a subprocess (from a copy of the code, so
their output folders are private), with output going to a pipe, as in a log."""
import json
import re
import time
import types

import numpy as np
import torch
from conftest import run_main, run_script, tiny_args

from dualgpt import run
from dualgpt.checkpoint import load_tokenizer_text


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def iterations(path) -> int:
    return torch.load(path, weights_only=True)["iter_num"]


def test_auto_mode_trains_the_typed_steps_then_samples_and_resume_or_overwrite_train_again(home, corpus, capsys):
    """`python gpt.py --max_iters=12` with no checkpoint trains exactly 12 steps although config.py says max_minutes =
    5.0, then samples (through the real command line, its output into pipes as into a log: plain progress lines, no
    carriage returns; the token file holds minbpe's ids of the corpus); then, in-process, --resume trains on, then
    samples, and --overwrite starts over, then samples, the old checkpoint kept as .bak. (With a checkpoint and
    neither flag it only samples: test_train.py's test_auto_mode_trains_then_samples_then_only_samples.)"""
    args = tiny_args(home, corpus, "--max_iters=12", "--eval_interval=6", "--log_interval=1")
    ckpt = home / "model_dict" / "gpt.pt"
    rc, out, err = finish(run_script(home, args))
    assert rc == 0, err
    assert "\r" not in out + err
    assert re.search(r"^training: 12/12 it \[\d\d:\d\d, it=12, loss=", out, re.M)
    assert "; training for 12 steps" in out
    assert f"encoding {corpus.name}" in out
    tok = load_tokenizer_text(torch.load(ckpt, weights_only=True)["tokenizer"])
    assert np.load(next((home / "data").glob("corpus_*.npy"))).tolist() == tok.encode_ordinary(corpus.read_text())
    assert iterations(ckpt) == 12
    steps = [r for r in map(json.loads, open(home / "model_dict" / "gpt.jsonl")) if "loss" in r]
    assert [r["iter"] for r in steps] == list(range(1, 13))
    assert steps[-1]["lr"] < 2e-4 + 0.05 * (3e-3 - 2e-4)  # the schedule ends (almost) fully decayed at step 12
    assert "--- sample 1/1 ---" in out
    assert run_main(args + ["--max_iters=18", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out
    assert "sampling from it" not in out
    assert iterations(ckpt) == 18
    assert "--- sample 1/1 ---" in out
    assert "(iteration 18," in (home / "generate_text" / "gpt.txt").read_text()
    before = ckpt.read_bytes()
    assert run_main(args + ["--max_iters=4", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "resuming" not in out
    assert iterations(ckpt) == 4
    assert (home / "model_dict" / "gpt.pt.bak").read_bytes() == before
    assert "--- sample 1/1 ---" in out


def test_when_both_limits_are_typed_the_first_one_ends_the_run(home, corpus, capsys):
    args = tiny_args(home, corpus, "--mode=train", "--log_interval=1")
    assert run_main(args + ["--max_iters=8", "--max_minutes=5"]) == 0
    assert "training for 5 minutes or 8 steps, whichever comes first" in capsys.readouterr().out
    assert iterations(home / "model_dict" / "gpt.pt") == 8
    # the clock ending a run with a step limit: test_train.py's test_max_minutes_budget_decays_fully


def test_no_limit_at_all_is_a_one_line_error(home, corpus, capsys):
    assert run_main(tiny_args(home, corpus, "--mode=train", "--max_iters=0", "--max_minutes=0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no training limit")
    assert err.count("\n") == 1


def test_a_time_budget_is_evaluated_at_evenly_spaced_points(home, corpus, monkeypatch):
    """On a clock where every step lasts exactly 1/16 s (run.py reads it twice a step, and this run does not
    compile), so that a busy machine cannot move a step across a point: a 1.2-second budget with 4 points is
    evaluated at the start and after the first step to end at or past each 0.3 s: steps 5, 10, 15 and 20
    (0.3125, 0.625, 0.9375 and 1.25 s)."""
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(run, "time", types.SimpleNamespace(perf_counter=lambda: next(clock) / 16, time=time.time))
    args = tiny_args(home, corpus, "--max_minutes=0.02", "--max_iters=0", "--eval_points=4", "--mode=train")
    assert run_main(args) == 0
    evals = [r for r in map(json.loads, open(home / "model_dict" / "gpt.jsonl")) if "val_loss" in r]
    assert [(r["iter"], r["train_s"]) for r in evals] == [(0, 0.0), (5, 0.3125), (10, 0.625), (15, 0.9375), (20, 1.25)]


def test_data_too_small_fails_before_the_tokenizer_is_trained(home, tmp_path):
    tiny_text = tmp_path / "five.txt"
    tiny_text.write_text("hello", encoding="utf-8")
    rc, out, err = finish(run_script(home, [f"--data={tiny_text}", "--mode=train", "--device=cpu"]))
    assert rc == 2
    assert err.startswith(f"error: {tiny_text} is too small: 5 bytes make at most 1 val tokens")
    assert err.count("\n") == 1
    assert "training a" not in out  # no tokenizer training started
    assert not (home / "tokenizers").exists() or not list((home / "tokenizers").iterdir())

