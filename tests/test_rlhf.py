"""python -m rlhf end to end on a small corpus: every stage, the report at matched KL, outputs that never mix runs, a
tuned policy used as an ordinary checkpoint, and bad input."""
import json
import shutil
import statistics

import matplotlib.image
import pytest
import torch
from conftest import run_main

import dualgpt
import gpt_
from rlhf import __main__ as rlhf
from rlhf import heads as rlhf_heads
from rlhf.study import (complete, keep_kls, load_policy, load_reward_model, reward_scores, rlhf_run_config,
                        sample_prompts, setup)
from rlhf import training
from rlhf.report import at_kl
from rlhf.training import STANDARDISE_SAMPLES


P = "rlhf_sentiment_seed1337"  # one replicate's outputs
RL = ("rloo", "ppo", "grpo")


def test_every_stage_runs_and_writes_its_files(rlhf_run):
    home, result = rlhf_run.home, rlhf_run.result
    assert list(result["results"]) == list(rlhf.STAGES) + ["report"]
    for path in [f"data/{P}_pairs.pt", f"data/{P}_bon.pt", f"model_dict/{P}_rm.pt", f"generate_text/{P}_eval.json",
                 f"generate_text/{P}_samples.txt", "generate_text/rlhf_sentiment_report.json",
                 "generate_text/rlhf_sentiment_report.md"] + [f"model_dict/{P}_{m}.pt" for m in rlhf.methods(
                     rlhf_run_config(rlhf_run.args, "python -m rlhf", "", {}))]:
        assert (home / path).exists(), path
    for png in ["rlhf_sentiment_scores_vs_kl.png", "rlhf_sentiment_rm_vs_oracle.png"]:
        assert matplotlib.image.imread(home / "generate_text" / png).shape[0] > 100
    assert matplotlib.image.imread(home / "generate_text" / "rlhf_sentiment_learning_curves.png").shape[0] > 100
    height, width, _ = matplotlib.image.imread(home / "generate_text" / "rlhf_sentiment_scores_vs_kl.png").shape
    assert width > 2 * height  # two panels: the held-out judge, and beside it the oracle score tuned for


def kept_from_log(log: list, kls: list, rl: bool) -> list:
    """The steps a run must have kept, worked out from its own log: for each KL of keep_kls, the first logged
    KL at or above it (RL: the rollout's, whose policy is the one before that step's update), then the end."""
    steps = {next((e["step"] - rl for e in log if e.get("exact_kl", -1) >= k), None) for k in kls}
    return sorted({s for s in steps if s} | {log[-1]["step"]})


def test_every_run_keeps_its_policy_where_its_own_log_crosses_the_keep_points(rlhf_run):
    """Each kept file is where the run's KL first crossed a keep point, and holds the KL that was measured (that its
    weights are the ones before the update: the next test)."""
    home, cfg = rlhf_run.home, rlhf_run_config(rlhf_run.args, "python -m rlhf", "", {})
    for method in rlhf.methods(cfg):
        log = json.loads((home / "generate_text" / f"{P}_{method}_log.json").read_text())["log"]
        folder = home / "model_dict" / f"{P}_{method}_steps"
        kept = sorted(int(p.name[4:-3]) for p in folder.iterdir())
        assert kept == kept_from_log(log, keep_kls(cfg), method in RL), method
        for step in kept[:-1]:
            rlhf_entry = torch.load(folder / f"step{step:05d}.pt", weights_only=True)["rlhf"]
            entry = log[step] if method in RL else log[step - 1]  # the rollout after `step` updates
            assert rlhf_entry["train_kl"] == pytest.approx(entry["exact_kl"])


def test_labels_agree_with_the_oracle_as_asked(rlhf_run):
    report = rlhf_run.result["results"]["pairs"][0]
    assert 0.6 < report["train"]["label_agreement"] < 0.9  # 0.75 asked, on a few hundred pairs


