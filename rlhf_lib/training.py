"""Every training loop of the RLHF layer: the reward model, the DPO family, RLOO and PPO (with a
value model), and minibatches over pairs. The losses themselves are in preference.py, proven there
by tests."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Iterator

import torch
import torch.nn as nn

from dualgpt import TrainingDiverged
from dualgpt.layouts import convert_state_dict
from dualgpt.files import write_json
from dualgpt.runtime import autocast, progress
from rlhf_lib.preference import (RewardModel, completion_logits, dpo_loss, exact_kl, gae,
                                 kl_estimators,
                                 kl_penalized_reward, policy_gradient_loss, ppo_loss,
                                 reward_model_loss,
                                 rloo_advantages, token_logprobs, token_rewards, value_loss,
                                 whiten)
from rlhf_lib.study import (TEMPERATURE, Setup, chosen_rejected, clear_outputs, complete,
                            completion_logprobs,
                            frozen, keep_steps, kept_folder, load_policy, reward_scores,
                            sample_prompts,
                            save_policy, sequence_logprobs)

# the DPO losses: (loss kind, label) where the label is 1 (hard), 1 - cdpo_epsilon or the pair's
# probability
DPO_METHODS = {"dpo": ("sigmoid", "hard"), "cdpo": ("sigmoid", "smoothed"), "ipo": ("ipo", "hard"),
               "dpo_soft": ("sigmoid", "soft")}


def train_reward_model(s: Setup, pairs: dict) -> RewardModel:
    """A reward model: the base GPT with a scalar head on the last token, trained on the train
    pairs' labels (Bradley-Terry)."""
    cfg = s.cfg
    rm = RewardModel(load_policy(s)).train()
    optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg["rm_lr"], weight_decay=0.0)
    chosen, rejected = chosen_rejected(pairs["train"])
    prompts = pairs["train"]["prompts"]
    for _, idx in minibatches(len(prompts), cfg["rm_batch"], cfg["rm_epochs"],
                              s.generator("rm.order"),
                              prompts.device, desc="reward model"):
        with autocast(cfg["device"], cfg["dtype"]):
            r_c, r_r = rm(prompts[idx],
                          chosen[idx]).float(), rm(prompts[idx], rejected[idx]).float()
        step_on(optimizer, reward_model_loss(r_c, r_r))
    return rm


def dpo_label(method: str, cfg: dict, pairs: dict) -> torch.Tensor | float:
    """The label DPO's loss is given: 1 (the chosen side is preferred), 1 - cdpo_epsilon, or the
    pair's Bradley-Terry probability that the chosen side is preferred (the soft label)."""
    kind = DPO_METHODS[method][1]
    if kind == "smoothed":
        return 1.0 - cfg["cdpo_epsilon"]
    if kind == "soft":
        prob_a = pairs["prob_a"].to(pairs["a"].device)
        return torch.where(pairs["a_preferred"].to(prob_a.device), prob_a, 1 - prob_a).float()
    return 1.0


def train_dpo(s: Setup, method: str, train: dict,
              reference_logprobs: tuple[torch.Tensor, torch.Tensor],
              record: dict) -> list[dict]:
    """One DPO loss from the base on the train pairs against the frozen reference (its
    log-probabilities of both sides, computed once), keeping the policy at keep_points steps;
    returns the log."""
    cfg = s.cfg
    chosen, rejected = chosen_rejected(train)
    prompts, (ref_c, ref_r) = train["prompts"], reference_logprobs
    n = len(prompts)
    steps = cfg["dpo_epochs"] * math.ceil(n / cfg["dpo_batch"])
    kept = keep_steps(steps, cfg["keep_points"])
    kind, label = DPO_METHODS[method][0], dpo_label(method, cfg, train)
    policy = load_policy(s)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg["dpo_lr"], weight_decay=0.0)
    log = []
    for step, idx in minibatches(n, cfg["dpo_batch"], cfg["dpo_epochs"], s.generator("dpo.order"),
                                 prompts.device, desc=method):
        pi_c = sequence_logprobs(s, policy, prompts[idx], chosen[idx])
        pi_r = sequence_logprobs(s, policy, prompts[idx], rejected[idx])
        loss = dpo_loss(pi_c, pi_r, ref_c[idx], ref_r[idx], cfg["dpo_beta"],
                        label[idx] if torch.is_tensor(label) else label, kind)
        step_on(optimizer, loss)
        margin = cfg["dpo_beta"] * ((pi_c - ref_c[idx]) - (pi_r - ref_r[idx])).detach()
        log.append({"step": step, "loss": loss.item(),
                    "reward_accuracy": (margin > 0).float().mean().item(),
                    "margin": margin.mean().item()})
        if step in kept:
            save_policy(s, policy, os.path.join(kept_folder(s, method), f"step{step:05d}.pt"),
                        method, record,
                        step, step)
    save_policy(s, policy, s.path("model_dict", f"{method}.pt"), method, record, steps, steps)
    write_json(s.path("generate_text", f"{method}_log.json"), {"run": record, "log": log})
    print(f"{method}: {steps} steps, last loss {log[-1]['loss']:.3f}, implicit-reward accuracy "
          f"{log[-1]['reward_accuracy']:.0%}")
    return log


