"""rlhf.py end to end on a small corpus, a tuned policy used as an ordinary checkpoint, and bad input."""
import json
import subprocess
import sys

import matplotlib.image
import pytest
import torch
from conftest import copy_code, run_main

import gpt_
import rlhf
import rlhf_heads


def test_every_stage_runs_and_writes_its_files(rlhf_run):
    home, result = rlhf_run.home, rlhf_run.result
    assert list(result["seconds"]) == list(rlhf.STAGES)
    for path in ["data/rlhf_sentiment_pairs.pt", "model_dict/rlhf_sentiment_rm.pt", "model_dict/rlhf_sentiment_dpo.pt",
                 "model_dict/rlhf_sentiment_rloo.pt", "model_dict/rlhf_sentiment_ppo.pt",
                 "generate_text/rlhf_sentiment_bon.json", "generate_text/rlhf_sentiment_report.json",
                 "generate_text/rlhf_sentiment_report.md", "generate_text/rlhf_sentiment_samples.txt"]:
        assert (home / path).exists(), path
    for png in ["rlhf_sentiment_oracle_vs_kl.png", "rlhf_sentiment_rm_vs_oracle.png"]:
        assert matplotlib.image.imread(home / "generate_text" / png).shape[0] > 100
    kept = sorted(p.name for p in (home / "model_dict" / "rlhf_sentiment_rloo_steps").iterdir())
    assert kept == ["step00050.pt", "step00100.pt"]


def test_labels_agree_with_the_oracle_as_asked(rlhf_run):
    report = rlhf_run.result["results"]["pairs"]
    assert 0.6 < report["train"]["label_agreement"] < 0.9  # 0.75 asked, on a few hundred pairs


def test_the_reward_model_does_better_than_chance_and_no_better_than_the_noise_allows(rlhf_run):
    """A tiny model trained for seconds: 53-66% on the oracle's preferences across seeds (the closed-form
    bandit test in test_preference.py checks that the loss recovers the reward exactly)."""
    report = rlhf_run.result["results"]["rm"]
    assert report["accuracy_on_oracle"] > 0.5
    assert report["accuracy_on_labels"] <= report["label_ceiling"] + 0.1  # 128 held-out pairs: within sampling error


def test_rloo_raises_the_held_out_judges_score(rlhf_run):
    rows = {r["method"]: r for r in rlhf_run.result["results"]["eval"]["rows"]}
    assert rows["rloo"]["judge_gain"] > 0
    assert rows["rloo"]["kl"] > 0
    assert rows["base"]["kl"] == pytest.approx(0.0, abs=1e-6)  # two forward passes of equal weights: equal up to rounding
    assert [r["method"] for r in rows.values()] == ["base", "best-of-1", "best-of-2", "best-of-4", "dpo", "rloo", "ppo"]


def test_ppo_logs_its_clipping(rlhf_run):
    log = rlhf_run.result["results"]["ppo"]["log"]
    assert {"clip_fraction", "approx_kl", "mean_ratio", "kl_exact", "kl_k1", "kl_k3"} <= set(log[0])


def test_a_tuned_policy_is_an_ordinary_checkpoint(rlhf_run, capsys):
    home = rlhf_run.home
    ckpt = home / "model_dict" / "rlhf_sentiment_rloo.pt"
    data = f"--data={home / 'corpus.txt'}"
    for script, cls in (("gpt", None), ("gpt_", gpt_.SMGPT)):
        common = [f"--ckpt={ckpt}", data, "--device=cpu", "--dtype=float32", f"--sample_file={home / 'tuned.txt'}"]
        assert run_main(common + ["--mode=sample", "--max_new_tokens=10"], cls, script) == 0
        assert run_main(common + ["--mode=eval"], cls, script) == 0
    assert run_main([f"--ckpt={ckpt}", data, "--device=cpu", "--mode=heads", "--eval_iters=2"]) == 0
    assert (home / "generate_text" / "rlhf_sentiment_rloo.heads.png").exists()
    assert run_main([f"--ckpt={ckpt}", data, "--device=cpu", "--mode=train", "--resume", "--max_iters=5"]) == 2
    assert "holds weights only" in capsys.readouterr().err


