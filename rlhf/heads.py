"""The RLHF head study: which attention heads does preference tuning change? Run it after the
pipeline, on the policies it tuned (DPO, RLOO, PPO), with the same oracle and --quick:

    python -m rlhf && python -m rlhf.heads
    python -m rlhf --quick && python -m rlhf.heads --quick

For each tuned policy, in LB-GPT's layout (one module per head, whichever script tuned it): how far
each head's weights moved, how its attention changed (statistics and the divergence of its maps),
which heads carry the change (switching each off; transplanting each between base and tuned), and
where along the completion the KL to the base sits. Then whether tuning one head, attention only or
the MLPs only does as well as tuning everything (RLOO, head_tuning_steps steps each). Outputs:
generate_text/rlhf_<oracle>_seed<seed>_heads_*.
"""
from __future__ import annotations

import os
import re
import sys

import torch
import torch.nn as nn

from dualgpt import UserError, exit_codes, repo_path
from dualgpt.checkpoint import load_checkpoint, load_tensors
from dualgpt.files import OutputLock, remove_dead_temps, write_json
from dualgpt.heads import head_statistics
from dualgpt.runtime import progress
from rlhf.head_comparison import (attention_divergence, head_weight_change, lb_state, part_masks,
                                  transplant)
from rlhf.plots import plot_head_grid, plot_lines, plot_score_against_kl
from rlhf.preference import RewardModel
from rlhf.report import evaluate_policy, kept_curve
from rlhf.study import (UPSTREAM, Setup, chosen_rejected, complete, eval_prompts, frozen,
                        load_pairs, load_policy, load_reward_model, output_folders, record_in,
                        reward_scores, rlhf_run_config, scores, sequence_logprobs, setup, texts)
from rlhf.training import restrict_training, sampled_kl, train_rl

# the policies python -m rlhf tunes, studied where they exist, each with the strength of its pull
# towards the base: the beta of its implicit reward, beta x log(policy / base)
BETA = {"dpo": "dpo_beta", "rloo": "rl_beta", "ppo": "rl_beta", "grpo": "grpo_beta"}
HINTS = {"mode": "the head study has no modes; --mode=heads is gpt.py's and gpt_.py's study of "
         "one checkpoint",
         "rlhf_stage": "python -m rlhf.heads is one stage of its own; run python -m rlhf first "
         "for the policies it studies"}


def pipeline_records(s: Setup) -> dict[str, dict]:
    """The records of the files the pipeline wrote for this oracle, preset and seed, checked to be
    one run: each on this base, data, script, dtype and seed, each stage built on the file of
    the stage before it that is on disk now, and the RL runs with the RL settings this study
    uses for its own runs. Tuned policies that do not exist are left out."""
    paths = {"pairs": s.path("data", "pairs.pt"), "rm": s.path("model_dict", "rm.pt"),
             **{m: s.path("model_dict", f"{m}.pt") for m in BETA}}
    records = {}
    for name, path in paths.items():
        if not os.path.exists(path):
            if name in ("pairs", "rm"):
                raise UserError(f"no {path}: run python -m "
                                f"rlhf{' --quick' if s.cfg['quick'] else ''} "
                                f"--seed={s.seed} first")
            continue
        records[name] = record_in(load_tensors(path, "run python -m rlhf "
                                               f"--seed={s.seed} again")) or {}
    identity = {"seed": s.seed, "base": s.base_hash[:16], "data": s.data.data_hash[:16],
                "script": s.cfg["rlhf_script"],
                "dtype": s.cfg["dtype"]}
    for name, record in records.items():
        mismatch = [f"{k} {record.get(k)!r}" for k, v in identity.items() if record.get(k) != v]
        if UPSTREAM[name] and record.get("upstream") != records[UPSTREAM[name]].get("id"):
            mismatch.append(f"built on another {UPSTREAM[name]} file")
        if name == "rloo":
            mismatch += [f"{k}={v!r}" for k, v in record.get("keys", {}).items()
                         if k in s.cfg and s.cfg[k] != v]
        if mismatch:
            raise UserError(f"{paths[name]} belongs to another run ({', '.join(mismatch)}); run "
                            f"python -m rlhf --seed={s.seed} again, or give the study the same "
                            "settings")
    return records


def partial_record(s: Setup, records: dict, part: str) -> dict:
    """The record of one of the study's own RLOO runs: on the pipeline's reward model, with the
    study's settings, tuning `part`."""
    return s.new_record("rloo", records["rm"]["id"],
                        keys={"head_tuning_steps": s.cfg["head_tuning_steps"], "part": part})


