"""Data-parallel training under torchrun: 2 CPU processes (gloo) against 1 process with twice the batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import copy_code, run_main, tiny_args

import gpt
from dualgpt.evaluation import evaluate_checkpoint
from dualgpt.runconfig import script_config

TIMEOUT = 300  # launch, train and tear down must finish well inside this


def torchrun_started(home, script, args, nproc=2) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 <script>.py args...`, started on a copy of the code in home."""
    if not (home / f"{script}.py").exists():
        copy_code(home)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             str(home / f"{script}.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=home)


def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def torchrun(home, script, args, nproc=2) -> subprocess.CompletedProcess:
    """The same, run to the end."""
    return finished(torchrun_started(home, script, args, nproc))


def output(result: subprocess.CompletedProcess) -> str:
    """A failed launch's output for the assertion message: how far rank 0 got, and what the launcher said."""
    return f"stdout:\n{result.stdout[-1500:]}\nstderr:\n{result.stderr[-3000:]}"


def records(path, key):
    return [r for r in map(json.loads, open(path)) if key in r]


def test_two_processes_equal_one_process_with_twice_the_batch(home, corpus):
    """LB-GPT here, SM-GPT in the resume test below: each script runs under DDP once."""
    script, cls = "gpt", gpt.LBGPT
    common = tiny_args(home, corpus, "--max_iters=6", "--eval_interval=6", "--log_interval=1", "--dropout=0.0",
                       "--mode=train", script=script)
    ddp_ckpt, single_ckpt = home / "ddp.pt", home / "single.pt"
    result = torchrun(home, script, common + ["--batch_size=4", "--grad_accum_steps=2", f"--ckpt={ddp_ckpt}"])
    assert result.returncode == 0, output(result)
    assert "(batch_size 4 x grad_accum_steps 1 x 2 processes x block_size 32)" in result.stdout
    assert result.stdout.count("iter 6 (") == 1  # only rank 0 prints
    assert run_main(common + ["--batch_size=8", "--grad_accum_steps=1", f"--ckpt={single_ckpt}"], cls, script) == 0

    ddp_steps = records(home / "ddp.jsonl", "loss")
    single_steps = records(home / "single.jsonl", "loss")
    assert [r["iter"] for r in ddp_steps] == [1, 2, 3, 4, 5, 6] == [r["iter"] for r in single_steps]
    for a, b in zip(ddp_steps, single_steps):
        assert abs(a["loss"] - b["loss"]) <= 1e-5
    assert abs(records(home / "ddp.jsonl", "val_loss")[-1]["val_loss"]
               - records(home / "single.jsonl", "val_loss")[-1]["val_loss"]) <= 1e-5

    # rank 0's checkpoint loads in one process and evaluates like the single-process one
    results = []
    for ckpt in (ddp_ckpt, single_ckpt):
        cfg = script_config(common + [f"--ckpt={ckpt}", "--mode=eval"], script)
        results.append(evaluate_checkpoint(cls, cfg)["val"]["loss"])
    assert results[0] == pytest.approx(results[1], abs=1e-4)
    assert len(torch.load(ddp_ckpt, weights_only=True)["rng_cpu"]) == 2  # each rank's dropout stream


def test_two_process_run_resumes_exactly(home, corpus):
    """With config.py's grad_accum_steps = 1 on 2 processes (each runs one micro-batch per step, and the start-up
    line says so): a run stopped at step 4 and resumed ends bit-identical to an uninterrupted one."""
    common = tiny_args(home, corpus, "--eval_interval=4", "--log_interval=1", "--dropout=0.1", "--mode=train",
                       "--batch_size=4", "--lr_decay_iters=8", script="gpt_")
    copy_code(home)
    # the uninterrupted run and the first half of the other are independent: run them side by side
    full = torchrun_started(home, "gpt_", common + ["--max_iters=8", f"--ckpt={home / 'full.pt'}"])
    first = torchrun(home, "gpt_", common + ["--max_iters=4", f"--ckpt={home / 'part.pt'}"])
    assert first.returncode == 0, output(first)
    assert ("256 tokens per step (batch_size 4 x grad_accum_steps 1 x 2 processes x block_size 32; "
            "grad_accum_steps=1 is fewer than the 2 processes, so each runs one micro-batch per step)") in first.stdout
    full = finished(full)
    assert full.returncode == 0, output(full)
    second = torchrun(home, "gpt_", common + ["--max_iters=8", f"--ckpt={home / 'part.pt'}", "--resume"])
    assert second.returncode == 0, output(second)
    a = torch.load(home / "full.pt", weights_only=True)["model"]
    b = torch.load(home / "part.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_world_size_the_config_cannot_use(home, corpus, monkeypatch, capsys):
    """Refused before any process-group work: here in one process with the environment torchrun gives rank 0 of
    2 (a real launch costs 5 s of the suite and reaches the same check)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_main(tiny_args(home, corpus, "--max_iters=2", "--grad_accum_steps=3", "--mode=train")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: grad_accum_steps=3 cannot be split across 2 processes; use a multiple of 2 "
                      "(each process runs grad_accum_steps / 2 micro-steps)"]
    assert not (home / "model_dict").exists()  # nothing started
