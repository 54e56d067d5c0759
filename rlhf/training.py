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
from rlhf.preference import (PAD, RewardModel, completion_logits, dpo_family_loss, exact_kl, gae,
                             grpo_advantages, grpo_loss, kl_estimators, kl_penalized_reward,
                             policy_gradient_loss, ppo_loss, reward_model_loss, rloo_advantages,
                             token_logprobs, token_rewards, value_loss, whiten)
from rlhf.study import (CHUNK, TEMPERATURE, Setup, chosen_rejected, clear_outputs, complete,
                        completion_logprobs, frozen, keep_kls, kept_folder, load_policy,
                        reward_scores, sample_prompts, save_policy, sequence_logprobs)

# the DPO family and each one's loss: cdpo smooths DPO's labels by cdpo_epsilon (TRL's
# label_smoothing, picked on the dev split); preferred_ft fine-tunes on the chosen side (the DPO
# paper's "Preferred-FT")
DPO_METHODS = {"dpo": "sigmoid", "cdpo": "sigmoid", "ipo": "ipo", "preferred_ft": "nll"}
STANDARDISE_SAMPLES = 512  # base samples of dev prompts that set the reward model's scale
# the DPO family measures its KL on 32 samples at each of the first 16 steps (where it grows
# fastest), then every 4 steps
KL_EVERY, KL_EARLY, KL_PROMPTS = 4, 16, 32


def train_reward_model(s: Setup, pairs: dict) -> tuple[RewardModel, dict]:
    """A reward model: the base GPT with a scalar head on the last token, trained on the train
    pairs' labels (Bradley-Terry), then standardised: returns it and its raw scale."""
    cfg = s.cfg
    rm = RewardModel(load_policy(s)).train()
    optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg["rm_lr"], weight_decay=0.0)
    chosen, rejected = chosen_rejected(pairs["train"])
    prompts = pairs["train"]["prompts"]
    for _, idx in minibatches(len(prompts), cfg["rm_batch"], cfg["rm_epochs"],
                              s.generator("rm.order"), prompts.device, desc="reward model"):
        with autocast(cfg["device"], cfg["dtype"]):
            r_c = rm(prompts[idx], chosen[idx]).float()
            r_r = rm(prompts[idx], rejected[idx]).float()
        step_on(optimizer, reward_model_loss(r_c, r_r))
    return rm, standardise(s, rm)


@torch.no_grad()
def standardise(s: Setup, rm: RewardModel) -> dict:
    """Rescale the reward model's head so that its scores of the base's samples of dev prompts
    have mean 0 and std 1: one KL scale, so that rl_beta pulls as hard in every seed (a
    Bradley-Terry model's scale is whatever training left). Returns the raw mean and std."""
    prompts = sample_prompts(s, "dev", STANDARDISE_SAMPLES, s.generator("rm.standardise"))
    completions = complete(s, load_policy(s), prompts,
                           s.generator("rm.standardise", 1, on_device=True))
    raw = reward_scores(s, rm, prompts, completions)
    mean, std = raw.mean().item(), raw.std().item()
    rm.head.weight.div_(std)
    rm.head.bias.sub_(mean).div_(std)
    return {"raw_mean": mean, "raw_std": std}


@dataclasses.dataclass
class PairInputs:
    """What every DPO-family run reads: the train pairs' prompts, their chosen and rejected sides,
    their lengths, and the frozen base's summed log-probabilities of both (computed once)."""
    prompts: torch.Tensor
    sides: tuple[torch.Tensor, torch.Tensor]
    lengths: tuple[torch.Tensor, torch.Tensor]
    reference: tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def pair_inputs(s: Setup, pairs: dict) -> PairInputs:
    sides, prompts = chosen_rejected(pairs), pairs["prompts"]
    base = load_policy(s)
    reference = tuple(torch.cat([sequence_logprobs(s, base, prompts[i:i + CHUNK],
                                                   side[i:i + CHUNK])
                                 for i in range(0, len(prompts), CHUNK)]) for side in sides)
    lengths = tuple((side != PAD).sum(1).float() for side in sides)
    return PairInputs(prompts, sides, lengths, reference)