def policy_from_state(s: Setup, state: dict) -> nn.Module:
    """A policy of the script's class with these (LB-GPT-layout) weights."""
    return load_policy(s, dict(s.base, best_model=state, layout="LB-GPT"))


@torch.no_grad()
def implicit_margin(policy: nn.Module, pairs: dict, beta: float, s: Setup) -> float:
    """The implicit reward margin on held-out pairs, deterministic (no sampling): the mean of
    beta x [(log pi(chosen) - log pi_base(chosen)) - (log pi(rejected) - log pi_base(rejected))],
    beta the method's own (BETA): each method's optimum is the base times exp(reward / beta)."""
    pc = sequence_logprobs(s, policy, pairs["prompts"], pairs["chosen"])
    pr = sequence_logprobs(s, policy, pairs["prompts"], pairs["rejected"])
    margin = (pc - pairs["base_chosen"]) - (pr - pairs["base_rejected"])
    return (beta * margin).mean().item()


@torch.no_grad()
def sampled_scores(s: Setup, policy: nn.Module, rm: RewardModel, prompts: torch.Tensor,
                   draw: int = 0) -> tuple[float, float]:
    """Mean oracle and reward-model score of completions of the prompts, from the random numbers of
    draw `draw`."""
    completions = complete(s, policy, prompts, s.generator("heads.sampling", draw, on_device=True))
    return (scores(s.oracle.score, texts(s, completions)).mean().item(),
            reward_scores(s, rm, prompts, completions).mean().item())


def ablation_drops(s: Setup, policy: nn.Module, rm: RewardModel, prompts: torch.Tensor,
                   heads: list[tuple[int, int]],
                   draws: int = 4) -> dict[str, torch.Tensor | float]:
    """How much the oracle and reward-model scores drop when each head alone is switched off,
    against the unmasked model's mean over `draws` samplings. Sampling diverges within a few tokens
    even from the same random numbers, so each masked score is about an independent draw: "noise"
    (the spread of the unmasked scores across draws) is the standard deviation of any one drop that
    is due to sampling alone."""
    # (draws, 2)
    unmasked = torch.tensor([sampled_scores(s, policy, rm, prompts, draw)
                             for draw in range(draws)])
    shape = (policy.config.n_layer, policy.config.n_head)
    drops = {"oracle": torch.zeros(shape), "rm": torch.zeros(shape),
             "noise_oracle": unmasked[:, 0].std().item(), "noise_rm": unmasked[:, 1].std().item()}
    for layer, head in progress(heads, desc="switching heads off", leave=False):
        policy.set_head_mask({(layer, head)})
        masked_oracle, masked_rm = sampled_scores(s, policy, rm, prompts, draws)
        drops["oracle"][layer, head] = unmasked[:, 0].mean() - masked_oracle
        drops["rm"][layer, head] = unmasked[:, 1].mean() - masked_rm
    policy.set_head_mask(set())
    return drops


def held_out_pairs(s: Setup, base: nn.Module, record: dict) -> dict:
    """The first head_pairs held-out pairs, chosen and rejected, with the base's log-probabilities
    of each."""
    held_out = load_pairs(s, record)["val"]
    chosen, rejected = chosen_rejected(held_out)
    n = s.cfg["head_pairs"]
    pairs = {"prompts": held_out["prompts"][:n], "chosen": chosen[:n], "rejected": rejected[:n]}
    with torch.no_grad():
        pairs["base_chosen"] = sequence_logprobs(s, base, pairs["prompts"], pairs["chosen"])
        pairs["base_rejected"] = sequence_logprobs(s, base, pairs["prompts"], pairs["rejected"])
    return pairs


