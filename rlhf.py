"""
RLHF on the trained GPTs: preference pairs labelled by a programmatic oracle, a learned reward model,
best-of-n, DPO, RLOO and PPO, each measured against the base model on held-out prompts.

    python rlhf.py                          # the whole pipeline on the shipped SM-GPT model
    python rlhf.py --quick                  # a smaller, faster version of the same
    python rlhf.py --rlhf_stage=dpo         # one stage: pairs, rm, bon, dpo, rloo, ppo, eval
    python rlhf.py --oracle=verse           # tune towards lines of about ten syllables instead
    python rlhf.py --oracle=mymod:score     # your own oracle: a function from text to a float
    python rlhf.py --rlhf_script=gpt        # LB-GPT (one module per head) instead of SM-GPT
    python rlhf_heads.py                    # then: which attention heads did tuning change?
    python gpt_.py --mode=sample --ckpt=model_dict/rlhf_sentiment_rloo.pt   # a tuned policy is a checkpoint

The protocol follows Gao et al. 2022 (arXiv 2210.10760) and the DPO paper's controlled sentiment task: a
program stands in for the human labeller. Prompts are 16-token windows of the train split, completions 32
tokens sampled from the base at temperature 1, so nothing is ever padded. Labels are noisy Bradley-Terry
comparisons of two completions of one prompt, with tau set so that they agree with the oracle score about
75% of the time. The default oracle counts positive minus negative words of a Shakespeare lexicon; half of it
gives the oracle score, the other half is a judge that no stage trains or selects on. Val-split prompts are
for evaluation only. The keys are in config.py under the RLHF headings; outputs go to data/, model_dict/ and
generate_text/, named rlhf_<oracle>_*.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch

import config as default_config
import gpt
import gpt_
from dualgpt import UserError
from dualgpt.checkpoint import load_checkpoint, save_checkpoint
from dualgpt.cli import exit_codes
from dualgpt.evaluation import full_loss
from dualgpt.files import read_json, write_json
from dualgpt.plots import plot_oracle_against_kl, plot_rm_against_oracle
from dualgpt.preference import (RewardModel, best_of_n_expectation, best_of_n_kl, dpo_loss, preference_probability,
                                reward_model_loss, tau_for_agreement)
from dualgpt.rlhf_report import (SCORES, at_equal_kl, distinct_2, evaluate_policy, interval, kept_curve, markdown_table,
                                 repetition, table_row, win_rates, write_markdown_report, write_samples)
from dualgpt.runconfig import check_choice, load_config, require
from dualgpt.runtime import autocast
from dualgpt.tuning import (CHUNK, RLHF_SCRIPTS, Setup, chosen_rejected, clear_kept, complete, eval_prompts, frozen,
                            keep, load_pairs, load_policy, load_reward_model, minibatches, reward_scores, sample_prompts,
                            save_model, save_policy, scores, sequence_logprobs, setup, step_on, texts, train_rl)

STAGES = ("pairs", "rm", "bon", "dpo", "rloo", "ppo", "eval")  # "all" runs these, in this order
CHOICES = {"rlhf_stage": ("all",) + STAGES, "rlhf_script": RLHF_SCRIPTS,
           "oracle": ("sentiment", "verse", "module:function")}
MODEL_CLASSES = {"gpt_": gpt_.SMGPT, "gpt": gpt.LBGPT}
# what a user may have meant by a key that belongs to gpt.py or gpt_.py
HINTS = {"mode": "rlhf.py runs its stages in order (--rlhf_stage=NAME runs one); the head study is python rlhf_heads.py",
         "max_iters": "rlhf.py's stages are sized by --rl_steps, --dpo_epochs and --rm_epochs",
         "max_minutes": "rlhf.py's stages are sized by --rl_steps, --dpo_epochs and --rm_epochs",
         "ckpt": "rlhf.py starts from --rlhf_base and names its outputs after the oracle"}


def check_pipeline_keys(cfg: dict) -> None:
    """The checks of the keys only the pipeline reads (tuning.setup checks the ones it shares with the study)."""
    check_choice(cfg, "rlhf_stage", CHOICES["rlhf_stage"])
    require([(cfg["n_pairs"] >= 16, "n_pairs must be at least 16"),
             (0.5 < cfg["label_agreement"] < 1, "label_agreement must be in (0.5, 1)"),
             (cfg["bon_max_n"] >= 2 and cfg["eval_prompts"] >= 2 and cfg["eval_samples"] >= 1,
              "bon_max_n and eval_prompts must be at least 2, eval_samples at least 1"),
             (min(cfg["rm_epochs"], cfg["rm_batch"], cfg["dpo_epochs"], cfg["dpo_batch"], cfg["ppo_epochs"],
                  cfg["ppo_minibatches"], cfg["rl_steps"], cfg["keep_every"]) >= 1,
              "rm_epochs, rm_batch, dpo_epochs, dpo_batch, ppo_epochs, ppo_minibatches, rl_steps and keep_every must "
              "be at least 1"),
             (min(cfg["dpo_beta"], cfg["dpo_lr"], cfg["rm_lr"], cfg["ppo_clip"]) > 0,
              "dpo_beta, dpo_lr, rm_lr and ppo_clip must be > 0")])


# -----------------------------------------------------------------------------------------
# The stages, in the order --rlhf_stage=all runs them


def stage_pairs(s: Setup) -> dict:
    """Sample two completions of each prompt from the base and label which is preferred, noisily."""
    cfg, base = s.cfg, load_policy(s)
    gen = s.generator("pairs.completions", on_device=True)
    pairs = {}
    for split, n in (("train", cfg["n_pairs"]), ("val", max(16, cfg["n_pairs"] // 8))):
        prompts = sample_prompts(s, split, n, s.generator(f"pairs.{split}_prompts"))
        a, b = complete(s, base, prompts, gen), complete(s, base, prompts, gen)
        text_a, text_b = texts(s, a), texts(s, b)
        pairs[split] = {"prompts": prompts, "a": a, "b": b, "oracle_a": scores(s.oracle.score, text_a),
                        "oracle_b": scores(s.oracle.score, text_b)}
        if s.oracle.judge:
            pairs[split].update(judge_a=scores(s.oracle.judge, text_a), judge_b=scores(s.oracle.judge, text_b))
    differences = pairs["train"]["oracle_a"] - pairs["train"]["oracle_b"]
    if not differences.any():
        raise UserError(f"the oracle {s.oracle.name!r} gave every pair the same score: there is nothing to prefer")
    tau = tau_for_agreement(differences, cfg["label_agreement"])
    label_gen = s.generator("pairs.labels")
    report = {"tau": tau}
    for split, p in pairs.items():
        prob_a = preference_probability(p["oracle_a"], p["oracle_b"], tau)
        p["prob_a"] = prob_a
        p["a_preferred"] = torch.rand(len(prob_a), generator=label_gen, dtype=torch.float64) < prob_a
        decided = p["oracle_a"] != p["oracle_b"]
        agree = (p["a_preferred"] == (p["oracle_a"] > p["oracle_b"]))[decided].double().mean().item()
        report[split] = {"pairs": len(prob_a), "ties": 1 - decided.double().mean().item(), "label_agreement": agree}
    save_checkpoint(s.path("data", "pairs.pt"), dict(pairs, tau=torch.tensor(tau)))  # written atomically
    print(f"pairs: {report['train']['pairs']} train / {report['val']['pairs']} val, tau {tau:.3f}; labels agree with "
          f"the oracle on {report['train']['label_agreement']:.1%} of train pairs whose scores differ "
          f"({report['train']['ties']:.0%} are ties)")
    return report


def stage_rm(s: Setup) -> dict:
    """A reward model: the base GPT with a scalar head on the last token, trained on the labels (Bradley-Terry)."""
    cfg, pairs = s.cfg, load_pairs(s)
    rm = RewardModel(load_policy(s)).train()
    optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg["rm_lr"], weight_decay=0.0)
    chosen, rejected = chosen_rejected(pairs["train"])
    prompts = pairs["train"]["prompts"]
    for _, idx in minibatches(len(prompts), cfg["rm_batch"], cfg["rm_epochs"], s.generator("rm.order"), prompts.device,
                              desc="reward model"):
        with autocast(cfg["device"], cfg["dtype"]):
            r_c = rm(torch.cat([prompts[idx], chosen[idx]], dim=1)).float()
            r_r = rm(torch.cat([prompts[idx], rejected[idx]], dim=1)).float()
        step_on(optimizer, reward_model_loss(r_c, r_r))
    val = pairs["val"]
    margin = (reward_scores(s, rm, val["prompts"], val["a"]) - reward_scores(s, rm, val["prompts"], val["b"]))
    decided = val["oracle_a"] != val["oracle_b"]
    report = {
        "val_pairs": len(margin),
        "accuracy_on_labels": ((margin > 0) == val["a_preferred"].cpu()).double().mean().item(),
        # the best any model can do on noisy labels: always pick the side the oracle favours
        "label_ceiling": torch.maximum(val["prob_a"], 1 - val["prob_a"]).mean().item(),
        "accuracy_on_oracle": ((margin > 0) == (val["oracle_a"] > val["oracle_b"]))[decided].double().mean().item(),
    }
    save_model(s, rm.body, s.path("model_dict", "rm.pt"), dict(report, method="reward model"),
               reward_head=rm.head.state_dict())
    print(f"reward model: held-out accuracy {report['accuracy_on_labels']:.1%} on the noisy labels (ceiling "
          f"{report['label_ceiling']:.1%}), {report['accuracy_on_oracle']:.1%} on the oracle's own preferences")
    return report


def stage_bon(s: Setup) -> dict:
    """Best-of-n by the reward model, n = 1, 2, 4, ... bon_max_n, on the evaluation prompts."""
    cfg, base, rm = s.cfg, load_policy(s), load_reward_model(s)
    prompts = eval_prompts(s)
    n_max = cfg["bon_max_n"]
    repeated = prompts.repeat_interleave(n_max, dim=0)
    completions = complete(s, base, repeated, s.generator("bon.sampling", on_device=True))
    completion_texts = texts(s, completions)
    rm_score = reward_scores(s, rm, repeated, completions).view(-1, n_max)
    oracle = scores(s.oracle.score, completion_texts).view(-1, n_max)
    # each sample's win rate against the prompt's other samples (by the oracle score; a tie counts half)
    beats = (oracle[:, :, None] > oracle[:, None, :]).double() + 0.5 * (oracle[:, :, None] == oracle[:, None, :]).double()
    values = {"oracle": oracle, "rm": rm_score, "win": (beats.sum(2) - 0.5) / max(1, n_max - 1)}
    if s.oracle.judge:
        values["judge"] = scores(s.oracle.judge, completion_texts).view(-1, n_max)
    rows = []
    n = 1
    while n <= n_max:
        per_prompt = {k: best_of_n_expectation(rm_score, v, n) for k, v in values.items()}
        rows.append({"n": n, "kl": best_of_n_kl(n), **{k: v.mean().item() for k, v in per_prompt.items()},
                     **{f"{k}_per_prompt": v.tolist() for k, v in per_prompt.items()}})
        n *= 2
    first = completions.view(len(prompts), n_max, -1)  # best of the first 16 samples of each prompt, for the samples file
    chosen = rm_score[:, :min(16, n_max)].argmax(dim=1)
    result = {"rows": rows, "best_of_16_samples": texts(s, first[torch.arange(len(prompts)), chosen])}
    write_json(s.path("generate_text", "bon.json"), result)
    for r in rows:
        print(f"best-of-{r['n']}: KL {r['kl']:.3f}, oracle score {r['oracle']:+.3f}, reward model {r['rm']:+.3f}"
              + (f", judge {r['judge']:+.3f}" if "judge" in r else ""))
    return result


def stage_dpo(s: Setup) -> dict:
    """DPO on the preference pairs, against the frozen base as reference."""
    cfg, pairs = s.cfg, load_pairs(s)
    policy = load_policy(s)
    reference = frozen(policy)
    chosen, rejected = chosen_rejected(pairs["train"])
    prompts, n = pairs["train"]["prompts"], len(pairs["train"]["prompts"])
    with torch.no_grad():  # the reference never changes: its log-probabilities once, up front
        ref_c, ref_r = (torch.cat([sequence_logprobs(s, reference, prompts[i:i + CHUNK], side[i:i + CHUNK])
                                   for i in range(0, n, CHUNK)]) for side in (chosen, rejected))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg["dpo_lr"], weight_decay=0.0)
    steps = cfg["dpo_epochs"] * math.ceil(n / cfg["dpo_batch"])
    clear_kept(s, "dpo")
    log = []
    for step, idx in minibatches(n, cfg["dpo_batch"], cfg["dpo_epochs"], s.generator("dpo.order"), prompts.device,
                                 desc="dpo"):
        pi_c = sequence_logprobs(s, policy, prompts[idx], chosen[idx])
        pi_r = sequence_logprobs(s, policy, prompts[idx], rejected[idx])
        loss = dpo_loss(pi_c, pi_r, ref_c[idx], ref_r[idx], cfg["dpo_beta"])
        step_on(optimizer, loss)
        margin = cfg["dpo_beta"] * ((pi_c - ref_c[idx]) - (pi_r - ref_r[idx])).detach()
        log.append({"step": step, "loss": loss.item(), "reward_accuracy": (margin > 0).float().mean().item(),
                    "margin": margin.mean().item()})
        keep(s, policy, "dpo", step, steps, cfg["keep_every"])
    save_policy(s, policy, s.path("model_dict", "dpo.pt"), "dpo", steps)
    write_json(s.path("generate_text", "dpo_log.json"), log)
    print(f"dpo: {steps} steps, last loss {log[-1]['loss']:.3f} (log 2 = {math.log(2):.3f} at the start)")
    return {"steps": steps, "log": log}


def stage_rl(s: Setup, method: str) -> dict:
    """RLOO or PPO: policy gradient on the reward model's score minus rl_beta times the sequence KL to the
    frozen base, with a leave-one-out baseline over rl_group samples of each prompt."""
    policy = load_policy(s)
    return {"log": train_rl(s, method, policy, list(policy.parameters()), method, s.cfg["rl_steps"], s.cfg["keep_every"])}


def stage_eval(s: Setup) -> dict:
    """Every method on the same val-split prompts: the report, its two plots and the samples side by side."""
    cfg = s.cfg
    base, rm = load_policy(s), load_reward_model(s)
    reference = frozen(base)
    prompts = eval_prompts(s)
    samples = cfg["eval_samples"]
    policies = {"base": base}
    for method in ("dpo", "rloo", "ppo"):
        path = s.path("model_dict", f"{method}.pt")
        if os.path.exists(path):
            policies[method] = load_policy(s, load_checkpoint(path), path)
    results = {name: evaluate_policy(s, policy, reference, rm, prompts, samples, s.generator("eval.sampling", on_device=True))
               for name, policy in policies.items()}
    curves = {method: kept_curve(s, method, reference, rm, prompts, 1) for method in list(policies)[1:]}
    base_result = results["base"]
    rows = []
    for name, r in results.items():
        val_loss = full_loss(policies[name], s.data, "val", cfg["device"], cfg["dtype"])
        per_prompt = {k: r[k].mean(1) for k in SCORES if k in r}
        rows.append(table_row(name, r["kl_exact"], per_prompt, {k: base_result[k].mean(1) for k in per_prompt}, {
            "kl_k1": r["kl_k1"], "kl_k3": r["kl_k3"], "val_bpb": s.data.bpb(val_loss, "val"),
            "win_rate": interval(win_rates(r["oracle"], base_result["oracle"])),
            "distinct_2": distinct_2(r["completions"]),
            "repetition": sum(map(repetition, r["completions"])) / len(r["completions"])}))
    bon_result = read_json(s.path("generate_text", "bon.json"))
    if bon_result is None:
        print(f"note: no best-of-n results ({s.path('generate_text', 'bon.json')}); python rlhf.py --rlhf_stage=bon "
              f"adds them")
    bon = bon_result["rows"] if bon_result else []
    for row in rows[1:]:  # the trained methods, against best-of-n at the same KL
        row.update({f"bon_{key}_at_equal_kl": at_equal_kl(bon, row["kl"], key) for key in ("oracle", "judge")})
    rows[1:1] = [table_row(f"best-of-{b['n']}", b["kl"], {k: torch.tensor(b[f"{k}_per_prompt"]) for k in SCORES
                                                           if f"{k}_per_prompt" in b},
                           {k: base_result[k].mean(1) for k in SCORES if k in base_result},
                           {"win_rate": interval(torch.tensor(b["win_per_prompt"]))}) for b in bon]
    report = {"oracle": s.oracle.name, "base": s.base_path, "script": cfg["rlhf_script"], "eval_prompts": len(prompts),
              "samples_per_prompt": samples, "rows": rows, "curves": curves,
              "bon_curve": [{"n": b["n"], "kl": b["kl"], "oracle": b["oracle"], "rm": b["rm"]} for b in bon]}
    write_json(s.path("generate_text", "report.json"), report)
    write_markdown_report(s, report)
    plot_oracle_against_kl(report, s.path("generate_text", "oracle_vs_kl.png"))
    plot_rm_against_oracle(report, s.path("generate_text", "rm_vs_oracle.png"))
    write_samples(s, prompts, results, samples, bon_result["best_of_16_samples"] if bon_result else None)
    print(markdown_table(report))
    return report


RUN = {"pairs": stage_pairs, "rm": stage_rm, "bon": stage_bon, "dpo": stage_dpo,
       "rloo": lambda s: stage_rl(s, "rloo"), "ppo": lambda s: stage_rl(s, "ppo"), "eval": stage_eval}


def main(argv: list[str] | None = None) -> dict:
    sys.stdout.reconfigure(line_buffering=True)  # each stage's line at once, also in a log file
    with exit_codes():
        cfg = load_config(sys.argv[1:] if argv is None else argv, "rlhf.py", __doc__,
                          presets={"quick": default_config.RLHF_QUICK}, hints=HINTS)
        check_pipeline_keys(cfg)
        s = setup(cfg, MODEL_CLASSES)
        stages = STAGES if cfg["rlhf_stage"] == "all" else (cfg["rlhf_stage"],)
        results, timings = {}, {}
        for stage in stages:
            t0 = time.perf_counter()
            results[stage] = RUN[stage](s)
            timings[stage] = time.perf_counter() - t0
            print(f"[{stage}: {timings[stage]:.0f} s]")
        return {"results": results, "seconds": timings}


if __name__ == "__main__":
    main()
