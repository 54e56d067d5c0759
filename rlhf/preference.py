"""Preference tuning, the parts with math in them: noisy Bradley-Terry labels, the reward model and
its loss, log-probabilities and KL (exact and estimated), DPO (with cDPO and IPO), RLOO, PPO
(per-token rewards, GAE, clipped policy and value losses), best-of-n. python -m rlhf runs them.

Shapes: B sequences, L completion tokens, V vocabulary. Sampled completions have a fixed length;
pairs read from a file have any lengths, right-padded with PAD, and every function here that reads
a completion skips its padding.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualgpt.sampling import NextTokenLogits

PAD = -1  # fills prompts and completions of different lengths on the right; no token has this id

# -----------------------------------------------------------------------------------------
# Labels


def preference_probability(oracle_a: torch.Tensor, oracle_b: torch.Tensor,
                           tau: float) -> torch.Tensor:
    """Bradley-Terry: P(a preferred to b) = sigmoid((oracle_a - oracle_b) / tau)."""
    return torch.sigmoid((oracle_a - oracle_b) / tau)


def tau_for_agreement(oracle_differences: torch.Tensor, agreement: float) -> float:
    """The tau at which noisy labels agree with the oracle's preference `agreement` of the time, on
    average over the pairs whose oracle scores differ (ties carry no preference): solves
    mean(sigmoid(|d| / tau)) = agreement by bisection (the mean falls as tau grows)."""
    d = oracle_differences.abs()[oracle_differences != 0].double()
    if len(d) == 0 or not 0.5 < agreement < 1:
        raise ValueError("need pairs with different oracle scores and an agreement in (0.5, 1)")
    low, high = 1e-6, 1e6
    for _ in range(200):
        tau = math.sqrt(low * high)
        if torch.sigmoid(d / tau).mean().item() > agreement:
            low = tau
        else:
            high = tau
    return math.sqrt(low * high)


# -----------------------------------------------------------------------------------------
# Log-probabilities and KL


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token) under the distribution sampling draws from: softmax(logits / temperature).
    (..., V), (...)
    -> (...). Every log-probability in preference tuning goes through here, so none is taken at
    another temperature than the one the tokens were sampled at."""
    logprobs = F.log_softmax(logits.float() / temperature,
                             dim=-1).gather(-1, tokens.clamp_min(0).unsqueeze(-1))
    # padding: 0, so a row's sum is its completion's
    return logprobs.squeeze(-1).masked_fill(tokens == PAD, 0.0)


def trimmed(ids: torch.Tensor) -> torch.Tensor:
    """Without the columns that are padding in every row (a minibatch of short pairs of a file that
    has long ones), so that no work is spent on them."""
    return ids[:, :max(1, int((ids != PAD).sum(1).max()))]


def completion_states(body: nn.Module, prompts: torch.Tensor,
                      completions: torch.Tensor) -> torch.Tensor:
    """The final hidden states that read a completion, from one forward pass: at the position
    before each of its tokens, then after its last token: (B, L + 1, C). Prompts (B, P) and
    completions (B, L) may be right-padded with PAD; each row is packed as its prompt's tokens, its
    completion's, then padding. Padding on the right changes nothing before it (the model is
    causal, positions count from the first token), so a padded row's states are those of the row
    alone. After the end of a shorter completion the states are padding's: unused."""
    prompt_lengths = (prompts != PAD).sum(1, keepdim=True)  # (B, 1)
    completion_lengths = (completions != PAD).sum(1, keepdim=True)
    length = completions.shape[1]
    # (B, L): each completion token's position
    where = prompt_lengths + torch.arange(length, device=prompts.device)
    ids = torch.cat([prompts, torch.full_like(completions, PAD)],
                    dim=1).scatter(1, where, completions)
    # the longest row: the columns after it are all padding
    width = int((prompt_lengths + completion_lengths).max())
    # (B, width, C); padding reads as token 0, unseen
    states = body.hidden_states(ids[:, :width].clamp_min(0))
    read = (prompt_lengths - 1 + torch.arange(length + 1,
                                              device=prompts.device)).clamp_max(width - 1)
    return states.gather(1, read.unsqueeze(-1).expand(-1, -1, states.shape[-1]))


def completion_logits(model: nn.Module, prompts: torch.Tensor,
                      completions: torch.Tensor) -> torch.Tensor:
    """The logits that predict each completion token, (B, L, V); the output head runs on those
    positions only (on the prompt's it would be work for nothing)."""
    return model.lm_head(completion_states(model, prompts, completions)[:, :-1])


