"""bench.py's scaling, quality, Muon and data sections: the fitted loop-cost model against a known one, the scaling
section on tiny shapes, the quality section's reading of nanoGPT's log and its ratio, the Muon section's pick and
paired differences against plain computations, the data section's corpora and memory readings."""
import math
import os
import statistics
import subprocess
import sys
import time
import types

import pytest
import torch
from scipy import stats

import bench
import gpt
from dualgpt import UserError
from dualgpt.runconfig import defaults


def test_the_loop_cost_fit_recovers_the_model_that_made_the_points():
    """On the benchmark's own design (the FLOPs change with the step size only), from times with 2%
    multiplicative noise: the model within a few percent, and the fit's worst error about the noise's."""
    fixed, per_head, rate = 2e-3, 40e-6, 5e10
    gen = torch.Generator().manual_seed(0)
    points = [(2 * h, flops, (fixed + per_head * 2 * h + flops / rate) * (1 + 0.02 * torch.randn(1, generator=gen).item()))
              for flops in (4.7e10, 2.9e9, 3.6e8) for h in (1, 2, 4, 8, 16, 32)]
    got = bench.fit_loop_cost(points)
    assert got[:3] == pytest.approx((fixed, per_head, rate), rel=0.1)
    assert 0.01 < got[3] < 0.06
    exact = [(h, f, fixed + per_head * h + f / rate) for h, f, _ in points]
    assert bench.fit_loop_cost(exact) == pytest.approx((fixed, per_head, rate, 0.0), rel=1e-6, abs=1e-9)
    # one step size: the FLOPs cannot be told from the fixed cost, so no rate is fitted
    one = [p for p in exact if p[1] == 4.7e10]
    assert bench.fit_loop_cost(one) == pytest.approx((fixed + 4.7e10 / rate, per_head, math.inf, 0.0), abs=1e-9)