@torch.no_grad()
def sampled_kl(s: Setup, policy: nn.Module, reference: nn.Module, prompts: torch.Tensor,
               gen: torch.Generator) -> torch.Tensor:
    """The exact KL to the reference at each position of the policy's own samples of the
    prompts, (N, completion_tokens)."""
    completions = complete(s, policy, prompts, gen)
    with autocast(s.cfg["device"], s.cfg["dtype"]):
        logits = completion_logits(policy, prompts, completions)
        ref_logits = completion_logits(reference, prompts, completions)
    return exact_kl(logits, ref_logits, TEMPERATURE)


class Keeper:
    """Keeps a run's policy in its folder the first time the run's KL to the base crosses each of
    `kls`, at each step of `steps`, and at the end, each file with the run's record, its step and
    the KL that was measured."""

    def __init__(self, s: Setup, name: str, record: dict, kls: list[float],
                 steps: set[int] = frozenset()):
        self.s, self.name, self.record = s, name, record
        self.kls, self.steps = list(kls), steps
        clear_outputs(s, name)

    def consider(self, policy: nn.Module, step: int, kl: float | None = None) -> None:
        crossed = [k for k in self.kls if kl is not None and kl >= k]
        self.kls = [k for k in self.kls if k not in crossed]
        if step > 0 and (crossed or step in self.steps):
            self.keep(policy, step, kl, os.path.join(kept_folder(self.s, self.name),
                                                     f"step{step:05d}.pt"))

    def keep(self, policy: nn.Module, step: int, kl: float | None, path: str) -> None:
        save_policy(self.s, policy, path, self.name, self.record, step,
                    **({} if kl is None else {"train_kl": kl}))

    def finish(self, policy: nn.Module, step: int, log: list[dict]) -> None:
        """The final policy, also as the last kept file (unless the last step kept it), and the
        log; a run that ended short of a keep point says so (the targets past it get no
        reading)."""
        if self.kls:
            more = "--rl_steps" if "objective/scores" in log[0] else "--dpo_epochs"
            print(f"note: {self.name} ended before its KL to the base reached "
                  f"{min(self.kls):g} nats: the KL targets from there on get no reading from it; "
                  f"give it more steps ({more}) or a higher learning rate")
        last = os.path.join(kept_folder(self.s, self.name), f"step{step:05d}.pt")
        if not os.path.exists(last):  # the folder started empty: this run's own
            self.keep(policy, step, None, last)
        self.keep(policy, step, None, self.s.path("model_dict", f"{self.name}.pt"))
        write_json(self.s.path("generate_text", f"{self.name}_log.json"),
                   {"run": self.record, "log": log})