def test_the_reward_model_does_better_than_chance_and_no_better_than_the_noise_allows(rlhf_run):
    """A tiny model trained for seconds: 53-66% on the oracle's preferences across seeds (the closed-form
    bandit test in test_preference.py checks that the loss recovers the reward exactly)."""
    report = rlhf_run.result["results"]["rm"][0]
    assert report["accuracy_on_oracle"] > 0.5
    assert report["accuracy_on_labels"] <= report["label_ceiling"] + 0.1  # 128 held-out pairs: within sampling error


def test_rloo_raises_the_held_out_judges_score(rlhf_run):
    at_1 = rlhf_run.result["results"]["report"]["matched_kl"]["1"]
    assert list(at_1) == ["best-of-n", "dpo", "cdpo", "ipo", "preferred_ft", "rloo", "ppo", "grpo"]
    base_judge = rlhf_run.result["results"]["eval"][0]["curves"]["dpo"][0]["judge_lexicon"]  # the base, step 0
    for row in at_1.values():  # every reading's gain is over the same base samples (best-of-n always has one)
        if "gain_judge_lexicon" in row:
            assert row["gain_judge_lexicon"]["mean"] == pytest.approx(row["judge_lexicon"]["mean"] - base_judge)
    assert "gain_judge_lexicon" in at_1["best-of-n"]
    base, end = (rlhf_run.result["results"]["eval"][0]["curves"]["rloo"][i] for i in (0, -1))
    assert base["kl"] == pytest.approx(0.0, abs=1e-6)  # equal weights: equal up to rounding
    assert end["kl"] > 0 and end["judge_lexicon"] > base["judge_lexicon"]


def test_dpo_takes_one_step_per_batch_of_labelled_pairs(rlhf_run):
    results = rlhf_run.result["results"]
    labelled = results["pairs"][0]["train"]["pairs"]  # 1024 sampled, less the ties
    assert 512 < labelled < 1024 and len(results["dpo"][0]["dpo"]["log"]) == -(-labelled // 32)


def test_the_report_compares_methods_at_matched_kl(rlhf_run):
    report = rlhf_run.result["results"]["report"]
    assert list(report["matched_kl"]) == ["0.5", "1"]
    for target, rows in report["matched_kl"].items():
        assert "best-of-n" in rows
        for method, row in rows.items():
            if row["oracle"]["mean"] is not None and method != "best-of-n":
                assert {"oracle - best-of-n", "judge_lexicon - best-of-n", "judge_afinn - best-of-n"} <= set(row)
    markdown = (rlhf_run.home / "generate_text" / "rlhf_sentiment_report.md").read_text()
    assert "**At matched KL**" in markdown


# TRL's names: PPOTrainer's and RLOOTrainer's, GRPOTrainer's, and the Trainer's (the DPO family); and ours, which
# are not TRL's and are named so that they cannot be taken for them
TRL_RL = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
          "objective/scores",
          "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio", "lr"}
TRL_GRPO = {"kl", "reward_std", "frac_reward_zero_std"}
TRL_DPO = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "loss", "grad_norm", "learning_rate"}
OURS = {"step", "exact_kl", "kl_k3", "explained_variance", "grad_norm"}