def minibatches(n: int, batch: int, epochs: int, generator: torch.Generator, device: str,
                desc: str = "") -> Iterator[tuple[int, torch.Tensor]]:
    """(step, indices) over `epochs` passes of n items in a fresh random order each pass, `batch`
    at a time; with desc, a progress bar."""
    steps = epochs * math.ceil(n / batch)
    bar = progress(total=steps, show=bool(desc), desc=desc, unit="step")
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n, batch):
            step += 1
            yield step, order[i:i + batch]
            bar.update(1)
    bar.close()


def step_on(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def rollout(s: Setup, policy: nn.Module, reference: nn.Module, rm: RewardModel, step: int,
            gen: torch.Generator) -> dict[str, torch.Tensor]:
    """rl_group completions of each of rl_prompts train-split prompts, from the current policy,
    with the reward model's score, both models' log-probabilities of every token, the exact KL to
    the base, and the reward that RLOO optimises: the score minus rl_beta x the sampled sequence KL
    (k1) to the base."""
    cfg = s.cfg
    prompts = sample_prompts(s, "train", cfg["rl_prompts"],
                             s.generator("rl.prompts", step)).repeat_interleave(
        cfg["rl_group"], dim=0)
    completions = complete(s, policy, prompts, gen)
    with autocast(cfg["device"], cfg["dtype"]):
        ref_logits = completion_logits(reference, prompts, completions)
        old_logits = completion_logits(policy, prompts, completions)
    batch = {"prompts": prompts, "completions": completions,
             "score": reward_scores(s, rm, prompts, completions).float(),
             "ref_logprobs": token_logprobs(ref_logits, completions, TEMPERATURE),
             "old_logprobs": token_logprobs(old_logits, completions, TEMPERATURE),
             "kl_exact": exact_kl(old_logits, ref_logits, TEMPERATURE).sum(1)}
    batch["score"] = batch["score"].to(batch["old_logprobs"].device)
    batch["reward"] = kl_penalized_reward(batch["score"], batch["old_logprobs"],
                                          batch["ref_logprobs"], cfg["rl_beta"])
    return batch


@dataclasses.dataclass
class Learner:
    """What an RL update changes: the policy, its optimizer, the value model (PPO's critic, None
    for RLOO) and the generator of minibatch orders."""
    policy: nn.Module
    optimizer: torch.optim.Optimizer
    order: torch.Generator
    critic: RewardModel | None = None


def rloo_update(s: Setup, learner: Learner, batch: dict) -> tuple[torch.Tensor, dict]:
    """One REINFORCE step (one optimizer step per rollout) with each sample's reward baselined by
    the mean of the other samples of its prompt (leave-one-out)."""
    advantages = rloo_advantages(batch["reward"].view(-1, s.cfg["rl_group"]),
                                 s.cfg["rl_normalize"]).view(-1)
    loss = policy_gradient_loss(completion_logprobs(s, learner.policy, batch["prompts"],
                                                    batch["completions"]),
                                advantages)
    step_on(learner.optimizer, loss)
    return loss, {}


def ppo_update(s: Setup, learner: Learner, batch: dict) -> tuple[torch.Tensor, dict]:
    """PPO as in Stiennon et al. 2020 and InstructGPT: per-token rewards (the KL penalty at every
    token, the reward model's score at the last), the critic's values, GAE advantages (whitened)
    and returns, then ppo_epochs passes of ppo_minibatches minibatches (a new order each pass),
    each one optimizer step on the clipped policy loss plus the clipped value loss (the critic's
    parameters have their own learning rate, ppo_value_lr: with Adam a weight on the value loss
    would change nothing). Returns the last loss and mean statistics."""
    cfg, n = s.cfg, len(batch["prompts"])
    prompts, completions = batch["prompts"], batch["completions"]
    with torch.no_grad(), autocast(cfg["device"], cfg["dtype"]):
        old_values = learner.critic.token_values(prompts, completions).float()
    rewards = token_rewards(batch["score"], batch["old_logprobs"], batch["ref_logprobs"],
                            cfg["rl_beta"])
    advantages, returns = gae(rewards, old_values, cfg["ppo_gamma"], cfg["ppo_lambda"])
    advantages = whiten(advantages)
    stats = []
    for _, idx in minibatches(n, ppo_minibatch_size(cfg), cfg["ppo_epochs"], learner.order,
                              prompts.device):
        logprobs = completion_logprobs(s, learner.policy, prompts[idx], completions[idx])
        policy_loss, minibatch = ppo_loss(logprobs, batch["old_logprobs"][idx], advantages[idx],
                                          cfg["ppo_clip"])
        with autocast(cfg["device"], cfg["dtype"]):
            values = learner.critic.token_values(prompts[idx], completions[idx]).float()
        critic_loss = value_loss(values, old_values[idx], returns[idx], cfg["ppo_value_clip"])
        loss = policy_loss + critic_loss
        step_on(learner.optimizer, loss)
        stats.append(dict(minibatch, value_loss=critic_loss.item()))
    return loss, {k: sum(m[k] for m in stats) / len(stats) for k in stats[0]}


def ppo_minibatch_size(cfg: dict) -> int:
    return math.ceil(cfg["rl_prompts"] * cfg["rl_group"] / cfg["ppo_minibatches"])


def optimizer_steps_per_rollout(cfg: dict, method: str) -> int:
    """RLOO: one; PPO: one per minibatch of each pass (ppo_minibatches, or fewer when the rollout
    is small)."""
    if method == "rloo":
        return 1
    minibatches = math.ceil(cfg["rl_prompts"] * cfg["rl_group"] / ppo_minibatch_size(cfg))
    return cfg["ppo_epochs"] * minibatches


def train_rl(s: Setup, method: str, policy: nn.Module, params: list[nn.Parameter],
             rm: RewardModel, name: str,
             steps: int, keep_points: int, record: dict) -> list[dict]:
    """`steps` rollouts of RLOO or PPO on `params` of the policy against the frozen base and the
    (frozen) reward model, keeping the policy at keep_points steps (keep_steps) under `name`, each
    file with the run's `record`; returns the log, one record per step. PPO's critic starts from
    the reward model and trains with the policy, at its own learning rate."""
    cfg = s.cfg
    reference = frozen(load_policy(s))
    groups = [{"params": params, "lr": cfg["rl_lr"]}]
    critic = None
    if method == "ppo":
        critic = copy.deepcopy(rm).train()
        for p in critic.parameters():
            p.requires_grad_(True)
        groups.append({"params": list(critic.parameters()), "lr": cfg["ppo_value_lr"]})
    learner = Learner(policy, torch.optim.AdamW(groups, weight_decay=0.0),
                      s.generator("ppo.order"), critic)
    sampling = s.generator("rl.sampling", on_device=True)
    update = {"rloo": rloo_update, "ppo": ppo_update}[method]
    per_rollout, kept = optimizer_steps_per_rollout(cfg, method), keep_steps(steps, keep_points)
    clear_outputs(s, name)
    log = []
    bar = progress(total=steps, desc=name, unit="step")
    for step in range(1, steps + 1):
        batch = rollout(s, policy, reference, rm, step, sampling)
        loss, stats = update(s, learner, batch)
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(f"{name}: loss is {loss.item()} at step {step}; try a lower "
                                   "--rl_lr")
        estimators = kl_estimators(batch["old_logprobs"], batch["ref_logprobs"])
        log.append({"step": step, "rm_score": batch["score"].mean().item(),
                    "reward": batch["reward"].mean().item(),
                    "kl_exact": batch["kl_exact"].mean().item(),
                    **{f"kl_{k}": v.sum(1).mean().item() for k, v in estimators.items()}, **stats})
        bar.update(1)
        bar.set_postfix(rm=f"{log[-1]['rm_score']:+.3f}", kl=f"{log[-1]['kl_exact']:.2f}")
        if step in kept:
            save_policy(s, policy, os.path.join(kept_folder(s, name), f"step{step:05d}.pt"), name,
                        record, step,
                        step * per_rollout)
    bar.close()
    save_policy(s, policy, s.path("model_dict", f"{name}.pt"), name, record, steps,
                steps * per_rollout)
    write_json(s.path("generate_text", f"{name}_log.json"), {"run": record, "log": log})
    print(f"{name}: {steps} steps, reward-model score {log[0]['rm_score']:+.3f} -> "
          f"{log[-1]['rm_score']:+.3f}, "
          f"KL to the base {log[-1]['kl_exact']:.3f} nats per sequence")
    return log


def restrict_training(policy: nn.Module, trainable: dict[str, torch.Tensor]) -> list[nn.Parameter]:
    """Train only the entries where the mask (an LB-GPT-layout state dict of 0/1) is 1: parameters
    with none are frozen, the others have their gradients masked. With AdamW and no weight decay a
    masked entry gets a zero update, so it stays bitwise unchanged. Returns the parameters to
    optimise."""
    masks = convert_state_dict(trainable, "LB-GPT", policy.layout, policy.config.n_head)
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