@pytest.mark.plots
def test_the_scaling_section_times_every_variant_at_every_point_and_draws_its_plot(tmp_path, monkeypatch):
    (tmp_path / "generate_text").mkdir()
    monkeypatch.setattr(bench, "HERE", str(tmp_path))
    text = bench.bench_scaling(types.SimpleNamespace(**dict(defaults(bench.Keys), quick=True)))
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| float32") or
            line.startswith("| bfloat16")]
    table_rows = [r for r in rows if len(r) == 8]
    dtypes = {r[0].strip("| ") for r in table_rows}
    steps = {r[1] for r in table_rows}
    assert steps == {"train 2x32", "train 1x16", "sample 1x32, no cache"}
    assert len(table_rows) == len(dtypes) * len(steps) * 3  # 1, 2 and 4 heads
    for r in table_rows:  # each variant's median and its speed against LB-GPT agree
        lb, matmul, sdpa = (float(cell.split()[0]) for cell in r[3:6])
        assert float(r[6][:-1]) == pytest.approx(lb / matmul, rel=0.03)  # cells rounded to 0.01 ms
        assert float(r[7].rstrip(" |")[:-1]) == pytest.approx(lb / sdpa, rel=0.03)
    assert len([r for r in rows if len(r) == 7]) == 3 * 2 * len(dtypes)  # fits: variant, dtype, train/sample
    assert (tmp_path / "generate_text" / "bench_scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_the_muon_section_picks_the_best_grid_rate_and_pairs_the_seeds(monkeypatch):
    """With made-up scores in place of training: the grid's best rate is used for every comparison, each
    seed's AdamW run is paired with its Muon run, and the interval is Student's t over the differences."""
    def score(optimizer, lr, seed, budget):
        return 2.0 + budget / 1000 + (0.03 * seed if optimizer == "adamw" else abs(lr - 0.02) + 0.01 * seed ** 2)

    calls = []

    def fake_train_for(overrides, workdir, data):
        budget_s = round(overrides["max_minutes"] * 60, 6)
        calls.append((overrides["optimizer"], overrides["muon_lr"], overrides["seed"], budget_s))
        return {"val_bpb": score(*calls[-1]), "iters": 1}

    monkeypatch.setattr(bench, "train_for", fake_train_for)
    args = types.SimpleNamespace(**dict(defaults(bench.Keys), muon_lrs="0.01,0.02,0.04", muon_budgets="67,300"))
    text = bench.bench_muon(args)
    assert calls[:3] == [("muon", lr, 0, 67.0) for lr in (0.01, 0.02, 0.04)]  # the grid: seed 0, first budget
    assert {lr for _, lr, _, _ in calls[3:]} == {0.02}
    assert "-> 0.02" in text
    for budget in (67.0, 300.0):
        diffs = [score("muon", 0.02, s, budget) - score("adamw", 0.02, s, budget) for s in (1, 2, 3)]
        half = stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
        row = next(line for line in text.splitlines() if line.startswith(f"| {budget:g} s | Muon - AdamW"))
        assert f"**{statistics.mean(diffs):+.3f} ± {half:.3f}**" in row
        assert " / ".join(f"{d:+.3f}" for d in diffs) in row


def test_nanogpts_training_time_is_its_own_clock_without_the_iterations_that_evaluate():
    """From a log in nanoGPT's print format: the steps its saved weights had (its last iteration saves
    before it steps) and their seconds, its first and last iterations (which evaluate) at the mean of the
    others."""
    times = [900.0] + [40.0 + i % 7 for i in range(1, 2000)] + [700.0]
    log = "\n".join(["step 0: train loss 4.2, val loss 4.2"]
                    + [f"iter {i}: loss {3 - i / 1000:.4f}, time {t:.2f}ms, mfu -100.00%" for i, t in enumerate(times)])
    steps, seconds = bench.nanogpt_seconds(log)
    assert steps == 2000
    assert seconds == pytest.approx(statistics.mean(times[1:-1]) * 2000 / 1e3)
    with pytest.raises(UserError):
        bench.nanogpt_seconds("step 0: train loss 4.2, val loss 4.2")


@pytest.mark.parametrize("clone, defaults_bpb", [("", 2.1), ("/nanoGPT", 2.1), ("", 1.8)])
def test_the_quality_section_trains_the_defaults_for_nanogpts_time_and_divides_by_its_bpb(monkeypatch, clone,
                                                                                          defaults_bpb):
    """With made-up runs: nanoGPT's recipe first (its own train.py's time and score when a clone is given),
    then config.py's defaults for exactly that training time; the ratio and the target's verdict."""
    calls = []

    def fake_train_for(overrides, workdir, data):
        calls.append(overrides)
        if "max_iters" in overrides:
            return dict(val_bpb=2.8, val_loss=1.94, dtype="float32", train_s=97.0, iters=2000)
        return dict(val_bpb=defaults_bpb, val_loss=5.0, dtype="float32", train_s=overrides["max_minutes"] * 60,
                    iters=700)

    monkeypatch.setattr(bench, "train_for", fake_train_for)
    monkeypatch.setattr(bench, "run_nanogpt", lambda clone, workdir, data: dict(
        val_bpb=3.0, val_loss=2.08, dtype="float32", train_s=120.0, iters=2000))
    text = bench.bench_quality(types.SimpleNamespace(**dict(defaults(bench.Keys), nanogpt=clone)))
    seconds, bpb = (120.0, 3.0) if clone else (97.0, 2.8)
    assert calls[0] == bench.NANOGPT_BABY
    assert calls[1:] == [{"max_minutes": pytest.approx(seconds / 60), "eval_points": 1, "device": "cpu"}]
    verdict = "met" if defaults_bpb / bpb <= 0.65 else "not met"
    assert f"is {defaults_bpb / bpb:.2f}x nanoGPT's in its training time (target: at most 0.65x; {verdict})" in text
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + 2 + bool(clone)  # header, a row a run


@pytest.mark.skipif(not os.environ.get("NANOGPT_CLONE"), reason="set NANOGPT_CLONE to a nanoGPT clone")
def test_nanogpts_own_train_py_runs_four_steps_and_its_weights_are_scored(monkeypatch, tmp_path):
    """The real thing, where a clone is at hand (CI has none): its prepare.py and train.py on our text, the saved
    weights the ones whose time was read, scored near chance after 4 steps."""
    monkeypatch.setattr(bench, "NANOGPT_COMMAND", [a.replace("=2000", "=4") for a in bench.NANOGPT_COMMAND])
    r = bench.run_nanogpt(os.environ["NANOGPT_CLONE"], str(tmp_path), bench.Keys.data)
    assert r["iters"] == 4 and 0 < r["train_s"] < 60
    assert abs(r["val_loss"] - math.log(65)) < 0.5  # 65 characters, barely trained


def test_a_folder_that_is_not_a_nanogpt_clone_is_one_line_before_any_training(tmp_path, capsys):
    done = subprocess.run([sys.executable, "bench.py", "--only=quality", f"--nanogpt={tmp_path}"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --nanogpt={tmp_path} is not a nanoGPT clone (no train.py in it)"
    (tmp_path / "train.py").write_text("")  # a train.py alone is not enough (in-process now)
    with pytest.raises(SystemExit) as refused:
        bench.main(["--only=quality", f"--nanogpt={tmp_path}"])
    assert refused.value.code == 2 and capsys.readouterr().err.strip().endswith("(no model.py in it)")


def test_flops_per_token_by_hand():
    model = gpt.LBGPT(gpt.ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=8, bias=False))
    C, L, V = 8, 2, 300
    per_layer = 4 * C * C + 8 * C * C + 2 * C  # attention q,k,v,proj; MLP; two LayerNorm weights
    weights = V * C + L * per_layer + C  # tied embedding/head, blocks, final LayerNorm (wpe excluded)
    assert bench.flops_per_token(model) == 6 * weights + 12 * L * C * 16


def test_the_data_sections_text_memory_and_processes(tmp_path):
    """The data section's pieces: corpora cut from the text files on this machine, each under its size and valid
    UTF-8; a child process found among this one's children; the memory of a process tree, all of it at least the
    parent's own, a child's own counted apart."""
    paths, source = bench.text_on_this_machine([1, 2], str(tmp_path))
    sizes = [os.path.getsize(p) for p in paths]
    assert 0.9e6 < sizes[0] <= 1e6 < sizes[1] <= 2e6 and "text files" in source
    with open(paths[1], encoding="utf-8") as f:
        assert f.read().startswith(open(paths[0], encoding="utf-8").read()[:1000])  # one stream, cut at two sizes
    child = subprocess.Popen([sys.executable, "-c", "import time; x = b\"x\" * 50_000_000; time.sleep(5)"])
    try:
        time.sleep(1)
        assert child.pid in bench.children(os.getpid())
        total, own, largest_child = bench.tree_memory(os.getpid())
        assert total >= own > 0 and largest_child > 40e6  # the child's 50 MB are its own
    finally:
        child.kill()
