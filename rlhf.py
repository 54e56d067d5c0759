"""
RLHF on the trained GPTs: preference pairs labelled by a programmatic gold oracle, a learned reward model,
best-of-n, DPO, RLOO and PPO, each measured against the base model on held-out prompts.

    python rlhf.py                          # the whole pipeline on the shipped SM-GPT model
    python rlhf.py --quick                  # a smaller, faster version of the same
    python rlhf.py --rlhf_stage=dpo         # one stage: pairs, rm, bon, dpo, rloo, ppo, eval, heads
    python rlhf.py --oracle=verse           # tune towards lines of about ten syllables instead
    python rlhf.py --oracle=mymod:score     # your own oracle: a function from text to a float
    python rlhf.py --rlhf_script=gpt        # LB-GPT (looped heads) instead of SM-GPT
    python gpt_.py --mode=sample --ckpt=model_dict/rlhf_sentiment_rloo.pt   # a tuned policy is a checkpoint

The protocol follows Gao et al. 2022 (arXiv 2210.10760) and the DPO paper's controlled sentiment task: a
program stands in for the human labeller. Prompts are 16-token windows of the train split, completions 32
tokens sampled from the base at temperature 1, so nothing is ever padded. Labels are noisy Bradley-Terry
comparisons of two completions of one prompt, with tau set so that they agree with the oracle about 75% of
the time. The default oracle counts positive minus negative words of a Shakespeare lexicon; half of it
labels, the other half is a judge that no stage trains or selects on. Val-split prompts are for evaluation
only. Every key is in config.py under "RLHF"; outputs go to data/, model_dict/ and generate_text/.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn as nn

import config as default_config
import gpt
import gpt_
from dualgpt import TrainingDiverged, UserError, repo_path
from dualgpt.cli import exit_codes
from dualgpt.checkpoint import convert_state_dict, cpu_copy, load_checkpoint, model_from_checkpoint, save_checkpoint
from dualgpt.data import Dataset, resolve_data
from dualgpt.evaluation import full_loss
from dualgpt.heads import attention_divergence, head_statistics, head_weight_change, transplant
from dualgpt.oracles import WORD, Oracle, get_oracle
from dualgpt.plots import plot_gold_against_kl, plot_head_grid, plot_lines, plot_proxy_against_gold
from dualgpt.preference import (RewardModel, best_of_n_expectation, best_of_n_kl, completion_logits, dpo_loss,
                                exact_kl, kl_estimators, policy_gradient_loss, ppo_loss, preference_probability,
                                reward_model_loss, rloo_advantages, sample_completions, tau_for_agreement,
                                token_logprobs)
from dualgpt.runconfig import load_config, model_options, require
from dualgpt.runtime import autocast, progress
from minbpe.base import atomic_open

STAGES = ("pairs", "rm", "bon", "dpo", "rloo", "ppo", "eval")  # "all" runs these; "heads" runs after them
SCRIPTS = {"gpt_": gpt_.FusedGPT, "gpt": gpt.GPT}
TEMPERATURE = 1.0  # completions are sampled, and every log-probability taken, at this temperature


@dataclasses.dataclass
class Setup:
    """What every stage shares, resolved once from the run config."""
    cfg: dict
    model_class: type[nn.Module]
    base_path: str
    base: dict  # the base checkpoint
    data: Dataset  # its training text, in its own tokens
    oracle: Oracle
    prefix: str  # names this oracle's outputs: rlhf_<oracle>

    def path(self, folder: str, suffix: str) -> str:
        return repo_path(folder, f"{self.prefix}_{suffix}")


def setup(cfg: dict) -> Setup:
    """Check everything a stage will need before any work (and before anything is written)."""
    if cfg["rlhf_stage"] not in STAGES + ("all", "heads"):
        raise UserError(f"rlhf_stage must be all or one of {', '.join(STAGES)}, heads, got {cfg['rlhf_stage']!r}")
    if cfg["rlhf_script"] not in SCRIPTS:
        raise UserError(f"rlhf_script must be gpt_ (SM-GPT) or gpt (LB-GPT), got {cfg['rlhf_script']!r}")
    base_path = cfg["rlhf_base"] if os.path.isabs(cfg["rlhf_base"]) else repo_path(cfg["rlhf_base"])
    base = load_checkpoint(base_path)
    block_size = base["model_config"]["block_size"]
    sequence = cfg["prompt_tokens"] + cfg["completion_tokens"]
    require([(cfg["prompt_tokens"] >= 1 and cfg["completion_tokens"] >= 1,
              "prompt_tokens and completion_tokens must be at least 1"),
             (sequence <= block_size,
              f"prompt_tokens + completion_tokens = {sequence} does not fit the model's block_size {block_size}"),
             (cfg["n_pairs"] >= 16, "n_pairs must be at least 16"),
             (0.5 < cfg["label_agreement"] < 1, "label_agreement must be in (0.5, 1)"),
             (cfg["rl_group"] >= 2, "rl_group must be at least 2 (RLOO's baseline needs another sample)"),
             (cfg["bon_max_n"] >= 2 and cfg["eval_prompts"] >= 2 and cfg["eval_samples"] >= 1,
              "bon_max_n and eval_prompts must be at least 2, eval_samples at least 1"),
             (min(cfg["dpo_beta"], cfg["rl_beta"] + 1e-9, cfg["dpo_lr"], cfg["rl_lr"], cfg["rm_lr"]) > 0,
              "dpo_beta, dpo_lr, rl_lr and rm_lr must be > 0, rl_beta >= 0")])
    oracle = get_oracle(cfg["oracle"])
    data = Dataset(resolve_data(cfg["data"], cfg["data_url"], cfg["data_sha256"]), block_size, cfg["batch_size"],
                   cfg["device"], tokenizer_text=base["tokenizer"])
    prefix = "rlhf_" + re.sub(r"[^A-Za-z0-9_.-]+", ".", oracle.name) + ("_quick" if cfg["quick"] else "")
    return Setup(cfg, SCRIPTS[cfg["rlhf_script"]], base_path, base, data, oracle, prefix)


# -----------------------------------------------------------------------------------------
# Models, prompts, scores


def load_policy(s: Setup, ckpt: dict | None = None, path: str = "") -> nn.Module:
    """A policy (the base, or a tuned checkpoint) with dropout off: sampling and every log-probability must
    come from one deterministic function."""
    ckpt = ckpt or s.base
    ckpt = dict(ckpt, model_config=dict(ckpt["model_config"], dropout=0.0))
    return model_from_checkpoint(s.model_class, ckpt, path or s.base_path, s.cfg["device"],
                                 options=model_options(s.cfg, s.model_class)).eval()


def frozen(model: nn.Module) -> nn.Module:
    """The reference: a copy in eval mode that no gradient reaches."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def sample_prompts(s: Setup, split: str, n: int, seed: int) -> torch.Tensor:
    """n windows of prompt_tokens tokens at random offsets of a split: (n, prompt_tokens)."""
    ids, length = s.data.splits[split], s.cfg["prompt_tokens"]
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(ids) - length, (n,), generator=gen).tolist()
    return torch.tensor([ids[i:i + length].tolist() for i in starts], dtype=torch.long, device=s.cfg["device"])