def study_method(s: Setup, method: str, base: nn.Module, base_state: dict, base_stats: dict,
                 rm: RewardModel,
                 batches: list[torch.Tensor], prompts: torch.Tensor, pairs: dict,
                 heads: list[tuple[int, int]]) -> dict:
    """One tuned policy against the base: weights, attention, ablation, margins, transplants, KL by
    position."""
    n_layer, n_head, beta = base.config.n_layer, base.config.n_head, s.cfg[BETA[method]]
    # checked by pipeline_records
    tuned_state = lb_state(load_checkpoint(s.path("model_dict", f"{method}.pt")))
    tuned = policy_from_state(s, tuned_state)
    r = {"weight_change": head_weight_change(base_state, tuned_state, n_layer, n_head),
         "stat_change": {k: v - base_stats[k] for k, v in head_statistics(tuned, batches).items()},
         "attention_divergence": attention_divergence(base, tuned, batches),
         "ablation": ablation_drops(s, tuned, rm, prompts, heads),
         "beta": beta, "margin": implicit_margin(tuned, pairs, beta, s),
         "kl_by_position": sampled_kl(s, tuned, base, prompts, s.generator(
             "heads.kl_by_position", on_device=True)).mean(0).tolist()}
    # transplants, one head at a time: which heads carry the tuned model's margin and score?
    into_base, out_of_tuned = torch.zeros(n_layer, n_head), torch.zeros(n_layer, n_head)
    oracle_into_base = torch.zeros(n_layer, n_head)
    for layer, head in progress(heads, desc=f"transplanting {method} heads", leave=False):
        grafted = policy_from_state(s, transplant(base_state, tuned_state, heads={(layer, head)}))
        into_base[layer, head] = implicit_margin(grafted, pairs, beta, s)
        oracle_into_base[layer, head] = sampled_scores(s, grafted, rm, prompts)[0]
        out_of_tuned[layer, head] = r["margin"] - implicit_margin(
            policy_from_state(s, transplant(tuned_state, base_state, heads={(layer, head)})),
            pairs, beta, s)
    r.update(margin_into_base=into_base, margin_lost_from_tuned=out_of_tuned,
             oracle_into_base=oracle_into_base)
    r["margin_by_part"] = {part: implicit_margin(policy_from_state(s, transplant(base_state,
                                                                             tuned_state, **kw)),
                                                 pairs, beta, s)
                           for part, kw in (("all heads", {"heads": set(heads)}),
                                            ("all MLPs", {"mlps": set(range(n_layer))}),
                                            ("the rest", {"rest": True}))}
    return r