def test_the_logs_carry_trls_metric_names_exactly_with_clipping_and_a_decaying_learning_rate(rlhf_run):
    results = rlhf_run.result["results"]
    ppo, rloo, grpo = (results[m][0][m]["log"] for m in ("ppo", "rloo", "grpo"))
    dpo = results["dpo"][0]["dpo"]["log"]
    rl_names = {"objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
                "objective/non_score_reward", "loss/policy_avg", "grad_norm", "lr"}
    assert rl_names | {"policy/approxkl_avg", "policy/clipfrac_avg", "loss/value_avg", "val/ratio",
                       "explained_variance", "exact_kl"} <= set(ppo[0]) <= TRL_RL | OURS
    assert rl_names <= set(rloo[0]) <= TRL_RL | OURS
    assert rl_names | TRL_GRPO | {"policy/clipfrac_avg"} <= set(grpo[0]) <= TRL_RL | TRL_GRPO | OURS
    assert TRL_DPO - {"loss"} <= set(dpo[0]) <= TRL_DPO | OURS
    for log in (ppo, rloo, grpo):  # the KL penalty, as TRL's non_score_reward: -beta x the k1 sum, in the reward
        assert [e["objective/non_score_reward"] for e in log] == pytest.approx(
            [e["objective/rlhf_reward"] - e["objective/scores"] for e in log])
        assert [e["objective/non_score_reward"] for e in log] == pytest.approx([-0.3 * e["objective/kl"] for e in log])
    measured = [e["step"] for e in dpo if "exact_kl" in e]  # each of the first 16 steps, then every 4
    assert measured == list(range(1, 17)) + list(range(20, len(dpo) + 1, 4))
    for log, lr in ((rloo, 2e-3), (ppo, 2e-3), (grpo, 2e-3), (dpo, 1e-3)):  # linear decay to 0, one step per entry
        assert [e.get("lr", e.get("learning_rate")) for e in log] == pytest.approx(
            [lr * (1 - i / len(log)) for i in range(len(log))])
    assert rloo[0]["objective/entropy"] > 0 and all(0 <= e["policy/clipfrac_avg"] <= 1 for e in ppo)
    assert results["pairs"][0]["train"]["label_agreement"] == pytest.approx(0.75, abs=0.05)  # no ties: none a coin flip


def test_a_tuned_policy_is_an_ordinary_checkpoint(rlhf_run, capsys):
    home = rlhf_run.home
    ckpt = home / "model_dict" / f"{P}_rloo.pt"
    data = f"--data={home / 'corpus.txt'}"
    for script, cls in (("gpt", None), ("gpt_", gpt_.SMGPT)):
        common = [f"--ckpt={ckpt}", data, "--device=cpu", "--dtype=float32", f"--sample_file={home / 'tuned.txt'}"]
        assert run_main(common + ["--mode=sample", "--max_new_tokens=10"], cls, script) == 0
        assert run_main(common + ["--mode=eval"], cls, script) == 0
    assert run_main([f"--ckpt={ckpt}", data, "--device=cpu", "--mode=heads", "--eval_iters=2"]) == 0
    assert (home / "generate_text" / f"{P}_rloo.heads.png").exists()
    assert run_main([f"--ckpt={ckpt}", data, "--device=cpu", "--mode=train", "--resume", "--max_iters=5"]) == 2
    assert "holds weights only" in capsys.readouterr().err


def test_the_base_checkpoint_is_never_written(rlhf_run):
    """Every stage ran (DPO, RLOO and PPO each wrote checkpoints), and the base's bytes are as before."""
    assert rlhf_run.base_hash_after == rlhf_run.base_hash_before