def exact_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p || q) over the whole vocabulary at each position (the vocabulary is small enough to sum
    over)."""
    logp = F.log_softmax(logits_p.float() / temperature, dim=-1)
    logq = F.log_softmax(logits_q.float() / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_estimators(logp: torch.Tensor, logq: torch.Tensor) -> dict[str, torch.Tensor]:
    """Monte-Carlo estimators of KL(p || q) from samples of p, per sample (Schulman, "Approximating
    KL divergence"): k1 = log p/q (unbiased, high variance), k2 = (log p/q)^2 / 2 (biased, low
    variance), k3 = (q/p - 1) - log q/p (unbiased, low variance, never negative)."""
    log_ratio = logp - logq
    return {"k1": log_ratio, "k2": log_ratio ** 2 / 2, "k3": torch.expm1(-log_ratio) + log_ratio}


def sample_tokens(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (B, V), drawn exactly from it by inverse CDF: a uniform number
    located in the running sum. 30x faster than torch.multinomial for a batch of 256 over 8192
    tokens on a CPU, which dominated the time of every RLHF stage. A token of probability 0 is
    never drawn."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: torch.Tensor, length: int, temperature: float,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """length tokens after each prompt (B, P), sampled at temperature with no top-k/top-p, with the
    log-probability of each as it was sampled: (B, L) tokens, (B, L) log-probabilities. Uses the
    model's KV cache (gpt_.py) when it has one."""
    model.eval()
    next_token_logits = NextTokenLogits(model)
    ids, logprobs = prompts, []
    for _ in range(length):
        logits = next_token_logits(ids).float()
        token = sample_tokens(F.softmax(logits / temperature, dim=-1), generator)  # (B,)
        logprobs.append(token_logprobs(logits, token, temperature))
        ids = torch.cat([ids, token[:, None]], dim=1)
    return ids[:, prompts.shape[1]:], torch.stack(logprobs, dim=1)


# -----------------------------------------------------------------------------------------
# The reward model


class RewardModel(nn.Module):
    """A GPT body with a scalar head on the last token's final hidden state: one score per
    sequence."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        # beside the body (CUDA too)
        self.head = nn.Linear(body.config.n_embd, 1, device=body.wte.weight.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """The score of each completion after its prompt (either may be right-padded with PAD):
        (B,)."""
        states = completion_states(self.body, prompts, completions)  # (B, L + 1, C)
        last = states[torch.arange(len(states), device=states.device), (completions != PAD).sum(1)]
        return self.head(last).squeeze(-1)

    def token_values(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """The score read at every state before a completion token (prompt + the completion so
        far): PPO's values V(s_t), (B, L), when this model is the value model (started from the
        reward model, as in Stiennon et al. 2020)."""
        return self.head(completion_states(self.body, prompts, completions)[:, :-1]).squeeze(-1)


def reward_model_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                      label: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood of the labels: P(chosen preferred) = sigmoid(r_c -
    r_r); label is the probability that the chosen side is preferred (1 for a hard label)."""
    margin = chosen - rejected
    return -(label * F.logsigmoid(margin) + (1 - label) * F.logsigmoid(-margin)).mean()


# -----------------------------------------------------------------------------------------
# Policy losses


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, beta: float,
             label: torch.Tensor | float = 1.0, kind: str = "sigmoid") -> torch.Tensor:
    """The preference loss on log-probabilities (B,), with h = log(pi(c) / pi_ref(c)) -
    log(pi(r) / pi_ref(r)):
    - "sigmoid", DPO (Rafailov et al. 2023, eq. 7): the reward-model loss on the implicit reward
      beta * h, -[label log sigmoid(beta h) + (1 - label) log sigmoid(-beta h)]. label 1 is DPO
      on hard labels; 1 - eps is conservative DPO (Mitchell 2023: labels flipped with probability
      eps).
    - "ipo", IPO (Azar et al. 2023, eq. 17), beta its tau: (h - (label - 1/2) / tau)^2, which for
      label 1 is (h - 1 / (2 tau))^2, a regression to a finite margin instead of a push to
      infinity. TRL (and the dpo stage) give it per-token mean log-probabilities."""
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if kind == "ipo":
        return ((h - (label - 0.5) / beta) ** 2).mean()
    return reward_model_loss(beta * h, torch.zeros_like(h), label)