def test_the_base_checkpoint_is_never_written(rlhf_run):
    """Every stage ran (DPO, RLOO and PPO each wrote checkpoints), and the base's bytes are as before."""
    assert rlhf_run.base_hash_after == rlhf_run.base_hash_before


BAD_INPUT = [
    (["--rlhf_base=model_dict/none.pt"], "no checkpoint at"),
    (["--oracle=happiness"], "unknown oracle 'happiness'"),
    (["--oracle=no_such_module:score"], "cannot load it"),
    (["--rlhf_stage=sft"], "rlhf_stage must be all, pairs, rm, bon, dpo, rloo, ppo or eval, got 'sft'"),
    (["--rlhf_stage=heads"], "rlhf_stage must be"),
    (["--mode=heads"], "--mode is read by gpt.py and gpt_.py, not by rlhf.py; rlhf.py runs its stages in order "
                       "(--rlhf_stage=NAME runs one); the head study is python rlhf_heads.py"),
    (["--max_minutes=0"], "--max_minutes is read by gpt.py and gpt_.py, not by rlhf.py"),
    (["--head_prompts=4"], "--head_prompts is read by rlhf_heads.py, not by rlhf.py"),
    (["--prompt_tokens=20", "--completion_tokens=20"], "does not fit the model's block_size 32"),
    (["--rl_group=1"], "rl_group must be at least 2"),
]


def outputs(home):
    return {p: p.read_bytes() for p in (home / "model_dict").glob("rlhf_*.pt")}


@pytest.mark.parametrize("extra, message", BAD_INPUT)
def test_bad_input_is_one_line_and_overwrites_nothing(rlhf_run, extra, message, capsys):
    home, args = rlhf_run.home, rlhf_run.args
    before = outputs(home)
    with pytest.raises(SystemExit) as exit_info:
        rlhf.main(args + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    assert err.count("\n") == 1
    assert outputs(home) == before


def test_bad_input_through_the_real_command_line(rlhf_run):
    """`python rlhf.py --oracle=happiness` as a user types it, on a copy of the code beside the outputs."""
    home, args = rlhf_run.home, rlhf_run.args
    copy_code(home)
    before = outputs(home)
    result = subprocess.run([sys.executable, "rlhf.py", *args, "--oracle=happiness"], cwd=home, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: unknown oracle 'happiness': use sentiment, verse, or module:function (your own, text -> float)\n"
    assert outputs(home) == before


def test_report_json_has_the_table(rlhf_run):
    home = rlhf_run.home
    report = json.loads((home / "generate_text" / "rlhf_sentiment_report.json").read_text())
    for row in report["rows"]:
        assert {"method", "kl", "oracle", "oracle_ci", "win_rate"} <= set(row)
    assert torch.load(home / "data" / "rlhf_sentiment_pairs.pt", weights_only=True)["train"]["a"].shape[1] == 16


def test_lb_gpt_and_the_verse_oracle_run_every_stage_and_the_head_study(rlhf_run):
    """--rlhf_script=gpt (LB-GPT, no KV cache) with --oracle=verse, tiny, every stage then the head study; its
    outputs are rlhf_verse_*, beside the sentiment pipeline's."""
    home = rlhf_run.home
    shared = rlhf_run.shared_args + ["--rlhf_script=gpt", "--oracle=verse", "--eval_prompts=8", "--rl_prompts=4"]
    pipeline_only = ["--n_pairs=64", "--rm_batch=16", "--dpo_batch=16", "--bon_max_n=2", "--eval_samples=2",
                     "--rl_steps=4", "--keep_every=2", "--ppo_epochs=1", "--ppo_minibatches=2"]
    result = rlhf.main(shared + pipeline_only)
    assert list(result["seconds"]) == list(rlhf.STAGES)
    assert "judge" not in result["results"]["eval"]["rows"][0]  # verse has no held-out judge
    assert torch.load(home / "model_dict" / "rlhf_verse_rloo.pt", weights_only=True)["layout"] == "LB-GPT"
    study = rlhf_heads.main(shared + ["--head_prompts=4", "--head_pairs=8", "--head_batches=1", "--head_tuning_steps=2"])
    assert set(study["methods"]) == {"dpo", "rloo", "ppo"}
    assert (home / "generate_text" / "rlhf_verse_heads.json").exists()