def decaying_optimizer(groups: list[dict], steps: int) -> tuple[torch.optim.Optimizer,
                                                               torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay) whose learning rate decays linearly to 0 over `steps` steps (TRL's
    default schedule)."""
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)


def train_dpo(s: Setup, method: str, inputs: PairInputs, record: dict, name: str) -> list[dict]:
    """One DPO-family loss from the base on the train pairs against the frozen base, keeping the
    policy where its KL (measured on KL_PROMPTS samples of train prompts) crosses keep_kls;
    returns the log, in TRL's names."""
    cfg = s.cfg
    (chosen, rejected), (ref_c, ref_r), prompts = inputs.sides, inputs.reference, inputs.prompts
    n = len(prompts)
    steps = cfg["dpo_epochs"] * math.ceil(n / cfg["dpo_batch"])
    kind, lr = DPO_METHODS[method], cfg[f"{method}_lr"]
    strength = cfg.get("ipo_tau" if method == "ipo" else f"{method}_beta")  # preferred_ft: none
    label = 1 - cfg["cdpo_epsilon"] if method == "cdpo" else 1.0
    policy = load_policy(s)
    reference = frozen(policy)  # the base, before any step
    optimizer, schedule = decaying_optimizer([{"params": list(policy.parameters()), "lr": lr}],
                                             steps)
    keeper = Keeper(s, name, record, keep_kls(cfg))
    kl_prompts = sample_prompts(s, "train", KL_PROMPTS, s.generator("dpo.kl_prompts"))
    log = []
    for step, idx in minibatches(n, cfg["dpo_batch"], cfg["dpo_epochs"], s.generator("dpo.order"),
                                 prompts.device, desc=name):
        loss, stats = dpo_family_loss(
            kind, (sequence_logprobs(s, policy, prompts[idx], chosen[idx]),
                   sequence_logprobs(s, policy, prompts[idx], rejected[idx])),
            (ref_c[idx], ref_r[idx]), (inputs.lengths[0][idx], inputs.lengths[1][idx]),
            strength, label)
        entry = {"step": step, "loss": loss.item(),
                 **step_on(optimizer, loss, schedule, cfg["max_grad_norm"]),
                 **{k: v.mean().item() for k, v in stats.items()}}
        if kind != "nll":
            margins = stats["rewards/chosen"] - stats["rewards/rejected"]
            entry.update({"rewards/margins": margins.mean().item(),
                          "rewards/accuracies": (margins > 0).float().mean().item()})
        if step <= KL_EARLY or step % KL_EVERY == 0:
            entry["exact_kl"] = sampled_kl(s, policy, reference, kl_prompts,
                                               s.generator("dpo.kl_sampling", step,
                                                           on_device=True)).sum(1).mean().item()
            keeper.consider(policy, step, entry["exact_kl"])
        log.append(entry)
    keeper.finish(policy, steps, log)
    print(f"{name}: {steps} steps, last loss {log[-1]['loss']:.3f}"
          + (f", implicit-reward accuracy {log[-1]['rewards/accuracies']:.0%}"
             if kind != "nll" else ""))
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


def step_on(optimizer: torch.optim.Optimizer, loss: torch.Tensor,
            schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
            max_grad_norm: float | None = None) -> dict:
    """One optimizer step on the loss; with max_grad_norm, the gradient's norm over every
    parameter clipped to it first (the norm before clipping and the learning rate returned), then
    the schedule's step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    stats = {}
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        stats = {"grad_norm": nn.utils.clip_grad_norm_(params, max_grad_norm).item(),
                 "learning_rate": optimizer.param_groups[0]["lr"]}
    optimizer.step()
    if schedule is not None:
        schedule.step()
    return stats


@torch.no_grad()
def rollout(s: Setup, policy: nn.Module, reference: nn.Module, rm: RewardModel, step: int,
            gen: torch.Generator) -> dict[str, torch.Tensor]:
    """rl_group completions of each of rl_prompts train-split prompts, from the current policy,
    with the reward model's score, both models' log-probabilities of every token, the exact KL to
    the base and the policy's entropy (each summed over the completion), and the reward that RLOO
    optimises: the score minus rl_beta x the sampled sequence KL (k1) to the base."""
    cfg = s.cfg
    prompts = sample_prompts(s, "train", cfg["rl_prompts"],
                             s.generator("rl.prompts", step)).repeat_interleave(
        cfg["rl_group"], dim=0)
    completions = complete(s, policy, prompts, gen)
    with autocast(cfg["device"], cfg["dtype"]):
        ref_logits = completion_logits(reference, prompts, completions)
        old_logits = completion_logits(policy, prompts, completions)
    logp = torch.log_softmax(old_logits.float() / TEMPERATURE, dim=-1)
    batch = {"prompts": prompts, "completions": completions,
             "score": reward_scores(s, rm, prompts, completions).float(),
             "ref_logprobs": token_logprobs(ref_logits, completions, TEMPERATURE),
             "old_logprobs": token_logprobs(old_logits, completions, TEMPERATURE),
             "kl_exact": exact_kl(old_logits, ref_logits, TEMPERATURE).sum(1),
             "entropy": -(logp.exp() * logp).sum(-1).sum(1)}
    batch["score"] = batch["score"].to(batch["old_logprobs"].device)
    batch["reward"] = kl_penalized_reward(batch["score"], batch["old_logprobs"],
                                          batch["ref_logprobs"], cfg["rl_beta"])
    return batch


@dataclasses.dataclass
class Learner:
    """What an RL update changes: the policy, its optimizer and schedule, the value model (PPO's
    critic, None for RLOO) and the generator of minibatch orders."""
    policy: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    order: torch.Generator
    critic: RewardModel | None = None


def rloo_update(s: Setup, learner: Learner, batch: dict) -> dict:
    """One REINFORCE step (one optimizer step per rollout) with each sample's reward baselined by
    the mean of the other samples of its prompt (leave-one-out)."""
    advantages = rloo_advantages(batch["reward"].view(-1, s.cfg["rl_group"]),
                                 s.cfg["rl_normalize"]).view(-1)
    loss = policy_gradient_loss(completion_logprobs(s, learner.policy, batch["prompts"],
                                                    batch["completions"]),
                                advantages)
    return {"loss/policy_avg": loss.item(),
            **step_on(learner.optimizer, loss, learner.schedule, s.cfg["max_grad_norm"])}


def minibatch_passes(s: Setup, learner: Learner, batch: dict, loss_of) -> dict:
    """PPO's and GRPO's update: ppo_epochs passes over a rollout's samples in ppo_minibatches
    minibatches (a new order each pass), one optimizer step each on loss_of(indices) -> (loss,
    statistics); then the learning rate decays by one rollout, as TRL's by update. Returns the
    minibatches' mean statistics."""
    cfg, stats = s.cfg, []
    prompts = batch["prompts"]
    size = math.ceil(len(prompts) / cfg["ppo_minibatches"])
    for _, idx in minibatches(len(prompts), size, cfg["ppo_epochs"], learner.order,
                              prompts.device):
        loss, minibatch = loss_of(idx)
        stats.append(minibatch | step_on(learner.optimizer, loss, None, cfg["max_grad_norm"]))
    learner.schedule.step()
    return {k: sum(m[k] for m in stats) / len(stats) for k in stats[0]}