BAD_INPUT = [
    (["--rlhf_base=model_dict/none.pt"], "no checkpoint at"),
    (["--oracle=happiness"], "oracle must be auto, sentiment, verse, dialogue, module:function or none, "
                             "got 'happiness'"),
    (["--oracle=no_such_module:score"], "cannot load it"),
    (["--rlhf_stage=sft"], "rlhf_stage must be all, pairs, rm, bon, dpo, rloo, ppo, grpo, eval, report, tune or label, "
                           "got 'sft'"),
    (["--dpo_methods=dpo,kto"], "dpo_methods: kto unknown; choose from dpo, cdpo, ipo, preferred_ft"),
    (["--kl_targets=1,x"], "kl_targets must be positive numbers"),
    (["--primary=dpo@3"], "primary must name one to six comparisons method@KL, each a method this run trains "
                          "(dpo, cdpo, ipo, preferred_ft, rloo, ppo, grpo) at one of kl_targets (0.5,1); got 'dpo@3'"),
    (["--primary=dpo@1,cdpo@1,ipo@1,rloo@1,ppo@1,grpo@1,preferred_ft@1"], "primary must name one to six"),
    (["--rlhf_stage=tune", "--primary=dpo@two"], "primary must name one to six"),  # tune reads it too
    (["--settings_at_kl=rloo@3:rloo_lr=1e-3"], "settings_at_kl must be entries method@KL:key=number:..."),  # 3: no target
    (["--settings_at_kl=rloo@1:ppo_lr=1e-3"], "settings_at_kl must be entries"),  # not a key of RLOO's
    (["--settings_at_kl=rloo@1:rloo_lr"], "settings_at_kl must be entries"),
    (["--max_braket=1"], "unknown config key 'max_braket'; did you mean --max_bracket?"),
    (["--rl_lr_grid=1e-3,fast", "--rlhf_stage=tune"], "rl_lr_grid must be numbers like 1e-4,3e-4"),
    (["--mode=heads"], "--mode is read by gpt.py and gpt_.py, not by python -m rlhf; python -m rlhf runs its stages in order "
                       "(--rlhf_stage=NAME runs one); the head study is python -m rlhf.heads"),
    (["--max_minutes=0"], "--max_minutes is read by gpt.py and gpt_.py, not by python -m rlhf"),
    (["--head_prompts=4"], "--head_prompts is read by python -m rlhf.heads, not by python -m rlhf"),
    (["--prompt_tokens=20", "--completion_tokens=20"], "does not fit the model's block_size 32"),
    (["--rl_group=1"], "rl_group must be in [2, 2**20], got 1"),
    (["--eval_samples=1"], "eval_samples must be in [2, 2**20], got 1"),
    (["--rlhf_stage=label", "--labels=data"], "is a folder; name a file"),
]


def outputs(home):
    return {p: p.read_bytes() for p in [*(home / "model_dict").glob("rlhf_*.pt"), *(home / "generate_text").glob("rlhf_*")]}


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


def test_report_json_has_the_table(rlhf_run):
    home = rlhf_run.home
    report = json.loads((home / "generate_text" / "rlhf_sentiment_report.json").read_text())
    assert report["seeds"] == [1337]
    for rows in report["matched_kl"].values():
        assert all({"brackets", "oracle", "judge_lexicon", "judge_afinn"} <= set(row) for row in rows.values())
    assert torch.load(home / "data" / f"{P}_pairs.pt", weights_only=True)["train"]["a"].shape[1] == 16


def test_lb_gpt_and_the_verse_oracle_run_every_stage_and_the_head_study(rlhf_run):
    """--rlhf_script=gpt (LB-GPT, no KV cache) with --oracle=verse, tiny, every stage then the head study; its
    outputs are rlhf_verse_*, beside the sentiment pipeline's."""
    home = rlhf_run.home
    shared = rlhf_run.shared_args + ["--rlhf_script=gpt", "--oracle=verse", "--eval_prompts=8", "--rl_prompts=4"]
    pipeline_only = ["--n_pairs=64", "--rm_batch=16", "--dpo_batch=16", "--bon_max_n=2",
                     "--eval_samples=2", "--rl_steps=4", "--ppo_epochs=1", "--ppo_minibatches=2",
                     "--dpo_methods=dpo"]
    result = rlhf.main(shared + pipeline_only)
    assert list(result["results"]) == list(rlhf.STAGES) + ["report"]
    assert not [k for k in result["results"]["eval"][0]["curves"]["rloo"][0] if k.startswith("judge")]  # verse: none
    assert torch.load(home / "model_dict" / "rlhf_verse_seed1337_rloo.pt", weights_only=True)["layout"] == "LB-GPT"
    study = rlhf_heads.main(shared + ["--head_prompts=4", "--head_pairs=8", "--head_batches=1", "--head_tuning_steps=2"])
    assert set(study["methods"]) == {"dpo", "rloo", "ppo", "grpo"}
    assert (home / "generate_text" / "rlhf_verse_seed1337_heads.json").exists()