def partial_tuning(s: Setup, base_state: dict, study: dict, heads: list[tuple[int, int]],
                   records: dict) -> dict:
    """RLOO for head_tuning_steps steps, tuning only the head that carries most of RLOO's margin,
    only attention, or only the MLPs; each evaluated (oracle score, exact KL) at its kept
    checkpoints, beside the full RLOO run's kept checkpoints (the same method; at step
    head_tuning_steps, the same budget)."""
    source = study["methods"].get("rloo") or next(iter(study["methods"].values()))
    best = divmod(int(source["margin_into_base"].argmax()), source["margin_into_base"].shape[1])
    runs = {f"head {best[0]}.{best[1]} only": part_masks(base_state, heads={best}),
            "attention only": part_masks(base_state, heads=set(heads)),
            "MLPs only": part_masks(base_state, mlps=True)}
    base, (rm, _) = load_policy(s), load_reward_model(s, records["rm"])
    reference, prompts = frozen(base), eval_prompts(s)[:s.cfg["head_prompts"]]
    steps = s.cfg["head_tuning_steps"]
    base_result = evaluate_policy(s, base, reference, rm, prompts, 2)
    curves = {}
    if "rloo" in records:
        final = load_tensors(s.path("model_dict", "rloo.pt"), "run python -m rlhf "
                             "--rlhf_stage=rloo again")["rlhf"]
        curves["all weights (the rloo "
               "stage's run)"] = kept_curve(s, "rloo", final, reference, rm, prompts, 2,
                                                                  base_result)
    for label, mask in runs.items():
        name = "rloo_" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
        policy, own = load_policy(s), partial_record(s, records, label)
        train_rl(s, "rloo", policy, restrict_training(policy, mask), rm, name, steps, own,
                 keep_at={max(1, steps // 2), steps})
        curves[label] = kept_curve(s, name, {"run": own, "step": steps}, reference, rm, prompts,
                                   2, base_result)
    return {"chosen_head": list(best), "steps": steps, "curves": curves}


def as_lists(value):
    """The study's tensors as nested lists, for JSON."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: as_lists(v) for k, v in value.items()}
    return value


def ablations(study: dict, methods: dict) -> list[tuple[str, dict]]:
    """Each model's ablation, the base's first."""
    return [("base", study["base_ablation"])] + [(m, r["ablation"]) for m, r in methods.items()]


def write_head_study(s: Setup, study: dict) -> None:
    """One layer x head heatmap PNG per question, a JSON table of every number, and two line
    plots."""
    methods = study["methods"]
    figures = {
        "weight_change": [(m, [(f"{p} (relative change)", r["weight_change"][p])
                               for p in ("query", "key", "value", "output")])
                          for m, r in methods.items()],
        "attention": [(m, [("attention map divergence (JS, nats)", r["attention_divergence"]),
                           ("entropy change", r["stat_change"]["entropy"]),
                           ("previous-token change", r["stat_change"]["previous_token_text"]),
                           ("first-token change", r["stat_change"]["first_token"])])
                      for m, r in methods.items()],
        "ablation": [(name, [("oracle score drop, head off", ablation["oracle"]),
                             ("reward-model drop, head off", ablation["rm"])])
                     for name, ablation in ablations(study, methods)],
        "transplant": [(m, [("margin, tuned head into base", r["margin_into_base"]),
                            ("margin lost, base head into tuned", r["margin_lost_from_tuned"]),
                            ("oracle score, tuned head into base", r["oracle_into_base"])])
                       for m, r in methods.items()],
    }
    for name, rows in figures.items():
        plot_head_grid(rows, f"{s.prefix}: {name.replace('_', ' ')} per head (rows: layers, "
                       "columns: heads)", s.path("generate_text", f"heads_{name}.png"))
    plot_lines({m: r["kl_by_position"] for m, r in methods.items()}, "completion position",
               "exact KL to the base (nats)",
               f"{s.prefix}: where along the completion the KL sits",
               s.path("generate_text", "heads_kl_by_position.png"))
    plot_score_against_kl({"oracle": s.oracle.name, "bon_curves": {}, "judges": [],
                           "measure": "oracle", "matched_kl": {},
                           "curves": {s.seed: study["partial_tuning"]["curves"]}},
                           s.path("generate_text", "heads_oracle_vs_kl.png"))
    write_json(s.path("generate_text", "heads.json"), as_lists(study))
    for name, ablation in ablations(study, methods):
        largest = ablation["oracle"].abs().max().item()
        print(f"{name}: switching one head off moves the oracle score by at most {largest:.3f}; "
              f"sampling alone moves it by {ablation['noise_oracle']:.3f} (one standard "
              "deviation)")
    for method, r in methods.items():
        top = sorted(((r["margin_into_base"][l, h].item(), f"{l}.{h}")
                      for l, h in study["heads"]), reverse=True)[:3]
        print(f"{method}: margin {r['margin']:+.3f}; "
              "by part " + ", ".join(f"{k} {v:+.3f}" for k, v in r["margin_by_part"].items())
              + "; heads carrying most of it "
              "alone: " + ", ".join(f"{name} {v:+.3f}" for v, name in top))


def head_study(s: Setup) -> dict:
    """Every tuned policy of the pipeline's run against the base, head by head, then tuning parts
    of the model."""
    records = pipeline_records(s)
    methods = [m for m in BETA if m in records]
    if not methods:
        raise UserError(f"no tuned policies named {s.prefix}_*: run python -m rlhf"
                        f"{' --quick' if s.cfg['quick'] else ''} with the same oracle and "
                        "seed first")
    # the inputs every model is measured on: val batches, val prompts, held-out pairs
    n_layer, n_head = s.base["model_config"]["n_layer"], s.base["model_config"]["n_head"]
    heads = [(layer, head) for layer in range(n_layer) for head in range(n_head)]
    base_state = lb_state(s.base)
    base, (rm, _) = policy_from_state(s, base_state), load_reward_model(s, records["rm"])
    gen = s.generator("heads.batches")
    batches = [s.data.batch("val", gen)[0] for _ in range(s.cfg["head_batches"])]
    prompts = eval_prompts(s)[:s.cfg["head_prompts"]]
    pairs = held_out_pairs(s, base, records["pairs"])
    # each tuned policy against the base, head by head
    base_stats = head_statistics(base, batches)
    study = {"oracle": s.oracle.name, "heads": heads,
             "base_ablation": ablation_drops(s, base, rm, prompts, heads),
             "methods": {m: study_method(s, m, base, base_state, base_stats, rm, batches, prompts,
                                         pairs, heads)
                         for m in methods}}
    # tuning parts of the model only, at the same budget
    study["partial_tuning"] = partial_tuning(s, base_state, study, heads, records)
    write_head_study(s, study)
    return study


def main(argv: list[str] | None = None) -> dict:
    sys.stdout.reconfigure(line_buffering=True)
    with exit_codes():
        argv = sys.argv[1:] if argv is None else argv
        cfg = rlhf_run_config(argv, "python -m rlhf.heads", __doc__, HINTS)
        s = setup(cfg, data_batch_size=cfg["head_batch_size"])
        # not while the pipeline writes what the study reads
        with OutputLock(repo_path("model_dict", s.family)):
            remove_dead_temps(*output_folders(s.family))
            return head_study(s)


if __name__ == "__main__":
    main()