def ppo_update(s: Setup, learner: Learner, batch: dict) -> dict:
    """PPO as in Stiennon et al. 2020 and InstructGPT: per-token rewards (the KL penalty at every
    token, the reward model's score at the last), the critic's values, GAE advantages (whitened)
    and returns, then minibatch_passes on the clipped policy loss plus the clipped value loss (the
    critic's parameters have their own learning rate, ppo_value_lr: with Adam a weight on the
    value loss would change nothing), the gradient of both clipped together as TRL's PPO does."""
    cfg = s.cfg
    prompts, completions = batch["prompts"], batch["completions"]
    with torch.no_grad(), autocast(cfg["device"], cfg["dtype"]):
        old_values = learner.critic.token_values(prompts, completions).float()
    rewards = token_rewards(batch["score"], batch["old_logprobs"], batch["ref_logprobs"],
                            cfg["rl_beta"])
    advantages, returns = gae(rewards, old_values, cfg["ppo_gamma"], cfg["ppo_lambda"])
    advantages = whiten(advantages)

    def loss_of(idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logprobs = completion_logprobs(s, learner.policy, prompts[idx], completions[idx])
        policy_loss, stats = ppo_loss(logprobs, batch["old_logprobs"][idx], advantages[idx],
                                      cfg["ppo_clip"])
        with autocast(cfg["device"], cfg["dtype"]):
            values = learner.critic.token_values(prompts[idx], completions[idx]).float()
        critic_loss = value_loss(values, old_values[idx], returns[idx], cfg["ppo_value_clip"])
        return policy_loss + critic_loss, stats | {"loss/policy_avg": policy_loss.item(),
                                                    "loss/value_avg": critic_loss.item()}

    explained = 1 - (returns - old_values).var() / returns.var().clamp_min(1e-12)
    return minibatch_passes(s, learner, batch, loss_of) | {
        "explained_variance": explained.item()}  # ours: TRL's PPO does not log it


def grpo_update(s: Setup, learner: Learner, batch: dict) -> dict:
    """GRPO (Shao et al. 2024) as TRL's GRPOTrainer: the reward model's score, its advantage
    within the prompt's group (divided by the group's std, or not: Dr. GRPO, grpo_scale=none),
    then minibatch_passes on the clipped surrogate plus grpo_beta x the k3 KL to the base at each
    token. The KL is in the loss, so batch["reward"] (RLOO's) plays no part."""
    cfg = s.cfg
    scores = batch["score"].view(-1, cfg["rl_group"])
    advantages = grpo_advantages(scores, cfg["grpo_scale"] == "group").view(-1)

    def loss_of(idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logprobs = completion_logprobs(s, learner.policy, batch["prompts"][idx],
                                       batch["completions"][idx])
        loss, stats = grpo_loss(logprobs, batch["old_logprobs"][idx], batch["ref_logprobs"][idx],
                                advantages[idx], cfg["ppo_clip"], cfg["grpo_beta"])
        return loss, stats | {"loss/policy_avg": loss.item()}

    return minibatch_passes(s, learner, batch, loss_of) | {
        "reward_std": scores.std(dim=1).mean().item(),
        "frac_reward_zero_std": (scores.std(dim=1) == 0).float().mean().item()}


def train_rl(s: Setup, method: str, policy: nn.Module, params: list[nn.Parameter],
             rm: RewardModel, name: str, steps: int, record: dict,
             keep_at: set[int] = frozenset()) -> list[dict]:
    """`steps` rollouts of RLOO or PPO on `params` of the policy against the frozen base and the
    (frozen) reward model, keeping the policy under `name` where the rollouts' KL first crosses
    keep_kls (the policy that sampled them, before that step's update) and after the steps of
    keep_at, each file with the run's `record`; returns the log, one entry per step, in TRL's
    names. PPO's critic starts from the reward model and trains with the policy, at its own
    learning rate. The learning rates decay linearly to 0; gradients are clipped."""
    cfg = s.cfg
    reference = frozen(load_policy(s))
    groups = [{"params": params, "lr": cfg[f"{method}_lr"]}]
    critic = None
    if method == "ppo":
        critic = copy.deepcopy(rm).train()
        for p in critic.parameters():
            p.requires_grad_(True)
        groups.append({"params": list(critic.parameters()), "lr": cfg["ppo_value_lr"]})
    learner = Learner(policy, *decaying_optimizer(groups, steps), s.generator("ppo.order"),
                      critic)
    sampling = s.generator("rl.sampling", on_device=True)
    update = {"rloo": rloo_update, "ppo": ppo_update, "grpo": grpo_update}[method]
    keeper = Keeper(s, name, record, keep_kls(cfg) if not keep_at else [], keep_at)
    log = []
    bar = progress(total=steps, desc=name, unit="step")
    for step in range(1, steps + 1):
        batch = rollout(s, policy, reference, rm, step, sampling)
        keeper.consider(policy, step - 1, batch["kl_exact"].mean().item())
        stats = update(s, learner, batch)
        if not math.isfinite(stats["loss/policy_avg"]):
            raise TrainingDiverged(f"{name}: loss is {stats['loss/policy_avg']} at step {step}; "
                                   f"try a lower --{method}_lr")
        estimators = kl_estimators(batch["old_logprobs"], batch["ref_logprobs"])
        stats["lr"] = stats.pop("learning_rate")  # TRL's RL trainers' name
        log.append({"step": step, "objective/scores": batch["score"].mean().item(),
                    "objective/rlhf_reward": batch["reward"].mean().item(),
                    "objective/non_score_reward": (batch["reward"] - batch["score"]).mean().item(),
                    "objective/kl": estimators["k1"].sum(1).mean().item(),
                    "objective/entropy": batch["entropy"].mean().item(),
                    # ours, not TRL's: the k3 estimate and the exact KL over the vocabulary
                    "kl_k3": estimators["k3"].sum(1).mean().item(),
                    "exact_kl": batch["kl_exact"].mean().item(), **stats})
        keeper.consider(policy, step)
        bar.update(1)
        bar.set_postfix(rm=f"{log[-1]['objective/scores']:+.3f}",
                        kl=f"{log[-1]['exact_kl']:.2f}")
    bar.close()
    keeper.finish(policy, steps, log)
    print(f"{name}: {steps} steps, reward-model score {log[0]['objective/scores']:+.3f} -> "
          f"{log[-1]['objective/scores']:+.3f}, "
          f"KL to the base {log[-1]['exact_kl']:.3f} nats per sequence")
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