def copy_of(rlhf_run, tmp_path, monkeypatch):
    """The pipeline's folder copied, so a test can run stages again without touching the shared one."""
    home = tmp_path / "run"
    shutil.copytree(rlhf_run.home, home)
    monkeypatch.setattr(dualgpt, "ROOT", str(home))
    args = [a.replace(str(rlhf_run.home), str(home)) for a in rlhf_run.args]
    return home, args


def test_a_setting_at_one_kl_is_a_run_of_its_own_read_at_that_kl_alone(rlhf_run, tmp_path, monkeypatch):
    """settings_at_kl: RLOO at another learning rate for 1 nat trains as rloo@1 beside rloo, whose curve gives the
    reading at 0.5 nats; the run at 1 nat gives that reading; a run without the setting leaves none of its files."""
    home, args = copy_of(rlhf_run, tmp_path, monkeypatch)
    at_1 = ["--settings_at_kl=rloo@1:rloo_lr=6e-4"]
    trained = rlhf.main(args + at_1 + ["--rlhf_stage=rloo"])["results"]["rloo"][0]
    assert list(trained) == ["rloo", "rloo@1"] and trained["rloo@1"]["log"][0]["lr"] == pytest.approx(6e-4)
    seed = rlhf.main(args + at_1 + ["--rlhf_stage=eval", "--eval_samples=2"])["results"]["eval"][0]
    for kl, name in (("0.5", "rloo"), ("1", "rloo@1")):
        expected = at_kl(seed["curves"][name], float(kl), 1.0)
        got = seed["matched_kl"][kl]["rloo"]
        assert got["bracket"] == expected["bracket"] and got.get("too_wide") == expected.get("too_wide")
        if "per_prompt" in expected:
            assert got["per_prompt"]["oracle"] == pytest.approx(expected["per_prompt"]["oracle"])
    assert (home / "model_dict" / f"{P}_rloo@1.pt").exists()
    rlhf.main(args + ["--rlhf_stage=rloo"])
    assert not list((home / "model_dict").glob(f"{P}_rloo@*")) and not list((home / "generate_text").glob(f"{P}_rloo@*"))
    seed = rlhf.main(args + at_1 + ["--rlhf_stage=eval", "--eval_samples=2"])["results"]["eval"][0]  # none from rloo
    assert "rloo" in seed["matched_kl"]["0.5"] and "rloo" not in seed["matched_kl"]["1"]


def test_a_rerun_with_other_settings_leaves_no_point_of_the_earlier_run_in_the_curves(rlhf_run, tmp_path, monkeypatch):
    """Other KL targets (so other keep points), then the first ones again: each time the curves hold exactly the
    steps of the last run's kept files, never a kept policy of the one before (the shipped report once did)."""
    home, args = copy_of(rlhf_run, tmp_path, monkeypatch)
    small = ["--dpo_methods=dpo", "--dpo_batch=64", "--rl_steps=6", "--eval_samples=2", "--eval_prompts=16"]
    for targets in ("0.2,3", "0.5,1"):
        for stage in ("bon", "dpo", "rloo", "ppo", "grpo", "eval"):  # bon: it is read at eval_prompts
            rlhf.main(args + small + [f"--kl_targets={targets}", f"--primary=dpo@{targets.split(',')[0]}",
                                      f"--rlhf_stage={stage}"])
        curves = json.loads((home / "generate_text" / f"{P}_eval.json").read_text())["curves"]
        for method, curve in curves.items():
            folder = home / "model_dict" / f"{P}_{method}_steps"
            assert [p["step"] for p in curve] == [0] + sorted(int(p.name[4:-3]) for p in folder.iterdir())
        assert not (home / "model_dict" / f"{P}_cdpo.pt").exists()  # a loss not trained this time leaves nothing