def complete(s: Setup, model: nn.Module, prompts: torch.Tensor, gen: torch.Generator, batch: int = 256) -> torch.Tensor:
    """completion_tokens sampled after each prompt, in batches: (n, completion_tokens)."""
    out = []
    with autocast(s.cfg["device"], s.cfg["dtype"]):
        for i in range(0, len(prompts), batch):
            out.append(sample_completions(model, prompts[i:i + batch], s.cfg["completion_tokens"], TEMPERATURE, gen)[0])
    return torch.cat(out)


def texts(s: Setup, completions: torch.Tensor) -> list[str]:
    return [s.data.tok.decode(row) for row in completions.tolist()]


def scores(function, completion_texts: list[str]) -> torch.Tensor:
    return torch.tensor([function(t) for t in completion_texts], dtype=torch.float64)


@torch.no_grad()
def reward_scores(s: Setup, rm: RewardModel, prompts: torch.Tensor, completions: torch.Tensor,
                  batch: int = 256) -> torch.Tensor:
    rm.eval()
    with autocast(s.cfg["device"], s.cfg["dtype"]):
        return torch.cat([rm(torch.cat([prompts[i:i + batch], completions[i:i + batch]], dim=1)).float()
                          for i in range(0, len(prompts), batch)]).double().cpu()