def dpo_family_loss(kind: str, policy: tuple[torch.Tensor, torch.Tensor],
                    reference: tuple[torch.Tensor, torch.Tensor],
                    lengths: tuple[torch.Tensor, torch.Tensor], strength: float | None,
                    label: torch.Tensor | float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A DPO-family loss from the summed log-probabilities (B,) of the chosen and rejected sides
    under the policy and the reference, and their token counts: "sigmoid" (DPO, cDPO) on the
    sums; "ipo" on per-token means, as TRL's IPO, so that its target margin 1 / (2 tau) is per
    token; "nll" (Preferred-FT) the chosen side's negative log-likelihood per token. Returns
    the loss and, in TRL's names, the log-probabilities it read and (but for nll) the implicit
    rewards strength x (log pi - log pi_ref) of both sides."""
    per = lengths if kind == "ipo" else (1.0, 1.0)
    (pi_c, pi_r), (ref_c, ref_r) = ((a / per[0], b / per[1]) for a, b in (policy, reference))
    stats = {"logps/chosen": pi_c.detach(), "logps/rejected": pi_r.detach()}
    if kind == "nll":
        return -policy[0].sum() / lengths[0].sum(), stats
    stats["rewards/chosen"] = strength * (pi_c - ref_c).detach()
    stats["rewards/rejected"] = strength * (pi_r - ref_r).detach()
    return dpo_loss(pi_c, pi_r, ref_c, ref_r, strength, label, kind), stats


def kl_penalized_reward(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                        beta: float) -> torch.Tensor:
    """The RL reward of each completion: its score minus beta x its sampled sequence KL to the
    reference, the sum over its tokens of log pi - log pi_ref (k1). (B,), (B, L), (B, L) ->
    (B,)."""
    return score - beta * (logprobs - ref_logprobs).sum(1)


def rloo_advantages(rewards: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each of the G samples of a prompt is
    baselined by the mean reward of the other G - 1. rewards (prompts, G) -> advantages (prompts,
    G). A group whose rewards are all equal gets advantage 0 (normalize divides by the group's std
    where it is not 0)."""
    G = rewards.shape[1]
    # r_i - mean of the others
    advantages = (rewards - rewards.mean(dim=1, keepdim=True)) * G / (G - 1)
    if normalize:
        std = rewards.std(dim=1, keepdim=True)
        advantages = torch.where(std > 0, advantages / std.clamp_min(1e-12),
                                 torch.zeros_like(advantages))
    return advantages


def policy_gradient_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE: -advantage x log pi(sequence), averaged over sequences and tokens. (B, L),
    (B,)."""
    return -(advantages[:, None] * logprobs).mean()


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             clip: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate per token, -min(r A, clip(r, 1 - clip, 1 + clip) A) averaged over
    tokens, with r = pi / pi_old. advantages: per token (B, L), or per sequence (B,) for every
    token of it. Returns the loss and TRL's statistics: the fraction of tokens where the clipped
    term is the one taken, the approximate KL to the old policy (k2: (log r)^2 / 2) and the mean
    ratio."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    a = advantages if advantages.dim() == 2 else advantages[:, None]
    unclipped, clipped = -ratio * a, -ratio.clamp(1 - clip, 1 + clip) * a
    loss = torch.max(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {"policy/clipfrac_avg": (clipped > unclipped).float().mean().item(),
                 "policy/approxkl_avg": kl_estimators(old_logprobs, logprobs)["k2"].mean().item(),
                 "val/ratio": ratio.mean().item()}
    return loss, stats


def grpo_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, TRL's GRPOTrainer): each of the G
    samples of a prompt minus the mean reward of its group, divided by the group's standard
    deviation plus 1e-4 where scale (TRL's scale_rewards="group"); Dr. GRPO (Liu et al. 2025)
    leaves the division out. rewards (prompts, G) -> advantages (prompts, G)."""
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + 1e-4)
    return advantages


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, clip: float,
              beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's loss as TRL computes it: PPO's clipped surrogate with the sequence's advantage at
    every token, plus beta x the k3 estimate of the KL to the reference at each token (the KL in
    the loss, not in the reward), averaged over tokens. TRL's loss types (grpo, bnpo, dr_grpo,
    dapo) divide the sum over tokens by different counts, which for completions of one length, as
    here, all make this mean. (B, L), (B, L), (B, L), (B,) -> the loss and ppo_loss's statistics
    with TRL's kl (k3, per token)."""
    surrogate, stats = ppo_loss(logprobs, old_logprobs, advantages, clip)
    kl = kl_estimators(logprobs, ref_logprobs)["k3"]
    return surrogate + beta * kl.mean(), stats | {"kl": kl.mean().item()}


def token_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """PPO's reward per token (Stiennon et al. 2020, Ziegler et al. 2019): -beta x (log pi - log
    pi_ref) at each token, plus the reward model's score at the last. (B,), (B, L), (B, L) -> (B,
    L); its sum over tokens is kl_penalized_reward."""
    rewards = -beta * (logprobs - ref_logprobs)
    rewards[:, -1] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) along the completion: delta_t = r_t
    + gamma V_{t+1} - V_t (V after the last token is 0: the episode ends), A_t = delta_t + gamma
    lam A_{t+1}. (B, L), (B, L) -> advantages (B, L) and returns A + V, the value targets."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def whiten(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the whole batch (PPO's advantages)."""
    return (x - x.mean()) / (x.std() + 1e-8)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float) -> torch.Tensor:
    """PPO's clipped value loss: 1/2 max((V - R)^2, (V_clipped - R)^2), with V_clipped within clip
    of the values at rollout time, averaged over tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2).mean()


# -----------------------------------------------------------------------------------------
# Best-of-n


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) for a continuous score (Stiennon et al. 2020; an upper bound
    otherwise)."""
    return math.log(n) - (n - 1) / n


def best_of_n_expectation(scores: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The expected value of the sample that best-of-n selects by score, for n drawn without
    replacement from N samples per prompt: every sample weighted by the chance it is the
    highest-scored of n, which is C(rank, n - 1) / C(N, n) for the sample of 0-based rank `rank` in
    ascending score. (P, N), (P, N) -> (P,). Uses all N samples for every n, so it is unbiased and
    has less variance than drawing groups."""
    N = scores.shape[1]
    order = scores.argsort(dim=1)
    ranked = values.gather(1, order).double()
    weights = torch.tensor([math.comb(rank, n - 1) / math.comb(N, n) for rank in range(N)],
                           dtype=torch.float64)
    return ranked @ weights