def test_reading_a_stages_files_from_another_run_is_one_line(rlhf_run, tmp_path, monkeypatch, capsys):
    """The eval stage alone after rloo_lr changed: RLOO's policy is another run's, so it refuses, naming the stage;
    a kept checkpoint copied in from elsewhere is refused the same way."""
    home, args = copy_of(rlhf_run, tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        rlhf.main(args + ["--rlhf_stage=eval", "--rloo_lr=5e-4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {home / 'model_dict' / P}_rloo.pt was written by another run (rloo_lr=0.002 there, "
                          f"0.0005 here); run python -m rlhf --rlhf_stage=rloo with these settings")
    assert err.count("\n") == 1
    stray = home / "model_dict" / f"{P}_ppo_steps" / "step00075.pt"
    shutil.copy(home / "model_dict" / f"{P}_rloo_steps" / "step00030.pt", stray)  # RLOO's, in PPO's folder
    with pytest.raises(SystemExit):
        rlhf.main(args + ["--rlhf_stage=eval"])
    assert "step00075.pt was written by another run (by the rloo stage)" in capsys.readouterr().err


def test_files_built_on_an_earlier_run_of_a_stage_are_refused_even_with_the_same_settings(rlhf_run, tmp_path,
                                                                                          monkeypatch, capsys):
    """The pairs drawn again with the very same settings are another run: the reward model trained on the old
    ones is refused, and so is the report of an evaluation that measured the old ones."""
    home, args = copy_of(rlhf_run, tmp_path, monkeypatch)
    rlhf.main(args + ["--rlhf_stage=pairs"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        rlhf.main(args + ["--rlhf_stage=bon"])
    assert f"{P}_rm.pt was written by another run (built on an earlier pairs file)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rlhf.main(args + ["--rlhf_stage=report"])
    assert f"{P}_rm.pt was written by another run" in capsys.readouterr().err


def test_the_reward_models_scores_of_base_samples_have_mean_0_and_std_1(rlhf_run, monkeypatch):
    """One KL scale: the same base samples of dev prompts, scored again by the saved reward model."""
    monkeypatch.setattr(dualgpt, "ROOT", str(rlhf_run.home))
    s = setup(rlhf_run_config(rlhf_run.args, "python -m rlhf", "", {}))
    rm, _ = load_reward_model(s, s.expected("rm"))
    prompts = sample_prompts(s, "dev", STANDARDISE_SAMPLES, s.generator("rm.standardise"))
    completions = complete(s, load_policy(s), prompts, s.generator("rm.standardise", 1, on_device=True))
    scores = reward_scores(s, rm, prompts, completions)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-4)
    assert rm.report["raw_std"] > 0 and rlhf_run.result["results"]["rm"][0]["raw_std"] == rm.report["raw_std"]


def test_tune_picks_each_methods_setting_at_its_kls_on_the_dev_split_and_leaves_no_policy(rlhf_run, tmp_path,
                                                                                           monkeypatch, capsys):
    """--rlhf_stage=tune on a 2 x 2 grid for IPO, 2 learning rates for Preferred-FT and the RL methods: every setting
    is recorded with its readings at the KL targets on dev prompts; the frontier is the best setting at each KL; the
    pick has the best mean score at the method's primary KLs (RLOO and GRPO: 1 nat; the others: 0.5 and 1) among the
    settings reaching all of them, or, where none does, went furthest and says so."""
    home, args = copy_of(rlhf_run, tmp_path, monkeypatch)
    rlhf.main(args + ["--rlhf_stage=tune", "--dpo_methods=ipo,preferred_ft", "--dpo_lr_grid=3e-4,3e-3",
                      "--rl_lr_grid=3e-4,3e-3", "--tau_grid=0.5,2", "--rl_steps=6", "--tune_prompts=16",
                      "--dpo_batch=64"])
    out = capsys.readouterr().out
    tuning = json.loads((home / "generate_text" / f"{P}_tuning.json").read_text())
    assert tuning["dev_prompts"] == 16 and list(tuning["tried"]) == ["ipo", "preferred_ft", "rloo", "ppo", "grpo"]
    assert [r["setting"] for r in tuning["tried"]["ipo"]] == [
        {"ipo_lr": lr, "ipo_tau": tau} for lr in (3e-4, 3e-3) for tau in (0.5, 2.0)]
    assert [r["setting"] for r in tuning["tried"]["rloo"]] == [{"rloo_lr": 3e-4}, {"rloo_lr": 3e-3}]
    for method, tried in tuning["tried"].items():
        for k in ("0.5", "1"):
            reached = [r for r in tried if k in r["at_kl"]]
            if reached:
                assert tuning["frontier"][method][k]["setting"] == max(reached, key=lambda r: r["at_kl"][k])["setting"]
        kls = ["1"] if method in ("rloo", "grpo") else ["0.5", "1"]
        eligible = [r for r in tried if all(k in r["at_kl"] for k in kls)]
        if eligible:
            best = max(eligible, key=lambda r: statistics.mean(r["at_kl"][k] for k in kls))
        else:
            best = max(tried, key=lambda r: r["end_kl"])
            assert f"note: no setting of {method} reached {', '.join(kls)} nats on the dev split" in out
        assert tuning["picks"][method] == best["setting"]
    # the frontier where it is not the pick: a run of its own at that KL, as the config key reads it
    assert rlhf.settings_at_kl(tuning) == {(m, k): f["setting"] for m, front in tuning["frontier"].items()
                                           for k, f in front.items() if f["setting"] != tuning["picks"][m]}
    assert f"--settings_at_kl={tuning['settings_at_kl']}" in out
    assert not list((home / "model_dict").glob(f"{P}_tune_*"))  # the tuning runs' policies are gone


def test_an_rl_run_keeps_the_policy_that_sampled_the_rollout_not_the_one_after_its_update(rlhf_run, tmp_path,
                                                                                          monkeypatch):
    """The weights of each kept policy, as they are saved, against the weights each update starts from: the
    policy kept at step k is the one before update k + 1, whose rollout crossed the keep point."""
    home, args = copy_of(rlhf_run, tmp_path, monkeypatch)
    s = setup(rlhf_run_config(args, "python -m rlhf", "", {}))
    rm, rm_record = load_reward_model(s, s.expected("rm"))

    def weights(policy):
        return torch.cat([p.detach().flatten() for p in policy.parameters()]).clone()

    before, kept = [], {}
    update, save = training.rloo_update, training.save_policy

    def recording_update(s, learner, batch):
        before.append(weights(learner.policy))
        return update(s, learner, batch)

    def recording_save(s, policy, path, name, record, step, *rest, **extra):
        kept.setdefault(step, weights(policy))
        save(s, policy, path, name, record, step, *rest, **extra)

    monkeypatch.setattr(training, "rloo_update", recording_update)
    monkeypatch.setattr(training, "save_policy", recording_save)
    policy = load_policy(s)
    training.train_rl(s, "rloo", policy, list(policy.parameters()), rm, "rloo", 6,
                      s.new_record("rloo", rm_record["id"]))
    assert len(before) == 6 and [k for k in kept if k < 6]  # the fixture's RLOO crosses its first keep points early
    for step, saved in kept.items():
        assert torch.equal(saved, before[step] if step < 6 else weights(policy)), step


def test_tune_tries_cdpo_epsilon_on_the_dev_split_as_trls_label_smoothing():
    """cDPO's epsilon is a key of its grid (every lr x beta x epsilon), never read from the oracle's probabilities."""
    cfg = rlhf_run_config(["--device=cpu", "--dpo_lr_grid=1e-4,3e-4", "--beta_grid=0.1", "--epsilon_grid=0.05,0.2"],
                          "python -m rlhf", "", {})
    assert rlhf.grid(cfg, "cdpo") == [{"cdpo_lr": lr, "cdpo_beta": 0.1, "cdpo_epsilon": eps}
                                      for lr in (1e-4, 3e-4) for eps in (0.05, 0.2)]
    assert rlhf.grid(cfg, "dpo") == [{"dpo_lr": lr, "dpo_beta": 0.1} for lr in (1e-4, 3e-4)]  # hard labels: none