def completion_logprobs(s: Setup, model: nn.Module, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """log pi(token | prompt, earlier tokens) of each completion token, at the sampling temperature: (B, L)."""
    with autocast(s.cfg["device"], s.cfg["dtype"]):
        return token_logprobs(completion_logits(model, prompts, completions), completions, TEMPERATURE)


def sequence_logprobs(s: Setup, model: nn.Module, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """log pi(completion | prompt) summed over its tokens: (B,)."""
    return completion_logprobs(s, model, prompts, completions).sum(1)


def save_model(s: Setup, model: nn.Module, path: str, rlhf: dict, **extra) -> None:
    """A tuned model (policy, or the reward model's body) as an ordinary weights-only checkpoint: gpt.py and
    gpt_.py sample, eval and study heads from it. rlhf: what made it; extra: more entries (the reward head)."""
    weights = cpu_copy(model.state_dict())
    save_checkpoint(path, {"model": weights, "best_model": weights, "model_config": dataclasses.asdict(model.config),
                           "layout": model.layout, "tokenizer": s.base["tokenizer"], "iter_num": s.base["iter_num"],
                           "best_val_loss": float("nan"), "config": dict(s.cfg), "rlhf": rlhf, **extra})


def save_policy(s: Setup, policy: nn.Module, path: str, method: str, step: int) -> None:
    save_model(s, policy, path, {"method": method, "step": step, "base": s.base_path, "oracle": s.oracle.name})


def kept_path(s: Setup, method: str, step: int) -> str:
    return s.path("model_dict", f"{method}_steps/step{step:05d}.pt")


def load_reward_model(s: Setup) -> RewardModel:
    path = s.path("model_dict", "rm.pt")
    if not os.path.exists(path):
        raise UserError(f"no reward model at {path}; run python rlhf.py --rlhf_stage=rm first")
    ckpt = load_checkpoint(path)
    rm = RewardModel(load_policy(s, ckpt, path))
    rm.head.load_state_dict(ckpt["reward_head"])
    return rm.eval()


def load_pairs(s: Setup) -> dict:
    path = s.path("data", "pairs.pt")
    if not os.path.exists(path):
        raise UserError(f"no preference pairs at {path}; run python rlhf.py --rlhf_stage=pairs first")
    return torch.load(path, map_location=s.cfg["device"], weights_only=True)


def step_on(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def write_json(path: str, value) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)


def read_json(path: str):
    """An earlier stage's JSON output, or None if that stage has not run."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -----------------------------------------------------------------------------------------
# Stages


def stage_pairs(s: Setup) -> dict:
    """Sample two completions of each prompt from the base and label which is preferred, noisily."""
    cfg, base = s.cfg, load_policy(s)
    gen = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"])
    pairs = {}
    for split, n, seed in (("train", cfg["n_pairs"], cfg["seed"]), ("val", max(16, cfg["n_pairs"] // 8), cfg["seed"] + 1)):
        prompts = sample_prompts(s, split, n, seed)
        a, b = complete(s, base, prompts, gen), complete(s, base, prompts, gen)
        text_a, text_b = texts(s, a), texts(s, b)
        pairs[split] = {"prompts": prompts, "a": a, "b": b, "gold_a": scores(s.oracle.label, text_a),
                        "gold_b": scores(s.oracle.label, text_b)}
        if s.oracle.judge:
            pairs[split].update(judge_a=scores(s.oracle.judge, text_a), judge_b=scores(s.oracle.judge, text_b))
    differences = pairs["train"]["gold_a"] - pairs["train"]["gold_b"]
    if not differences.any():
        raise UserError(f"the oracle {s.oracle.name!r} gave every pair the same score: there is nothing to prefer")
    tau = tau_for_agreement(differences, cfg["label_agreement"])
    label_gen = torch.Generator().manual_seed(cfg["seed"] + 2)
    report = {"tau": tau}
    for split, p in pairs.items():
        prob_a = preference_probability(p["gold_a"], p["gold_b"], tau)
        p["prob_a"] = prob_a
        p["a_preferred"] = torch.rand(len(prob_a), generator=label_gen, dtype=torch.float64) < prob_a
        decided = p["gold_a"] != p["gold_b"]
        agree = (p["a_preferred"] == (p["gold_a"] > p["gold_b"]))[decided].double().mean().item()
        report[split] = {"pairs": len(prob_a), "ties": 1 - decided.double().mean().item(), "label_agreement": agree}
    save_checkpoint(s.path("data", "pairs.pt"), dict(pairs, tau=torch.tensor(tau)))  # written atomically
    print(f"pairs: {report['train']['pairs']} train / {report['val']['pairs']} val, tau {tau:.3f}; labels agree with "
          f"the oracle on {report['train']['label_agreement']:.1%} of train pairs whose scores differ "
          f"({report['train']['ties']:.0%} are ties)")
    return report


def chosen_rejected(split: dict) -> tuple[torch.Tensor, torch.Tensor]:
    prefer_a = split["a_preferred"].to(split["a"].device)[:, None]
    return torch.where(prefer_a, split["a"], split["b"]), torch.where(prefer_a, split["b"], split["a"])


def stage_rm(s: Setup) -> dict:
    """A reward model: the base GPT with a scalar head on the last token, trained on the labels (Bradley-Terry)."""
    cfg, pairs = s.cfg, load_pairs(s)
    rm = RewardModel(load_policy(s)).train()
    optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg["rm_lr"], weight_decay=0.0)
    train_pairs = pairs["train"]
    chosen, rejected = chosen_rejected(train_pairs)
    prompts, n = train_pairs["prompts"], len(train_pairs["prompts"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    steps = cfg["rm_epochs"] * math.ceil(n / cfg["rm_batch"])
    bar = progress(total=steps, desc="reward model", unit="step")
    for epoch in range(cfg["rm_epochs"]):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg["rm_batch"]):
            idx = order[i:i + cfg["rm_batch"]].to(prompts.device)
            with autocast(cfg["device"], cfg["dtype"]):
                r_c = rm(torch.cat([prompts[idx], chosen[idx]], dim=1)).float()
                r_r = rm(torch.cat([prompts[idx], rejected[idx]], dim=1)).float()
            loss = reward_model_loss(r_c, r_r)
            step_on(optimizer, loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    val = pairs["val"]
    margin = (reward_scores(s, rm, val["prompts"], val["a"]) - reward_scores(s, rm, val["prompts"], val["b"]))
    decided = val["gold_a"] != val["gold_b"]
    report = {
        "val_pairs": len(margin),
        "accuracy_on_labels": ((margin > 0) == val["a_preferred"].cpu()).double().mean().item(),
        # the best any model can do on noisy labels: always pick the side the oracle favours
        "label_ceiling": torch.maximum(val["prob_a"], 1 - val["prob_a"]).mean().item(),
        "accuracy_on_oracle": ((margin > 0) == (val["gold_a"] > val["gold_b"]))[decided].double().mean().item(),
    }
    save_model(s, rm.body, s.path("model_dict", "rm.pt"), dict(report, method="reward model"),
               reward_head=rm.head.state_dict())
    print(f"reward model: held-out accuracy {report['accuracy_on_labels']:.1%} on the noisy labels (ceiling "
          f"{report['label_ceiling']:.1%}), {report['accuracy_on_oracle']:.1%} on the oracle's own preferences")
    return report


def eval_prompts(s: Setup) -> torch.Tensor:
    return sample_prompts(s, "val", s.cfg["eval_prompts"], s.cfg["seed"] + 3)


def stage_bon(s: Setup) -> dict:
    """Best-of-n by the reward model, n = 1, 2, 4, ... bon_max_n, on the evaluation prompts."""
    cfg, base, rm = s.cfg, load_policy(s), load_reward_model(s)
    prompts = eval_prompts(s)
    n_max = cfg["bon_max_n"]
    gen = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"] + 4)
    repeated = prompts.repeat_interleave(n_max, dim=0)
    completions = complete(s, base, repeated, gen)
    completion_texts = texts(s, completions)
    rm_score = reward_scores(s, rm, repeated, completions).view(-1, n_max)
    gold = scores(s.oracle.label, completion_texts).view(-1, n_max)
    # each sample's win rate against the prompt's other samples (by the oracle; a tie counts half)
    beats = (gold[:, :, None] > gold[:, None, :]).double() + 0.5 * (gold[:, :, None] == gold[:, None, :]).double()
    values = {"gold": gold, "rm": rm_score, "win": (beats.sum(2) - 0.5) / max(1, n_max - 1)}
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
        print(f"best-of-{r['n']}: KL {r['kl']:.3f}, oracle {r['gold']:+.3f}, reward model {r['rm']:+.3f}"
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
        ref_c, ref_r = (torch.cat([sequence_logprobs(s, reference, prompts[i:i + 256], side[i:i + 256])
                                   for i in range(0, n, 256)]) for side in (chosen, rejected))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg["dpo_lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg["seed"])
    steps = cfg["dpo_epochs"] * math.ceil(n / cfg["dpo_batch"])
    log, step = [], 0
    bar = progress(total=steps, desc="dpo", unit="step")
    for epoch in range(cfg["dpo_epochs"]):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg["dpo_batch"]):
            idx = order[i:i + cfg["dpo_batch"]].to(prompts.device)
            pi_c = sequence_logprobs(s, policy, prompts[idx], chosen[idx])
            pi_r = sequence_logprobs(s, policy, prompts[idx], rejected[idx])
            loss = dpo_loss(pi_c, pi_r, ref_c[idx], ref_r[idx], cfg["dpo_beta"])
            step_on(optimizer, loss)
            step += 1
            margin = cfg["dpo_beta"] * ((pi_c - ref_c[idx]) - (pi_r - ref_r[idx])).detach()
            log.append({"step": step, "loss": loss.item(), "reward_accuracy": (margin > 0).float().mean().item(),
                        "margin": margin.mean().item()})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{log[-1]['reward_accuracy']:.2f}")
            if step % cfg["keep_every"] == 0 or step == steps:
                save_policy(s, policy, kept_path(s, "dpo", step), "dpo", step)
    bar.close()
    save_policy(s, policy, s.path("model_dict", "dpo.pt"), "dpo", step)
    write_json(s.path("generate_text", "dpo_log.json"), log)
    print(f"dpo: {step} steps, last loss {log[-1]['loss']:.3f} (log 2 = {math.log(2):.3f} at the start)")
    return {"steps": step, "log": log}


def restrict_training(policy: nn.Module, trainable: dict[str, torch.Tensor]) -> list[nn.Parameter]:
    """Train only the entries where the mask (a looped-layout state dict of 0/1) is 1: parameters with none
    are frozen, the others have their gradients masked. With AdamW and no weight decay a masked entry gets a
    zero update, so it stays bitwise unchanged. Returns the parameters to optimise."""
    masks = convert_state_dict(trainable, "looped", policy.layout, policy.config.n_head)
    params = []
    for name, p in policy.named_parameters():
        mask = masks[name].to(p.device, p.dtype)
        if not mask.any():
            p.requires_grad_(False)
        else:
            if not mask.all():
                p.register_hook(lambda grad, mask=mask: grad * mask)
            params.append(p)
    return params


@torch.no_grad()
def rollout(s: Setup, policy: nn.Module, reference: nn.Module, rm: RewardModel, step: int,
            gen: torch.Generator) -> dict[str, torch.Tensor]:
    """rl_group completions of each of rl_prompts train-split prompts, from the current policy, with their
    reward: the reward model's score minus rl_beta x the sampled sequence KL (k1) to the base, and each
    one's leave-one-out advantage within its prompt's group."""
    cfg = s.cfg
    prompts = sample_prompts(s, "train", cfg["rl_prompts"], cfg["seed"] + 100 + step).repeat_interleave(
        cfg["rl_group"], dim=0)
    completions = complete(s, policy, prompts, gen)
    with autocast(cfg["device"], cfg["dtype"]):
        ref_logits = completion_logits(reference, prompts, completions)
        old_logits = completion_logits(policy, prompts, completions)
    batch = {"prompts": prompts, "completions": completions, "score": reward_scores(s, rm, prompts, completions).float(),
             "ref_logprobs": token_logprobs(ref_logits, completions, TEMPERATURE),
             "old_logprobs": token_logprobs(old_logits, completions, TEMPERATURE),
             "kl_exact": exact_kl(old_logits, ref_logits, TEMPERATURE).sum(1)}
    batch["reward"] = batch["score"].to(batch["old_logprobs"].device) - cfg["rl_beta"] * (
        batch["old_logprobs"] - batch["ref_logprobs"]).sum(1)
    batch["advantages"] = rloo_advantages(batch["reward"].view(-1, cfg["rl_group"]), cfg["rl_normalize"]).view(-1)
    return batch


def rloo_update(s: Setup, policy: nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
                step: int) -> tuple[torch.Tensor, dict]:
    """One REINFORCE step with the leave-one-out advantages."""
    loss = policy_gradient_loss(completion_logprobs(s, policy, batch["prompts"], batch["completions"]),
                                batch["advantages"])
    step_on(optimizer, loss)
    return loss, {}


def ppo_update(s: Setup, policy: nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
               step: int) -> tuple[torch.Tensor, dict]:
    """ppo_epochs passes of ppo_minibatches minibatches over the rollouts, the probability ratio to the policy
    that sampled them clipped; returns the last loss and the mean clip statistics."""
    cfg = s.cfg
    n = len(batch["prompts"])
    size = math.ceil(n / cfg["ppo_minibatches"])
    stats = []
    for _ in range(cfg["ppo_epochs"]):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"] + step)).to(batch["prompts"].device)
        for i in range(0, n, size):
            idx = order[i:i + size]
            logprobs = completion_logprobs(s, policy, batch["prompts"][idx], batch["completions"][idx])
            loss, minibatch = ppo_loss(logprobs, batch["old_logprobs"][idx], batch["advantages"][idx], cfg["ppo_clip"])
            step_on(optimizer, loss)
            stats.append(minibatch)
    return loss, {k: sum(m[k] for m in stats) / len(stats) for k in stats[0]}


UPDATES = {"rloo": rloo_update, "ppo": ppo_update}


def stage_rl(s: Setup, method: str, trainable: dict[str, torch.Tensor] | None = None, name: str = "") -> dict:
    """RLOO or PPO: policy gradient on the reward model's score minus rl_beta times the sequence KL to the
    frozen base, with a leave-one-out baseline over rl_group samples of each prompt. trainable: a mask of the
    entries to tune (the head study's one-head, attention-only and MLP-only runs); name: what to save as."""
    cfg = s.cfg
    name = name or method
    policy, rm = load_policy(s), load_reward_model(s)
    reference = frozen(policy)
    for p in rm.parameters():
        p.requires_grad_(False)
    params = restrict_training(policy, trainable) if trainable else list(policy.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg["rl_lr"], weight_decay=0.0)
    gen = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"] + 5)
    log = []
    bar = progress(total=cfg["rl_steps"], desc=name, unit="step")
    for step in range(1, cfg["rl_steps"] + 1):
        batch = rollout(s, policy, reference, rm, step, gen)
        loss, stats = UPDATES[method](s, policy, optimizer, batch, step)
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(f"{name}: loss is {loss.item()} at step {step}; try a lower --rl_lr")
        estimators = kl_estimators(batch["old_logprobs"], batch["ref_logprobs"])
        log.append({"step": step, "rm_score": batch["score"].mean().item(), "reward": batch["reward"].mean().item(),
                    "kl_exact": batch["kl_exact"].mean().item(),
                    **{f"kl_{k}": v.sum(1).mean().item() for k, v in estimators.items()}, **stats})
        bar.update(1)
        bar.set_postfix(rm=f"{log[-1]['rm_score']:+.3f}", kl=f"{log[-1]['kl_exact']:.2f}")
        if step % cfg["keep_every"] == 0 or step == cfg["rl_steps"]:
            save_policy(s, policy, kept_path(s, name, step), name, step)
    bar.close()
    save_policy(s, policy, s.path("model_dict", f"{name}.pt"), name, cfg["rl_steps"])
    write_json(s.path("generate_text", f"{name}_log.json"), log)
    print(f"{name}: {cfg['rl_steps']} steps, reward-model score {log[0]['rm_score']:+.3f} -> {log[-1]['rm_score']:+.3f}, "
          f"KL to the base {log[-1]['kl_exact']:.3f} nats per sequence")
    return {"log": log}


def distinct_2(completion_texts: list[str]) -> float:
    """Unique word bigrams over all bigrams, across all completions: low when completions repeat each other."""
    bigrams = [pair for t in completion_texts for pair in zip(t.split(), t.split()[1:])]
    return len(set(bigrams)) / max(1, len(bigrams))


def repetition(text: str) -> float:
    """The fraction of a completion's words that repeat an earlier word of it (any case): a policy that pads
    its text with the labeller's favourite word shows here."""
    words = WORD.findall(text.lower())
    return (len(words) - len(set(words))) / max(1, len(words))


def interval(per_prompt: torch.Tensor) -> tuple[float, float]:
    """Mean over prompts and the half-width of its 95% confidence interval (normal approximation)."""
    return per_prompt.mean().item(), 1.96 * per_prompt.std().item() / math.sqrt(len(per_prompt))


def win_rates(gold: torch.Tensor, base_gold: torch.Tensor) -> torch.Tensor:
    """Per prompt: how often the method's sample beats the base's sample of the same index (a tie counts half)."""
    return ((gold > base_gold).double() + 0.5 * (gold == base_gold).double()).mean(1)


@torch.no_grad()
def evaluate_policy(s: Setup, policy: nn.Module, reference: nn.Module, rm: RewardModel, prompts: torch.Tensor,
                    samples: int, seed: int) -> dict:
    """Sample `samples` completions of each prompt and score them: oracle, judge and reward model per prompt
    (P, samples), and the exact sequence KL to the base, with the k1 and k3 estimators beside it."""
    gen = torch.Generator(device=s.cfg["device"]).manual_seed(seed)
    repeated = prompts.repeat_interleave(samples, dim=0)
    completions = complete(s, policy, repeated, gen)
    completion_texts = texts(s, completions)
    kl = {"exact": [], "k1": [], "k3": []}
    for i in range(0, len(repeated), 256):
        p, c = repeated[i:i + 256], completions[i:i + 256]
        with autocast(s.cfg["device"], s.cfg["dtype"]):
            logits, ref_logits = completion_logits(policy, p, c), completion_logits(reference, p, c)
        kl["exact"].append(exact_kl(logits, ref_logits, TEMPERATURE).sum(1))
        estimators = kl_estimators(token_logprobs(logits, c, TEMPERATURE), token_logprobs(ref_logits, c, TEMPERATURE))
        kl["k1"].append(estimators["k1"].sum(1))
        kl["k3"].append(estimators["k3"].sum(1))
    result = {"completions": completion_texts, "gold": scores(s.oracle.label, completion_texts).view(-1, samples),
              "rm": reward_scores(s, rm, repeated, completions).view(-1, samples),
              **{f"kl_{k}": torch.cat(v).double().mean().item() for k, v in kl.items()}}
    if s.oracle.judge:
        result["judge"] = scores(s.oracle.judge, completion_texts).view(-1, samples)
    return result


def curve_point(step: int, r: dict) -> dict:
    """One point of a training curve: evaluate_policy's result r, averaged."""
    return {"step": step, "kl": r["kl_exact"], **{k: r[k].mean().item() for k in ("gold", "rm", "judge") if k in r}}


def kept_curve(s: Setup, name: str, reference: nn.Module, rm: RewardModel, prompts: torch.Tensor,
               samples: int) -> list[dict]:
    """Every kept checkpoint of the run `name`, in step order, evaluated on the prompts (the same random numbers
    for each), so that runs can be compared at equal KL."""
    folder = os.path.dirname(kept_path(s, name, 1))
    points = []
    for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, file)
        kept = load_checkpoint(path)
        r = evaluate_policy(s, load_policy(s, kept, path), reference, rm, prompts, samples, s.cfg["seed"] + 7)
        points.append(curve_point(kept["rlhf"]["step"], r))
    return points


def table_row(name: str, kl: float, per_prompt: dict, base: dict | None, extra: dict) -> dict:
    """One method's line of the report: means with 95% intervals over prompts."""
    row = {"method": name, "kl": kl, **extra}
    for key in ("gold", "judge", "rm"):
        if key in per_prompt:
            row[key], row[f"{key}_ci"] = interval(per_prompt[key])
    if base is not None and "judge" in per_prompt:
        row["judge_gain"], row["judge_gain_ci"] = interval(per_prompt["judge"] - base["judge"])
    return row


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
    results = {name: evaluate_policy(s, policy, reference, rm, prompts, samples, cfg["seed"] + 6)
               for name, policy in policies.items()}
    curves = {method: kept_curve(s, method, reference, rm, prompts, 1) for method in list(policies)[1:]}
    base_result = results["base"]
    rows = []
    for name, r in results.items():
        val_loss = full_loss(policies[name], s.data, "val", cfg["device"], cfg["dtype"])
        per_prompt = {k: r[k].mean(1) for k in ("gold", "judge", "rm") if k in r}
        rows.append(table_row(name, r["kl_exact"], per_prompt, {k: base_result[k].mean(1) for k in per_prompt}, {
            "kl_k1": r["kl_k1"], "kl_k3": r["kl_k3"], "val_bpb": s.data.bpb(val_loss, "val"),
            "win_rate": interval(win_rates(r["gold"], base_result["gold"])),
            "distinct_2": distinct_2(r["completions"]),
            "repetition": sum(map(repetition, r["completions"])) / len(r["completions"])}))
    bon_result = read_json(s.path("generate_text", "bon.json"))
    if bon_result is None:
        print(f"note: no best-of-n results ({s.path('generate_text', 'bon.json')}); python rlhf.py --rlhf_stage=bon "
              f"adds them")
    bon = bon_result["rows"] if bon_result else []
    for row in rows[1:]:  # the trained methods, against best-of-n at the same KL
        row.update({f"bon_{key}_at_equal_kl": at_equal_kl(bon, row["kl"], key) for key in ("gold", "judge")})
    rows[1:1] = [table_row(f"best-of-{b['n']}", b["kl"], {k: torch.tensor(b[f"{k}_per_prompt"]) for k in ("gold", "judge", "rm")
                                                           if f"{k}_per_prompt" in b},
                           {k: base_result[k].mean(1) for k in ("gold", "judge", "rm") if k in base_result},
                           {"win_rate": interval(torch.tensor(b["win_per_prompt"]))}) for b in bon]
    report = {"oracle": s.oracle.name, "base": s.base_path, "script": cfg["rlhf_script"], "eval_prompts": len(prompts),
              "samples_per_prompt": samples, "rows": rows, "curves": curves,
              "bon_curve": [{"n": b["n"], "kl": b["kl"], "gold": b["gold"], "rm": b["rm"]} for b in bon]}
    write_json(s.path("generate_text", "report.json"), report)
    write_markdown_report(s, report)
    plot_gold_against_kl(report, s.path("generate_text", "gold_vs_kl.png"))
    plot_proxy_against_gold(report, s.path("generate_text", "proxy_vs_gold.png"))
    write_samples(s, prompts, results, samples, bon_result["best_of_16_samples"] if bon_result else None)
    print(markdown_table(report))
    return report


def at_equal_kl(bon: list[dict], kl: float, key: str) -> float | None:
    """Best-of-n's score at a given KL, interpolated linearly in sqrt(KL) between its n; None beyond its range."""
    points = [(b["kl"] ** 0.5, b[key]) for b in bon if key in b]
    x = max(kl, 0.0) ** 0.5
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def markdown_table(report: dict) -> str:
    def cell(row, key, fmt="{:+.3f}"):
        if key not in row:
            return "—"
        ci = row.get(f"{key}_ci")
        return fmt.format(row[key]) + (f" ± {ci:.3f}" if ci is not None else "")

    lines = ["| method | KL to base (nats/seq) | oracle score | best-of-n's oracle score at this KL | judge score | "
             "judge gain over base | win rate vs base (oracle) | reward model | val bpb | distinct-2 | repetition |",
             "|" + "---|" * 11]
    for r in report["rows"]:
        win = f"{r['win_rate'][0]:.1%} ± {r['win_rate'][1]:.1%}" if "win_rate" in r else "—"
        bon_gold = r.get("bon_gold_at_equal_kl")
        bon_cell = "—" if "bon_gold_at_equal_kl" not in r else "beyond best-of-n" if bon_gold is None else f"{bon_gold:+.3f}"
        kl = max(r["kl"], 0.0)  # exact KL is >= 0; float noise can leave -1e-8
        lines.append(f"| {r['method']} | {kl:.3f} | {cell(r, 'gold')} | {bon_cell} | {cell(r, 'judge')} | "
                     f"{cell(r, 'judge_gain')} | {win} | {cell(r, 'rm')} | {cell(r, 'val_bpb', '{:.3f}')} | "
                     f"{cell(r, 'distinct_2', '{:.3f}')} | {cell(r, 'repetition', '{:.3f}')} |")
    return "\n".join(lines)


def write_markdown_report(s: Setup, report: dict) -> None:
    text = (f"# RLHF report: oracle {report['oracle']}, {report['script']}.py, base {report['base']}\n\n"
            f"{report['eval_prompts']} val-split prompts, {report['samples_per_prompt']} completions each (best-of-n: "
            f"the expectation over its samples). ± is a 95% interval over prompts. KL: exact for the tuned models "
            f"(summed over the vocabulary at each position of their own samples), log n - (n-1)/n for best-of-n.\n\n"
            + markdown_table(report) + "\n")
    with atomic_open(s.path("generate_text", "report.md"), "w", encoding="utf-8") as f:
        f.write(text)


def write_samples(s: Setup, prompts: torch.Tensor, results: dict, samples: int, best_of_16: list[str] | None,
                  n: int = 8) -> None:
    """The first n evaluation prompts, each with the base's completion, every tuned model's and best-of-16's,
    side by side."""
    parts = [f"# {s.prefix}: completions of the same val-split prompts (temperature {TEMPERATURE})\n"]
    for i in range(min(n, len(prompts))):
        parts.append(f"\n======== prompt {i + 1}\n{s.data.tok.decode(prompts[i].tolist())}\n")
        for name, r in results.items():
            parts.append(f"-------- {name}\n{r['completions'][i * samples]}\n")
        if best_of_16:
            parts.append(f"-------- best-of-16 by the reward model\n{best_of_16[i]}\n")
    with atomic_open(s.path("generate_text", "samples.txt"), "w", encoding="utf-8") as f:
        f.write("".join(parts))


# -----------------------------------------------------------------------------------------
# The head study: which attention heads does preference tuning change? (the heads stage)


def looped_state(ckpt: dict) -> dict:
    """A checkpoint's weights in gpt.py's layout, where head h of layer l is a module of its own."""
    return convert_state_dict(ckpt["best_model"], ckpt["layout"], "looped", ckpt["model_config"]["n_head"])


def policy_from_state(s: Setup, state: dict) -> nn.Module:
    """A policy of the script's class with these (looped-layout) weights."""
    return load_policy(s, dict(s.base, best_model=state, layout="looped"))


@torch.no_grad()
def implicit_margin(s: Setup, policy: nn.Module, pairs: dict) -> float:
    """DPO's implicit reward margin on held-out pairs, deterministic (no sampling): the mean of
    dpo_beta x [(log pi(chosen) - log pi_base(chosen)) - (log pi(rejected) - log pi_base(rejected))]."""
    pc = sequence_logprobs(s, policy, pairs["prompts"], pairs["chosen"])
    pr = sequence_logprobs(s, policy, pairs["prompts"], pairs["rejected"])
    return (s.cfg["dpo_beta"] * ((pc - pairs["base_chosen"]) - (pr - pairs["base_rejected"]))).mean().item()


@torch.no_grad()
def sampled_scores(s: Setup, policy: nn.Module, rm: RewardModel, prompts: torch.Tensor,
                   seed: int = 0) -> tuple[float, float]:
    """Mean oracle and reward-model score of completions of the prompts, from fixed random numbers."""
    gen = torch.Generator(device=s.cfg["device"]).manual_seed(s.cfg["seed"] + 8 + seed)
    completions = complete(s, policy, prompts, gen)
    return scores(s.oracle.label, texts(s, completions)).mean().item(), reward_scores(s, rm, prompts, completions).mean().item()


def ablation_drops(s: Setup, policy: nn.Module, rm: RewardModel, prompts: torch.Tensor,
                   heads: list[tuple[int, int]], seeds: int = 4) -> dict[str, torch.Tensor | float]:
    """How much the oracle and reward-model scores drop when each head alone is switched off, against the
    unmasked model's mean over `seeds` samplings. Sampling diverges within a few tokens even from the same
    random numbers, so each masked score is about an independent draw: "noise" (the spread of the unmasked
    scores across seeds) is the standard deviation of any one drop that is due to sampling alone."""
    unmasked = torch.tensor([sampled_scores(s, policy, rm, prompts, seed) for seed in range(seeds)])  # (seeds, 2)
    shape = (policy.config.n_layer, policy.config.n_head)
    drops = {"gold": torch.zeros(shape), "rm": torch.zeros(shape),
             "noise_gold": unmasked[:, 0].std().item(), "noise_rm": unmasked[:, 1].std().item()}
    for layer, head in progress(heads, desc="switching heads off", leave=False):
        policy.set_head_mask({(layer, head)})
        masked_gold, masked_proxy = sampled_scores(s, policy, rm, prompts)
        drops["gold"][layer, head] = unmasked[:, 0].mean() - masked_gold
        drops["rm"][layer, head] = unmasked[:, 1].mean() - masked_proxy
    policy.set_head_mask(set())
    return drops


@torch.no_grad()
def kl_by_position(s: Setup, policy: nn.Module, reference: nn.Module, prompts: torch.Tensor) -> list[float]:
    """The exact KL to the base at each completion position, averaged over the policy's own samples."""
    gen = torch.Generator(device=s.cfg["device"]).manual_seed(s.cfg["seed"] + 9)
    completions = complete(s, policy, prompts, gen)
    with autocast(s.cfg["device"], s.cfg["dtype"]):
        kl = exact_kl(completion_logits(policy, prompts, completions), completion_logits(reference, prompts, completions),
                      TEMPERATURE)
    return kl.mean(0).tolist()


def part_masks(base: dict, heads: set[tuple[int, int]] = frozenset(), mlps: bool = False) -> dict[str, torch.Tensor]:
    """A looped-layout mask of the entries that belong to the given heads (and to every MLP if mlps)."""
    zeros = {k: torch.zeros_like(v) for k, v in base.items()}
    ones = {k: torch.ones_like(v) for k, v in base.items()}
    n_layer = 1 + max(int(k.split(".")[1]) for k in base if k.startswith("blocks."))
    return transplant(zeros, ones, heads=set(heads), mlps=set(range(n_layer)) if mlps else set())


def stage_heads(s: Setup) -> dict:
    """For each tuned model: how far each head moved, how its attention changed, which heads carry the change
    (switching each off; transplanting each between base and tuned), where along the completion the KL sits,
    and whether tuning one head, attention only or the MLPs only does as well (RLOO, same budget)."""
    cfg = s.cfg
    methods = [m for m in ("dpo", "rloo", "ppo") if os.path.exists(s.path("model_dict", f"{m}.pt"))]
    if not methods:
        raise UserError("no tuned models yet: run python rlhf.py (or its dpo, rloo or ppo stage) first")
    n_layer, n_head = s.base["model_config"]["n_layer"], s.base["model_config"]["n_head"]
    heads = [(layer, head) for layer in range(n_layer) for head in range(n_head)]
    base_state = looped_state(s.base)
    base, rm = policy_from_state(s, base_state), load_reward_model(s)
    gen = torch.Generator().manual_seed(cfg["seed"])
    batches = [s.data.batch("val", gen)[0] for _ in range(cfg["head_batches"])]  # the same inputs for every model
    prompts = eval_prompts(s)[:cfg["head_prompts"]]
    held_out = load_pairs(s)["val"]
    chosen, rejected = chosen_rejected(held_out)
    pairs = {"prompts": held_out["prompts"][:cfg["head_pairs"]], "chosen": chosen[:cfg["head_pairs"]],
             "rejected": rejected[:cfg["head_pairs"]]}
    with torch.no_grad():
        pairs["base_chosen"] = sequence_logprobs(s, base, pairs["prompts"], pairs["chosen"])
        pairs["base_rejected"] = sequence_logprobs(s, base, pairs["prompts"], pairs["rejected"])
    base_stats = head_statistics(base, batches)
    study = {"oracle": s.oracle.name, "heads": heads, "base_ablation": ablation_drops(s, base, rm, prompts, heads),
             "methods": {}}
    for method in methods:
        tuned_state = looped_state(load_checkpoint(s.path("model_dict", f"{method}.pt")))
        tuned = policy_from_state(s, tuned_state)
        r = {"weight_change": head_weight_change(base_state, tuned_state, n_layer, n_head),
             "stat_change": {k: v - base_stats[k] for k, v in head_statistics(tuned, batches).items()},
             "attention_divergence": attention_divergence(base, tuned, batches),
             "ablation": ablation_drops(s, tuned, rm, prompts, heads),
             "margin": implicit_margin(s, tuned, pairs), "kl_by_position": kl_by_position(s, tuned, base, prompts)}
        # transplants, one head at a time: which heads carry the tuned model's margin and score?
        into_base, out_of_tuned = torch.zeros(n_layer, n_head), torch.zeros(n_layer, n_head)
        gold_into_base = torch.zeros(n_layer, n_head)
        for layer, head in progress(heads, desc=f"transplanting {method} heads", leave=False):
            grafted = policy_from_state(s, transplant(base_state, tuned_state, heads={(layer, head)}))
            into_base[layer, head] = implicit_margin(s, grafted, pairs)
            gold_into_base[layer, head] = sampled_scores(s, grafted, rm, prompts)[0]
            out_of_tuned[layer, head] = r["margin"] - implicit_margin(
                s, policy_from_state(s, transplant(tuned_state, base_state, heads={(layer, head)})), pairs)
        r.update(margin_into_base=into_base, margin_lost_from_tuned=out_of_tuned, gold_into_base=gold_into_base)
        r["margin_by_part"] = {part: implicit_margin(s, policy_from_state(s, transplant(base_state, tuned_state, **kw)),
                                                     pairs)
                               for part, kw in (("all heads", {"heads": set(heads)}), ("all MLPs", {"mlps": set(range(n_layer))}),
                                                ("the rest", {"rest": True}))}
        study["methods"][method] = r
    study["partial_tuning"] = partial_tuning(s, base_state, study, heads)
    write_head_study(s, study)
    return study


def partial_tuning(s: Setup, base_state: dict, study: dict, heads: list[tuple[int, int]]) -> dict:
    """RLOO for head_tuning_steps steps, tuning only the head that carries most of RLOO's margin, only
    attention, or only the MLPs; each evaluated (oracle score, exact KL) at its kept checkpoints, beside the
    full RLOO run's kept checkpoints (the same method; at step head_tuning_steps, the same budget)."""
    source = study["methods"].get("rloo") or next(iter(study["methods"].values()))
    best = divmod(int(source["margin_into_base"].argmax()), source["margin_into_base"].shape[1])
    runs = {f"head {best[0]}.{best[1]} only": part_masks(base_state, heads={best}),
            "attention only": part_masks(base_state, heads=set(heads)),
            "MLPs only": part_masks(base_state, mlps=True)}
    base, rm = load_policy(s), load_reward_model(s)
    reference, prompts = frozen(base), eval_prompts(s)[:s.cfg["head_prompts"]]
    steps = s.cfg["head_tuning_steps"]
    short = dataclasses.replace(s, cfg=dict(s.cfg, rl_steps=steps, keep_every=max(1, steps // 2)))
    curves = {"base (step 0)": [curve_point(0, evaluate_policy(s, base, reference, rm, prompts, 2, s.cfg["seed"] + 7))]}
    for label, mask in {"all weights (the rloo stage's run)": None, **runs}.items():
        name = "rloo_" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") if mask is not None else "rloo"
        if mask is not None:
            stage_rl(short, "rloo", mask, name)
        curves[label] = kept_curve(s, name, reference, rm, prompts, 2)
    return {"chosen_head": list(best), "steps": steps, "curves": curves}


def as_lists(value):
    """The study's tensors as nested lists, for JSON."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: as_lists(v) for k, v in value.items()}
    return value


def write_head_study(s: Setup, study: dict) -> None:
    """One layer x head heatmap PNG per question, a JSON table of every number, and two line plots."""
    methods = study["methods"]
    figures = {
        "weight_change": [(m, [(f"{p} (relative change)", r["weight_change"][p]) for p in ("query", "key", "value", "output")])
                          for m, r in methods.items()],
        "attention": [(m, [("attention map divergence (JS, nats)", r["attention_divergence"]),
                           ("entropy change", r["stat_change"]["entropy"]),
                           ("previous-token change", r["stat_change"]["previous_token"]),
                           ("first-token change", r["stat_change"]["first_token"])]) for m, r in methods.items()],
        "ablation": [("base", [("oracle drop, head off", study["base_ablation"]["gold"]),
                               ("reward-model drop, head off", study["base_ablation"]["rm"])])]
                    + [(m, [("oracle drop, head off", r["ablation"]["gold"]), ("reward-model drop, head off", r["ablation"]["rm"])])
                       for m, r in methods.items()],
        "transplant": [(m, [("margin, tuned head into base", r["margin_into_base"]),
                            ("margin lost, base head into tuned", r["margin_lost_from_tuned"]),
                            ("oracle score, tuned head into base", r["gold_into_base"])]) for m, r in methods.items()],
    }
    for name, rows in figures.items():
        plot_head_grid(rows, f"{s.prefix}: {name.replace('_', ' ')} per head (rows: layers, columns: heads)",
                       s.path("generate_text", f"heads_{name}.png"))
    plot_lines({m: r["kl_by_position"] for m, r in methods.items()}, "completion position", "exact KL to the base (nats)",
               f"{s.prefix}: where along the completion the KL sits", s.path("generate_text", "heads_kl_by_position.png"))
    bon = (read_json(s.path("generate_text", "report.json")) or {}).get("bon_curve", [])
    plot_gold_against_kl({"oracle": s.oracle.name, "bon_curve": bon, "rows": [], "curves": study["partial_tuning"]["curves"]},
                         s.path("generate_text", "heads_gold_vs_kl.png"))
    write_json(s.path("generate_text", "heads.json"), as_lists(study))
    for name, ablation in [("base", study["base_ablation"])] + [(m, r["ablation"]) for m, r in methods.items()]:
        largest = ablation["gold"].abs().max().item()
        print(f"{name}: switching one head off moves the oracle score by at most {largest:.3f}; sampling alone moves "
              f"it by {ablation['noise_gold']:.3f} (one standard deviation)")
    for method, r in methods.items():
        top = sorted(((r["margin_into_base"][l, h].item(), f"{l}.{h}") for l, h in study["heads"]), reverse=True)[:3]
        print(f"{method}: margin {r['margin']:+.3f}; by part " + ", ".join(f"{k} {v:+.3f}" for k, v in r["margin_by_part"].items())
              + "; heads carrying most of it alone: " + ", ".join(f"{name} {v:+.3f}" for v, name in top))


RUN = {"pairs": stage_pairs, "rm": stage_rm, "bon": stage_bon, "dpo": stage_dpo,
       "rloo": lambda s: stage_rl(s, "rloo"), "ppo": lambda s: stage_rl(s, "ppo"), "eval": stage_eval,
       "heads": stage_heads}


def main(argv: list[str] | None = None) -> dict:
    sys.stdout.reconfigure(line_buffering=True)  # each stage's line at once, also in a log file
    with exit_codes():
        cfg = load_config(sys.argv[1:] if argv is None else argv, "rlhf", __doc__,
                          presets={"quick": default_config.RLHF_QUICK})
        s = setup(cfg)
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
