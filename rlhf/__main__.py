"""
RLHF on the trained GPTs: preference pairs labelled by a programmatic oracle, a learned reward
model, best-of-n, DPO (and conservative DPO, IPO, Preferred-FT), RLOO, PPO and GRPO, each measured
against best-of-n on held-out prompts, at matched KL, over several seeds.

    python -m rlhf                        # the whole study on the shipped SM-GPT model, one seed
    python -m rlhf --seeds=5              # five replicates and the report over them
    python -m rlhf --quick                # a smaller, faster version of the same
    python -m rlhf --rlhf_stage=dpo       # one stage (--help lists them: rlhf_stage)
    python -m rlhf --oracle=verse         # tune towards lines of about ten syllables instead
    python -m rlhf --oracle=mymod:score   # your own oracle: a function from text to a float
    python -m rlhf --rlhf_stage=label     # label pairs yourself, one key each (data/labels.jsonl)
    python -m rlhf --pairs=data/labels.jsonl   # tune on them (or any prompt/chosen/rejected file)
    python -m rlhf --rlhf_script=gpt      # LB-GPT (one module per head) instead of SM-GPT
    python -m rlhf.heads                  # then: which attention heads did tuning change?
    python gpt_.py --mode=sample --ckpt=model_dict/rlhf_sentiment_seed1337_rloo.pt  # a checkpoint

The protocol follows Gao et al. 2022 (arXiv 2210.10760) and the DPO paper's controlled sentiment
task: a program stands in for the human labeller. Prompts are 16-token windows of the train split,
completions 32 tokens sampled from the base at temperature 1 (pairs from a file have any lengths,
padded). Labels are noisy Bradley-Terry comparisons of two completions of one prompt, with tau set
so that they agree with the oracle score about 75% of the time; a tie is left out, not labelled.
The default oracle counts positive minus negative words of a Shakespeare lexicon; one half of its
word families gives the oracle score, the other half and the AFINN lexicon (less those families)
are judges that no stage trains or selects on. Evaluation prompts come from the val split's second
half and nothing is tuned on them (the first half, "dev", is for trying settings). Every file a
stage writes records the run that wrote it, and every reader checks it. The keys are in
rlhf/config.py; outputs go to data/, model_dict/ and generate_text/, named
rlhf_<oracle>_seed<seed>_* (the report over the seeds:
rlhf_<oracle>_report.*; with --pairs=FILE: rlhf_pairs-<file name>_*).
"""
from __future__ import annotations

import itertools
import os
import sys
import time

import torch

from dualgpt import UserError, exit_codes, repo_path
from dualgpt.checkpoint import load_tensors, save_checkpoint
from dualgpt.runtime import machine_name
from dualgpt.files import OutputLock, remove_dead_temps, sha256_file, write_json
from dualgpt.runconfig import require
from rlhf.labelling import label_pairs
from rlhf.pairs import encode_pairs, read_pairs, write_pairs
from rlhf.plots import plot_learning_curves, plot_rm_against_oracle, plot_score_against_kl
from rlhf.preference import (best_of_n_expectation, best_of_n_kl, preference_probability,
                             tau_for_agreement)
from rlhf.report import (MEASURE_NAMES, at_kl, best_of_n_curve, curve_point, evaluate_policy,
                         gains, kept_curve, markdown_tables, matched_rows, measure,
                         overoptimisation, primary_comparisons, primary_results, score_names,
                         strip_per_prompt, summarise, usable, write_markdown_report,
                         write_samples)
from rlhf.study import (STAGE_FILES, Setup, check_record, chosen_rejected, clear_outputs, complete,
                        eval_prompts, frozen, in_repo, kl_targets, load_output, load_pairs,
                        load_policy, load_policy_checkpoint, load_reward_model, numbers,
                        output_folders, read_json, record_in, reward_scores, rlhf_run_config,
                        sample_prompts, save_model, scores, setup, texts)
from rlhf.training import (DPO_METHODS, pair_inputs, train_dpo, train_reward_model,
                           train_rl)

# "all" runs these for each seed, then "report"
STAGES = ("pairs", "rm", "bon", "dpo", "rloo", "ppo", "grpo", "eval")
# what a user may have meant by a key that belongs to gpt.py or gpt_.py, or that was renamed
SIZED = "the pipeline's stages are sized by --rl_steps, --dpo_epochs and --rm_epochs"
HINTS = {"mode": "python -m rlhf runs its stages in order (--rlhf_stage=NAME runs one); the head "
         "study is python -m rlhf.heads",
         "max_iters": SIZED, "max_minutes": SIZED,
         "ckpt": "python -m rlhf starts from --rlhf_base and names its outputs after the oracle "
         "and the seed"}


