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
from dualgpt.run import make_optimizers, restore

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


def test_two_processes_stopped_and_resumed_equal_one_process_with_twice_the_batch(home, corpus):
    """grad_accum_steps=4 on 2 processes: each runs 2 micro-batches per step (gradients synchronised on the
    last only). A run stopped at step 4 and resumed to step 8 has, step by step, the losses of one process with
    twice the batch (2 micro-batches of 4) that ran straight through, and ends with its weights. Dropout is off
    so that one process can match; each rank's own dropout stream is saved here, and restored in the test
    below."""
    script, cls = "gpt", gpt.LBGPT
    common = tiny_args(home, corpus, "--eval_interval=4", "--log_interval=1", "--dropout=0.0", "--mode=train",
                       "--lr_decay_iters=8", script=script)
    ddp_ckpt, single_ckpt = home / "ddp.pt", home / "single.pt"
    ddp = common + ["--batch_size=2", "--grad_accum_steps=4", f"--ckpt={ddp_ckpt}"]
    first = torchrun(home, script, ddp + ["--max_iters=4"])
    assert first.returncode == 0, output(first)
    assert ("256 tokens per step (batch_size 2 x grad_accum_steps 2 x 2 processes x block_size 32)"
            in first.stdout)
    assert first.stdout.count("iter 4 (") == 1  # only rank 0 prints
    second = torchrun(home, script, ddp + ["--max_iters=8", "--resume"])
    assert second.returncode == 0, output(second)
    streams = torch.load(ddp_ckpt, weights_only=True)["rng_cpu"]
    assert len(streams) == 2 and not torch.equal(*streams)  # each rank's dropout stream
    single = common + ["--batch_size=4", "--grad_accum_steps=2", "--max_iters=8", f"--ckpt={single_ckpt}"]
    assert run_main(single, cls, script) == 0

    ddp_steps, single_steps = records(home / "ddp.jsonl", "loss"), records(home / "single.jsonl", "loss")
    assert [r["iter"] for r in ddp_steps] == list(range(1, 9)) == [r["iter"] for r in single_steps]
    for x, y in zip(ddp_steps, single_steps):
        assert abs(x["loss"] - y["loss"]) <= 1e-5
    a = torch.load(ddp_ckpt, weights_only=True)["model"]
    b = torch.load(single_ckpt, weights_only=True)["model"]
    assert all((a[k] - b[k]).abs().max().item() <= 1e-5 for k in a)
    # rank 0's checkpoint loads in one process and evaluates like the single-process one
    results = []
    for ckpt in (ddp_ckpt, single_ckpt):
        cfg = script_config(common + [f"--ckpt={ckpt}", "--mode=eval"], script)
        results.append(evaluate_checkpoint(cls, cfg)["val"]["loss"])
    assert results[0] == pytest.approx(results[1], abs=1e-4)


def test_a_timed_run_with_a_head_switched_off_keeps_the_ranks_in_step(home, corpus):
    """With a time budget every rank runs on one clock, so all evaluate at the same steps (each rank's own
    clock drifts while rank 0 saves, and ranks evaluating at different steps call different collectives);
    and a masked head's parameters get no gradient, which DDP is told to expect."""
    ckpt = home / "timed.pt"
    args = tiny_args(home, corpus, "--max_minutes=0.03", "--max_iters=0", "--eval_points=12", "--mode=train",
                     "--head_mask=0.1", f"--ckpt={ckpt}")
    result = torchrun(home, "gpt", args)
    assert result.returncode == 0, output(result)
    evals = records(home / "timed.jsonl", "val_loss")
    assert len(evals) >= 6 and evals[-1]["train_s"] >= 1.8


def test_each_rank_resumes_its_own_dropout_stream_and_another_world_size_reseeds(home, corpus):
    """A checkpoint restored with rank 1's view of 2 processes sets rank 1's stream, not rank 0's; one written
    by another number of processes seeds each rank anew."""
    args = tiny_args(home, corpus, "--max_iters=2", "--eval_interval=2", "--dropout=0.1", "--mode=train")
    assert run_main(args) == 0
    ckpt = torch.load(home / "model_dict" / "gpt.pt", weights_only=True)
    streams = [torch.Generator().manual_seed(seed).get_state() for seed in (11, 22)]
    model = gpt.LBGPT(gpt.ModelConfig(**ckpt["model_config"]))
    optimizers = make_optimizers(model, "adamw", 1e-3, 0.0, 0.1, (0.9, 0.99), "cpu")
    scaler = torch.amp.GradScaler(enabled=False)
    restore(dict(ckpt, rng_cpu=streams), model, optimizers, scaler, torch.Generator(), 1, 2, 1337, "cpu")
    assert torch.equal(torch.get_rng_state(), streams[1])  # rank 1's stream, not rank 0's
    state = restore(dict(ckpt, rng_cpu=streams[:1]), model, optimizers, scaler, torch.Generator(), 1, 2, 1337,
                    "cpu")
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(1337 + 1 + ckpt["iter_num"]).get_state())
    assert state.iter_num == 2


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