def dpo_methods(cfg: dict) -> list[str]:
    """The DPO-family losses to train."""
    return [m.strip() for m in cfg["dpo_methods"].split(",") if m.strip()]


def methods(cfg: dict) -> list[str]:
    """Every tuned method of the study, in the order of the report."""
    return dpo_methods(cfg) + ["rloo", "ppo", "grpo"]


def settings_at_kl(cfg: dict) -> dict[tuple[str, str], dict] | None:
    """config's settings_at_kl as {(method, KL as the report writes it): {key: value}}; None where
    an entry is not method@number:key=number..."""
    settings = {}
    for entry in filter(None, map(str.strip, cfg["settings_at_kl"].split(","))):
        target, *pairs = entry.split(":")
        method, _, kl = target.partition("@")
        values = [pair.partition("=") for pair in pairs]
        if len(numbers(kl) or []) != 1 or not values or any(
                len(numbers(v) or []) != 1 for _, _, v in values):
            return None
        settings[method, f"{numbers(kl)[0]:g}"] = {k: numbers(v)[0] for k, _, v in values}
    return settings


def runs(cfg: dict, family: list[str]) -> list[tuple[str, str, dict]]:
    """The training runs of these methods as (name, method, the keys it sets): each method with
    rlhf/config.py's keys, then each of its settings_at_kl (named method@KL)."""
    return [(m, m, {}) for m in family] + [(f"{m}@{k}", m, setting) for (m, k), setting in
                                           settings_at_kl(cfg).items() if m in family]


def stage_of(name: str) -> str:
    """The stage that trains a run of this name (a method, or method@KL)."""
    method = name.partition("@")[0]
    return "dpo" if method in DPO_METHODS else method


def check_pipeline_keys(cfg: dict) -> None:
    """The checks of the pipeline's keys that their declarations in rlhf/config.py cannot make."""
    unknown = [m for m in dpo_methods(cfg) if m not in DPO_METHODS]
    grids = [(numbers(cfg[key]), f"{key} must be numbers like 1e-4,3e-4, got {cfg[key]!r}")
             for key in ("dpo_lr_grid", "rl_lr_grid", "beta_grid", "tau_grid", "epsilon_grid")]
    primary = primary_comparisons(cfg)
    written = [c for c in cfg["primary"].split(",") if c.strip()]
    targets = {f"{k:g}" for k in numbers(cfg["kl_targets"]) or []}
    per_kl = settings_at_kl(cfg)
    wrong = [f"{m}@{k}" for (m, k), setting in (per_kl or {}).items()
             if m not in methods(cfg) or k not in targets or not set(setting) <= {
                 key for values in grid(cfg, m) for key in values}]
    # every stage reads it (tune picks at its KLs); only the report needs what it names to be run
    named = cfg["rlhf_stage"] not in ("all", "report") or all(
        m in methods(cfg) and k in targets for m, k in primary)
    require([(not unknown, f"dpo_methods: {', '.join(unknown)} unknown; choose from "
                           f"{', '.join(DPO_METHODS)}"),
             (numbers(cfg["kl_targets"]),
              f"kl_targets must be positive numbers like 1,2,4, got {cfg['kl_targets']!r}"),
             # with a pairs file the only held-out prompts are the evaluation's own
             (cfg["rlhf_stage"] != "tune" or not cfg["pairs"], "--rlhf_stage=tune picks settings "
              "on dev prompts, and a pairs file has none apart from its evaluation prompts: tune "
              "with the oracle's pairs"), *grids,
             (0 < len(written) <= 6 and len(primary) == len(written) and named,
              f"primary must name one to six comparisons method@KL, each a method this run trains "
              f"({', '.join(methods(cfg))}) at one of kl_targets ({cfg['kl_targets']}); got "
              f"{cfg['primary']!r}"),
             (per_kl is not None and not wrong,
              "settings_at_kl must be entries method@KL:key=number:..., each a method this run "
              "trains at one of kl_targets with keys the tune stage picks for it; got "
              f"{cfg['settings_at_kl']!r} (with other kl_targets or methods: "
              "--settings_at_kl= or tune again)")])


# -----------------------------------------------------------------------------------------
# The stages, in the order --rlhf_stage=all runs them for each seed


def stage_pairs(s: Setup) -> dict:
    """Sample two completions of each prompt from the base and label which is preferred, noisily
    (or, with
    --pairs, read them from a file). Also writes them as text, one JSON object per line."""
    if s.pairs_hash:
        return import_pairs(s)
    cfg, base = s.cfg, load_policy(s)
    gen = s.generator("pairs.completions", on_device=True)
    pairs = {}
    for split, part, n in (("train", "train", cfg["n_pairs"]),
                           ("val", "dev", max(16, cfg["n_pairs"] // 8))):
        prompts = sample_prompts(s, part, n, s.generator(f"pairs.{split}_prompts"))
        a, b = complete(s, base, prompts, gen), complete(s, base, prompts, gen)
        pairs[split] = {"prompts": prompts, "a": a, "b": b,
                        "oracle_a": scores(s.oracle.score, texts(s, a)),
                        "oracle_b": scores(s.oracle.score, texts(s, b))}
    report = {}
    for split, p in pairs.items():
        # equal oracle scores: the Bradley-Terry labeller's label would be a coin flip, not a
        # preference, so the pair is not labelled (its share is reported)
        decided = p["oracle_a"] != p["oracle_b"]
        report[split] = {"sampled": len(decided), "ties": 1 - decided.double().mean().item()}
        pairs[split] = {k: v[decided.to(v.device)] for k, v in p.items()}
    if not len(pairs["train"]["oracle_a"]) or not len(pairs["val"]["oracle_a"]):
        raise UserError(f"the oracle {s.oracle.name!r} gave the two completions of every "
                        "prompt the same score: there is nothing to prefer")
    tau = tau_for_agreement(pairs["train"]["oracle_a"] - pairs["train"]["oracle_b"],
                            cfg["label_agreement"])
    report["tau"], label_gen = tau, s.generator("pairs.labels")
    for split, p in pairs.items():
        p["prob_a"] = preference_probability(p["oracle_a"], p["oracle_b"], tau)
        p["a_preferred"] = torch.rand(len(p["prob_a"]), generator=label_gen,
                                      dtype=torch.float64) < p["prob_a"]
        agree = p["a_preferred"] == (p["oracle_a"] > p["oracle_b"])
        report[split].update(pairs=len(agree), label_agreement=agree.double().mean().item())
    record = s.new_record("pairs", None)
    save_checkpoint(s.path("data", "pairs.pt"), dict(pairs, run=record))
    as_text = [{"prompt": prompt, "chosen": c, "rejected": r, "split": split}
               for split, p in pairs.items()
               for prompt, c, r in zip(texts(s, p["prompts"]),
                                       *(texts(s, side) for side in chosen_rejected(p)))]
    write_pairs(s.path("data", "pairs.jsonl"), as_text, run=record["id"])
    print(f"pairs: {report['train']['pairs']} train / {report['val']['pairs']} held out "
          f"({report['train']['ties']:.0%} of the sampled pairs were ties, left out), tau "
          f"{tau:.3f}; labels agree with the oracle on {report['train']['label_agreement']:.1%} "
          f"of train pairs; as text: {s.path('data', 'pairs.jsonl')}")
    return report


def import_pairs(s: Setup) -> dict:
    """The pairs of a file (--pairs): checked line by line, in the base's tokens, the pairs of a
    random pairs_held_out share of its prompts held out (the reward model's accuracy; their prompts
    evaluate every method), so that no held-out prompt is trained on; scored by the oracle where
    there is one."""
    cfg, path = s.cfg, s.cfg["pairs"]
    rows = read_pairs(path)
    if sha256_file(path) != s.pairs_hash:
        raise UserError(f"{path} changed while this run read it; run again when it is written")
    encoded = encode_pairs(rows, s.data.tok, s.base["model_config"]["block_size"], path)
    # each prompt once, in the order of the file
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    held_prompts = {prompts[i] for i in torch.randperm(len(prompts),
                                                       generator=s.generator("pairs.held_out"))[
        :max(1, round(cfg["pairs_held_out"] * len(prompts)))].tolist()}
    held = torch.tensor([r["prompt"] in held_prompts for r in rows])
    n, held_out = len(rows), int(held.sum())
    smallest = max(cfg["rm_batch"], cfg["dpo_batch"])
    if n - held_out < smallest:
        raise UserError(f"{path} has {n} pairs, {n - held_out} to train on after holding "
                        f"{held_out} out: fewer than "
                        f"one batch ({smallest}, the larger of rm_batch and dpo_batch); label "
                        f"more, or lower --rm_batch and --dpo_batch")
    pairs, report = {}, {"file": path, "prompts": len(prompts),
                         "prompts_cut": encoded["prompts_cut"]}
    for split, idx in (("train", (~held).nonzero().squeeze(1)),
                       ("val", held.nonzero().squeeze(1))):
        pairs[split] = {"prompts": encoded["prompts"][idx], "a": encoded["chosen"][idx],
                        "b": encoded["rejected"][idx],
                        "a_preferred": torch.ones(len(idx), dtype=torch.bool)}
        if s.oracle:  # the file's texts as they are
            for side, field in (("a", "chosen"), ("b", "rejected")):
                pairs[split][f"oracle_{side}"] = scores(s.oracle.score,
                                                        [rows[i][field] for i in idx.tolist()])
        report[split] = {"pairs": len(idx)}
    save_checkpoint(s.path("data", "pairs.pt"), dict(pairs, run=s.new_record("pairs", None)))
    print(f"pairs: {report['train']['pairs']} to train on / {report['val']['pairs']} held out "
          f"(the pairs of {len(held_prompts)} of its {len(prompts)} prompts), from {path}"
          + (f"; {encoded['prompts_cut']} prompts too long for the window keep their last tokens"
             if encoded["prompts_cut"] else ""))
    return report


def stage_rm(s: Setup) -> dict:
    """A reward model: the base GPT with a scalar head on the last token, trained on the labels
    (Bradley-Terry)."""
    pairs = load_pairs(s, s.expected("pairs"))
    rm, scale = train_reward_model(s, pairs)
    val = pairs["val"]
    margin = (reward_scores(s, rm, val["prompts"], val["a"])
              - reward_scores(s, rm, val["prompts"], val["b"]))
    agrees = (margin > 0) == val["a_preferred"].cpu()
    report = {"held_out_pairs": len(margin), "accuracy_on_labels": agrees.double().mean().item(),
              **scale}
    # the oracle's noisy labels: the best any model can do is pick the side the oracle favours
    if "prob_a" in val:
        report["label_ceiling"] = torch.maximum(val["prob_a"], 1 - val["prob_a"]).mean().item()
    if "oracle_a" in val:
        decided = val["oracle_a"] != val["oracle_b"]
        agrees = (margin > 0) == (val["oracle_a"] > val["oracle_b"])
        report["accuracy_on_oracle"] = agrees[decided].double().mean().item()
    save_model(s, rm.body, s.path("model_dict", "rm.pt"),
               dict(report, method="reward model", run=s.new_record("rm", pairs["run"]["id"])),
               reward_head=rm.head.state_dict())
    print(f"reward model: held-out accuracy {report['accuracy_on_labels']:.1%} on the labels"
          + (f" (ceiling {report['label_ceiling']:.1%})" if "label_ceiling" in report else "")
          + (f", {report['accuracy_on_oracle']:.1%} on the oracle's own "
             "preferences" if "accuracy_on_oracle" in report
             else f" ({len(margin)} held-out pairs)")
          + f"; scores standardised on base samples (raw mean {scale['raw_mean']:+.3f}, std "
            f"{scale['raw_std']:.3f})")
    return report


def stage_bon(s: Setup) -> dict:
    """Best-of-n by the reward model: bon_max_n samples from the base for each evaluation prompt,
    scored by the oracle, the judges and the reward model (the eval stage reads best-of-n at every
    n from them)."""
    cfg, base, (rm, rm_record) = s.cfg, load_policy(s), load_reward_model(s, s.expected("rm"))
    prompts = eval_prompts(s)
    n_max = cfg["bon_max_n"]
    repeated = prompts.repeat_interleave(n_max, dim=0)
    completions = complete(s, base, repeated, s.generator("bon.sampling", on_device=True))
    completion_texts = texts(s, completions)
    pool = {"rm": reward_scores(s, rm, repeated, completions).view(-1, n_max)}
    if s.oracle:
        pool["oracle"] = scores(s.oracle.score, completion_texts).view(-1, n_max)
        pool.update({f"judge_{name}": scores(judge, completion_texts).view(-1, n_max)
                     for name, judge in s.oracle.judges.items()})
    # best of the first 16 samples of each prompt, for the samples file
    first = completions.view(len(prompts), n_max, -1)
    chosen = pool["rm"][:, :min(16, n_max)].argmax(dim=1)
    save_checkpoint(s.path("data", "bon.pt"),
                    {"pool": pool, "run": s.new_record("bon", rm_record["id"]),
                     "best_of_16": texts(s, first[torch.arange(len(prompts)), chosen])})
    key = measure(s)
    print(f"best-of-{n_max} by the reward model on {len(prompts)} prompts: KL "
          f"{best_of_n_kl(n_max):.2f}, {MEASURE_NAMES[key]} "
          f"{best_of_n_expectation(pool['rm'], pool[key], n_max).mean().item():+.3f} (base "
          f"{pool[key].mean().item():+.3f})")
    return {"prompts": len(prompts), "samples_per_prompt": n_max}


def stage_dpo(s: Setup) -> dict:
    """Each loss of dpo_methods from the base on all the train pairs (the reward model's), against
    the frozen base as reference, with the same minibatches in the same order; and each of their
    runs at one KL (settings_at_kl)."""
    pairs = load_pairs(s, s.expected("pairs"))
    inputs = pair_inputs(s, pairs["train"])
    for method in DPO_METHODS:
        # also the losses not trained this time: no earlier run's policy stays behind
        clear_outputs(s, method, at_kl=True)
    results = {}
    for name, method, setting in runs(s.cfg, dpo_methods(s.cfg)):
        run = s.with_keys(**setting)
        record = run.new_record("dpo", pairs["run"]["id"])
        results[name] = {"log": train_dpo(run, method, inputs, record, name)}
    return results


def stage_rl(s: Setup, method: str) -> dict:
    """RLOO, PPO or GRPO on the reward model's score with a KL penalty to the frozen base
    (training.train_rl), and its runs at one KL (settings_at_kl)."""
    rm, rm_record = load_reward_model(s, s.expected("rm"))
    clear_outputs(s, method, at_kl=True)
    results = {}
    for name, _, setting in runs(s.cfg, [method]):
        run = s.with_keys(**setting)
        policy = load_policy(run)
        record = run.new_record(method, rm_record["id"])
        results[name] = {"log": train_rl(run, method, policy, list(policy.parameters()), rm, name,
                                         s.cfg["rl_steps"], record)}
    return results


def stage_eval(s: Setup) -> dict:
    """Every method's curve (the base, then each kept checkpoint) on the same evaluation prompts,
    best-of-n at every n, and each method's scores at each KL of kl_targets with their gains over
    the base (paired by prompt): one seed's results, which the report stage combines over the
    seeds. The samples file shows each method's last kept policy."""
    cfg = s.cfg
    (rm, rm_record), base = load_reward_model(s, s.expected("rm")), load_policy(s)
    reference, prompts, samples = frozen(base), eval_prompts(s), cfg["eval_samples"]
    key = measure(s)
    # first: a missing or unreadable pool is known before minutes of sampling
    bon = load_output(s, "bon", s.expected("bon"))
    inputs = {"pairs": s.found_record("pairs")["id"], "rm": rm_record["id"],
              "bon": bon["run"]["id"]}
    base_result = evaluate_policy(s, base, reference, rm, prompts, samples)
    result = {"seed": s.seed, "prompts": len(prompts), "curves": {}, "logs": {},
              "samples": {"base": base_result["completions"][::samples]}}
    for name, method, setting in runs(cfg, methods(cfg)):
        run, path = s.with_keys(**setting), s.path("model_dict", f"{name}.pt")
        if not os.path.exists(path):
            print(f"note: no {name} policy ({path}); python -m rlhf "
                  f"--rlhf_stage={stage_of(method)} adds it")
            continue
        ckpt = load_policy_checkpoint(path, run.expected(stage_of(method)))
        inputs[name] = ckpt["rlhf"]["run"]["id"]
        curve = kept_curve(run, name, ckpt["rlhf"], reference, rm, prompts, samples, base_result)
        result["curves"][name], result["samples"][name] = curve, curve[-1].pop("completions")
        result["logs"][name] = run_log(s, name, ckpt["rlhf"]["run"])
    base_point = curve_point(s, 0, base_result)
    # each score's spread over the base's samples: the over-optimisation plot's unit
    result["base_spread"] = {k: base_result[k].std().item() for k in ("rm", "oracle")
                             if k in base_result}
    result["bon_curve"] = best_of_n_curve(bon["pool"])
    scored = [name for name in score_names(s) if name != "rm"] or ["rm"]
    result["matched_kl"] = {}
    curves, own = result["curves"], settings_at_kl(cfg)
    for k in kl_targets(cfg):
        # each method read from its run at this KL where it has one (settings_at_kl)
        runs_at = {m: f"{m}@{k:g}" if (m, f"{k:g}") in own else m for m in methods(cfg)}
        readings = {m: at_kl(curve, k, cfg["max_bracket"]) for m, curve in [
            ("best-of-n", result["bon_curve"]),
            *((m, curves[name]) for m, name in runs_at.items() if name in curves)]}
        for reading in filter(usable, readings.values()):
            reading["per_prompt"].update(gains(reading, base_point, scored))
        result["matched_kl"][f"{k:g}"] = readings
    result["run"] = dict(s.new_record("eval", None), inputs=inputs)
    write_json(s.path("generate_text", "eval.json"), result)
    write_samples(s, prompts, result["samples"], bon["best_of_16"])
    print(f"eval (seed {s.seed}), {key} at " + "; ".join(
        f"{k} nats: " + ", ".join(f"{m} {sum(r['per_prompt'][key]) / len(prompts):+.3f}"
                                  for m, r in at.items() if usable(r))
        for k, at in result["matched_kl"].items()))
    return result


def grid(cfg: dict, method: str) -> list[dict]:
    """The settings --rlhf_stage=tune tries for a method: each learning rate of its grid, with each
    beta of beta_grid (IPO: tau of tau_grid; cDPO: also epsilon of epsilon_grid; Preferred-FT and
    the RL methods have none)."""
    lrs = "dpo_lr_grid" if method in DPO_METHODS else "rl_lr_grid"
    strengths = {"dpo": [("dpo_beta", "beta_grid")], "ipo": [("ipo_tau", "tau_grid")],
                 "cdpo": [("cdpo_beta", "beta_grid"), ("cdpo_epsilon", "epsilon_grid")]}
    values = {name: numbers(cfg[g]) for name, g in [(f"{method}_lr", lrs),
                                                     *strengths.get(method, [])]}
    return [dict(zip(values, setting)) for setting in itertools.product(*values.values())]


def pick(method: str, tried: list[dict], cfg: dict) -> tuple[dict, dict]:
    """The frontier (at each KL, the setting with the best dev score there) and the pick: the best
    mean score at the method's primary KLs (else every target) among the settings reaching all of
    them; where none does, the one that went furthest, said in a note."""
    frontier = {}
    for k in (f"{k:g}" for k in kl_targets(cfg)):
        reached = [r for r in tried if k in r["at_kl"]]
        if reached:
            best = max(reached, key=lambda r: r["at_kl"][k])
            frontier[k] = {"setting": best["setting"], "score": best["at_kl"][k]}
    kls = [k for m, k in primary_comparisons(cfg) if m == method] or [
        f"{k:g}" for k in kl_targets(cfg)]
    eligible = [r for r in tried if all(k in r["at_kl"] for k in kls)]
    if not eligible:
        print(f"note: no setting of {method} reached {', '.join(kls)} nats on the dev split; "
              "picked the one that went furthest: widen its grid or give it more steps")
        return frontier, max(tried, key=lambda r: r["end_kl"])["setting"]
    return frontier, max(eligible, key=lambda r: sum(r["at_kl"][k] for k in kls))["setting"]


def stage_tune(s: Setup) -> dict:
    """Each method's settings picked on the dev split: every setting of grid() trains from the
    base on this seed's pairs (RL: its reward model), its kept policies are measured on
    tune_prompts dev prompts and read at each KL of kl_targets; pick() gives the frontier and the
    pick. Writes every reading, the frontier and the picks; rlhf/config.py's defaults are set from
    them (settings_at_kl: the frontier where it is not the pick), and the test numbers are run
    once with those."""
    dev = s.with_keys(eval_split="dev", eval_prompts=s.cfg["tune_prompts"])
    cfg = dev.cfg
    pairs = load_pairs(dev, dev.expected("pairs"))
    rm, rm_record = load_reward_model(dev, dev.expected("rm"))
    base, prompts, key = load_policy(dev), eval_prompts(dev), measure(dev)
    reference, samples = frozen(base), cfg["eval_samples"]
    base_result = evaluate_policy(dev, base, reference, rm, prompts, samples)
    inputs = pair_inputs(dev, pairs["train"]) if dpo_methods(cfg) else None
    tried, picks, frontier = {}, {}, {}
    for method in methods(cfg):
        tried[method] = []
        for setting in grid(cfg, method):
            run, name = dev.with_keys(**setting), f"tune_{method}"
            upstream = pairs["run"]["id"] if method in DPO_METHODS else rm_record["id"]
            record = run.new_record(stage_of(method), upstream)
            if method in DPO_METHODS:
                log = train_dpo(run, method, inputs, record, name)
            else:
                policy = load_policy(run)
                log = train_rl(run, method, policy, list(policy.parameters()), rm, name,
                               cfg["rl_steps"], record)
            curve = kept_curve(run, name, {"run": record, "step": log[-1]["step"]}, reference,
                               rm, prompts, samples, base_result)
            readings = {f"{k:g}": at_kl(curve, k, cfg["max_bracket"]) for k in kl_targets(cfg)}
            scores = {k: sum(r["per_prompt"][key]) / len(prompts) for k, r in readings.items()
                      if usable(r)}
            tried[method].append({"setting": setting, "end_kl": curve[-1]["kl"],
                                  "at_kl": scores})
            clear_outputs(run, name)
        frontier[method], picks[method] = pick(method, tried[method], cfg)
    # where the frontier is another setting than the pick: a run of its own for that KL
    per_kl = ",".join(f"{m}@{k}:" + ":".join(f"{key}={v:g}" for key, v in f["setting"].items())
                     for m, front in frontier.items() for k, f in front.items()
                     if f["setting"] != picks[m])
    result = {"seed": s.seed, "measure": key, "dev_prompts": len(prompts),
              "kl_targets": cfg["kl_targets"], "tried": tried, "frontier": frontier,
              "picks": picks, "settings_at_kl": per_kl,
              "machine": f"{machine_name(cfg['device'])}, {cfg['dtype']}",
              "run": dict(s.new_record("eval", None),
                          inputs={"pairs": pairs["run"]["id"], "rm": rm_record["id"]})}
    write_json(s.path("generate_text", "tuning.json"), result)
    print("picked on the dev split: " + " ".join(f"--{k}={v:g}" for setting in picks.values()
                                                 for k, v in setting.items())
          + f" --settings_at_kl={per_kl}")
    return result


def run_log(s: Setup, name: str, record: dict) -> list[dict]:
    """What the learning-curve plot draws of a tuning run's log, refused unless that run wrote it:
    at each step where its KL was measured, the step, its objective (RL: the KL-penalised reward;
    the DPO family: the loss) and the KL."""
    path = s.path("generate_text", f"{name}_log.json")
    content = read_json(path, f"run python -m rlhf --rlhf_stage={stage_of(name)} again") or {}
    check_record(content.get("run"), record, path)
    kept = ("step", "loss", "objective/rlhf_reward", "exact_kl")
    return [{k: e[k] for k in kept if k in e} for e in content["log"] if "exact_kl" in e]


def record_seconds(s: Setup, stage: str, seconds: float) -> None:
    """Keep how long a stage took when it last ran for this seed (the report adds them up: the
    study's time)."""
    path = s.path("generate_text", "seconds.json")
    write_json(path, dict(read_json(path, "it is rewritten by the next stage that runs") or {},
                          **{stage: seconds}))


RM_MEASURES = ("accuracy_on_oracle", "accuracy_on_labels", "label_ceiling", "raw_std")

def stage_report(s: Setup) -> dict:
    """The study over the seeds: every method's scores at matched KL, with 95% intervals over the
    seeds (over prompts where there is one), the differences to best-of-n (the primary ones
    tested), the reward models' held-out accuracy, the time each stage took, the plots."""
    cfg = s.cfg
    replicates = [s.for_seed(cfg["seed"] + k) for k in range(cfg["seeds"])]
    per_seed = [seed_result(r) for r in replicates]
    seconds = {}
    for r in replicates:  # each stage's time when it last ran, summed over the seeds
        for stage, value in (read_json(r.path("generate_text", "seconds.json"),
                                       "run the stages again") or {}).items():
            if stage in STAGES:  # the study's own stages (tune picks its settings beforehand)
                seconds[stage] = seconds.get(stage, 0.0) + value
    reward_models = [load_tensors(r.path("model_dict", "rm.pt"), "run python -m rlhf "
                                  "--rlhf_stage=rm again")["rlhf"]
                     for r in replicates]  # seed_result checked that these are the ones measured
    judges, key = [name[len("judge_"):] for name in score_names(s)
                   if name.startswith("judge_")], measure(s)
    report = {"oracle": s.oracle and s.oracle.name, "pairs": cfg["pairs"], "measure": key,
              "base": cfg["rlhf_base"], "script": cfg["rlhf_script"],
              "seeds": [r["seed"] for r in per_seed],
              "config": {k: cfg[k] for k in sorted(cfg) if k not in ("device",)},
              "eval_prompts": per_seed[0]["prompts"],
              "eval_split": "held-out pairs'" if cfg["pairs"] else cfg["eval_split"],
              "samples_per_prompt": cfg["eval_samples"], "bon_max_n": cfg["bon_max_n"],
              "judges": judges, "machine": f"{machine_name(cfg['device'])}, {cfg['dtype']}",
              "seconds": seconds,
              "reward_model": {k: summarise(reward_models, k) for k in RM_MEASURES
                               if k in reward_models[0]}, "matched_kl": {}}
    for target in per_seed[0]["matched_kl"]:
        at = [r["matched_kl"][target] for r in per_seed]
        report["matched_kl"][target] = matched_rows(at, [*(f"judge_{j}" for j in judges), key])
    report["primary"] = primary_results(report)
    report["curves"] = {r["seed"]: r["curves"] for r in per_seed}
    report["bon_curves"] = {r["seed"]: r["bon_curve"] for r in per_seed}
    report["overoptimisation"] = overoptimisation(report["bon_curves"],
                                                  [key, *(f"judge_{j}" for j in judges), "rm"])
    report["logs"] = {r["seed"]: r["logs"] for r in per_seed}
    report["base_spread"] = {r["seed"]: r["base_spread"] for r in per_seed}
    write_json(repo_path("generate_text", f"{s.family}_report.json"), strip_per_prompt(report))
    write_markdown_report(repo_path("generate_text", f"{s.family}_report.md"), report)
    plot_score_against_kl(report, repo_path("generate_text", f"{s.family}_scores_vs_kl.png"))
    plot_learning_curves(report, repo_path("generate_text", f"{s.family}_learning_curves.png"))
    if s.oracle:
        plot_rm_against_oracle(report, repo_path("generate_text", f"{s.family}_rm_vs_oracle.png"))
    print(markdown_tables(report))
    return report


def seed_result(s: Setup) -> dict:
    """One seed's eval stage results, refused unless they were measured with these settings on the
    files that are on disk now (the pairs, reward model, pool and every policy it measured)."""
    path = s.path("generate_text", "eval.json")
    result = read_json(path, f"run python -m rlhf --rlhf_stage=eval --seed={s.seed} again")
    if result is None:
        raise UserError(f"no evaluation of seed {s.seed} ({path}); run python -m rlhf "
                        f"--rlhf_stage=eval --seed={s.seed} first")
    record = result.get("run") if isinstance(result, dict) else None
    check_record({k: v for k, v in (record or {}).items() if k not in ("id", "inputs")},
                 s.expected("eval", None), path)
    now = {"pairs": s.found_record("pairs")["id"], "rm": s.found_record("rm")["id"]}
    for name in record["inputs"]:
        if name not in now:
            policy = s.path(*STAGE_FILES[name]) if name in STAGE_FILES else s.path("model_dict",
                                                                                   f"{name}.pt")
            now[name] = (record_in(load_tensors(policy, "run python -m rlhf "
                                                f"--rlhf_stage={stage_of(name)} again"))
                         or {}).get("id") if os.path.exists(policy) else None
    stale = [name for name, found in record["inputs"].items() if now.get(name) != found]
    if stale:
        raise UserError(f"{path} measured files that have since been written anew "
                        f"({', '.join(stale)}); run python -m "
                        f"rlhf --rlhf_stage=eval --seed={s.seed} again")
    return result


RUN = {"tune": stage_tune, "pairs": stage_pairs, "rm": stage_rm, "bon": stage_bon,
       "dpo": stage_dpo, "rloo": lambda s: stage_rl(s, "rloo"),
       "ppo": lambda s: stage_rl(s, "ppo"), "grpo": lambda s: stage_rl(s, "grpo"),
       "eval": stage_eval}


def main(argv: list[str] | None = None) -> dict:
    sys.stdout.reconfigure(line_buffering=True)  # each stage's line at once, also in a log file
    with exit_codes():
        argv = sys.argv[1:] if argv is None else argv
        cfg = rlhf_run_config(argv, "python -m rlhf", __doc__, HINTS)
        check_pipeline_keys(cfg)
        s = setup(cfg)
        if cfg["rlhf_stage"] == "label":  # by hand, into its own file: no stage of the study runs
            with OutputLock(in_repo(cfg["labels"])):
                return {"results": {"label": label_pairs(s)}}
        results = {}
        # one run of an oracle and preset at a time
        with OutputLock(repo_path("model_dict", s.family)):
            remove_dead_temps(*output_folders(s.family))
            stages = {"all": STAGES, "report": ()}.get(cfg["rlhf_stage"], (cfg["rlhf_stage"],))
            for k in range(cfg["seeds"]):
                replicate = s.for_seed(cfg["seed"] + k)
                for stage in stages:
                    t0 = time.perf_counter()
                    results.setdefault(stage, []).append(RUN[stage](replicate))
                    seconds = time.perf_counter() - t0
                    record_seconds(replicate, stage, seconds)
                    print(f"[seed {replicate.seed}, {stage}: {seconds:.0f} s]")
            if cfg["rlhf_stage"] in ("all", "report"):
                results["report"] = stage_report(s)
        return {"results": results}


if __name__ == "__main__":
    main()
