"""Preference tuning's math against independent references: closed-form optima on a toy bandit,
torch.distributions, the papers' formulas written out, brute force."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import gpt
import gpt_
from dualgpt import UserError
from rlhf import preference
from rlhf.oracles import (JUDGE_NEGATIVE, JUDGE_POSITIVE, SCORE_NEGATIVE, SCORE_POSITIVE, get_oracle, same_family,
                          dialogue, syllables, verse, words)
from rlhf.study import frozen

# --- a toy bandit: 5 actions, a reference policy and a reward; the KL-regularised optimum is known ----------

REF = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10], dtype=torch.float64)
REWARD = torch.tensor([0.0, 0.6, -0.4, 1.0, 0.3], dtype=torch.float64)
BETA = 0.5
OPTIMUM = REF * torch.exp(REWARD / BETA) / (REF * torch.exp(REWARD / BETA)).sum()  # pi_ref exp(r / beta) / Z


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


def all_pairs():
    pairs = list(itertools.combinations(range(len(REF)), 2))
    return torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])


def test_dpo_with_soft_labels_reaches_the_closed_form_optimum():
    i, j = all_pairs()
    label = torch.sigmoid(REWARD[i] - REWARD[j])  # Bradley-Terry preferences of the true reward
    logits = REF.log().clone().requires_grad_(True)  # the policy starts at the reference
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for _ in range(2000):
        logp = F.log_softmax(logits, dim=0)
        loss = preference.dpo_loss(logp[i], logp[j], REF.log()[i], REF.log()[j], BETA, label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert total_variation(F.softmax(logits, 0).detach(), OPTIMUM) < 0.02


def rloo(reward_of, steps=1500, group=256, lr=0.05, seed=0):
    """RLOO with the KL in the reward, on the bandit: G actions sampled per step from the current policy."""
    gen = torch.Generator().manual_seed(seed)
    logits = REF.log().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    for _ in range(steps):
        logp = F.log_softmax(logits, dim=0)
        actions = torch.multinomial(logp.exp().detach(), group, replacement=True, generator=gen)
        sampled = logp[actions][:, None]  # (G, 1): a one-token "sequence"
        reward = reward_of(actions) - BETA * (sampled.detach().squeeze(1) - REF.log()[actions])
        advantages = preference.rloo_advantages(reward[None, :]).squeeze(0)
        loss = preference.policy_gradient_loss(sampled, advantages)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return F.softmax(logits, 0).detach()


def test_rloo_with_the_kl_in_the_reward_reaches_the_closed_form_optimum():
    assert total_variation(rloo(lambda a: REWARD[a]), OPTIMUM) < 0.02


def test_a_reward_model_learns_the_reward_up_to_a_constant():
    i, j = all_pairs()
    label = torch.sigmoid(REWARD[i] - REWARD[j])
    learned = torch.zeros(len(REF), dtype=torch.float64, requires_grad=True)  # a reward model: one score per action
    optimizer = torch.optim.Adam([learned], lr=0.05)
    for _ in range(2000):
        loss = preference.reward_model_loss(learned[i], learned[j], label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    shift = (REWARD - learned.detach()).mean()
    # the reward, up to a constant, which RLOO's leave-one-out advantages ignore: RLOO on it reaches the
    # optimum, as test_rloo_with_the_kl_in_the_reward_reaches_the_closed_form_optimum shows
    assert (learned.detach() + shift - REWARD).abs().max().item() < 1e-3


def test_ipo_with_soft_labels_reaches_its_closed_form_optimum():
    """IPO regresses each pair's h = log(pi/pi_ref)(i) - log(pi/pi_ref)(j) on (p_ij - 1/2) / tau; over every
    pair of the bandit once the least-squares solution is log(pi/pi_ref)(i) = mean_j (p_ij - 1/2) / tau + const
    (p_ii = 1/2; Azar et al. 2023, section 5). Each pair in one order only, so that a target off by a constant
    (label / tau, say) moves the optimum."""
    i, j = all_pairs()
    p = torch.sigmoid(REWARD[:, None] - REWARD[None, :])  # p[a, b]: a preferred to b (p[a, a] = 1/2)
    optimum = REF * torch.exp((p - 0.5).mean(1) / BETA)
    optimum /= optimum.sum()
    logits = REF.log().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for _ in range(2000):
        logp = F.log_softmax(logits, dim=0)
        loss = preference.dpo_loss(logp[i], logp[j], REF.log()[i], REF.log()[j], BETA, p[i, j], kind="ipo")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert total_variation(F.softmax(logits, 0).detach(), optimum) < 0.005
    assert total_variation(optimum, OPTIMUM) > 0.05  # not DPO's optimum: the test tells the two apart


def test_ppo_with_the_kl_in_the_reward_reaches_the_closed_form_optimum():
    """PPO's clipped surrogate, several epochs of minibatches per batch of sampled actions with a
    mean-baseline advantage, on the bandit: it ends at pi_ref exp(r / beta) / Z as RLOO does."""
    gen = torch.Generator().manual_seed(0)
    logits = REF.log().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.02)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (600 * 8))
    for _ in range(600):
        with torch.no_grad():
            old = F.log_softmax(logits, dim=0)
            actions = torch.multinomial(old.exp(), 256, replacement=True, generator=gen)
            reward = REWARD[actions] - BETA * (old[actions] - REF.log()[actions])
            advantages = reward - reward.mean()
        for _ in range(2):  # epochs over the batch: the ratio moves off 1 (the clip's formula: its own test)
            for batch in torch.randperm(256, generator=gen).view(4, 64):
                logp = F.log_softmax(logits, dim=0)
                loss, _ = preference.ppo_loss(logp[actions[batch]][:, None], old[actions[batch]][:, None],
                                              advantages[batch], clip=0.2)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
    assert total_variation(F.softmax(logits, 0).detach(), OPTIMUM) < 0.02


def grpo_optimum(scale: bool) -> torch.Tensor:
    """Where GRPO with the k3 KL in its loss settles on the bandit. In expectation over samples of pi, k3's
    gradient is that of KL(pi_ref || pi), not of KL(pi || pi_ref), so pi maximises E_pi[r / s] - beta KL(pi_ref || pi):
    pi_i = beta pi_ref_i / (lam - r_i / s), lam above every r_i / s and set so the pi_i sum to 1, with s the reward's
    standard deviation under pi (GRPO) or 1 (Dr. GRPO); found by bisection inside a fixed-point iteration on s."""
    s = torch.tensor(1.0, dtype=torch.float64)
    for _ in range(200):
        r = REWARD / s
        low, high = r.max().item(), r.max().item() + 100.0
        for _ in range(200):  # the sum falls from infinity as lam rises
            lam = (low + high) / 2
            low, high = (lam, high) if (BETA * REF / (lam - r)).sum() > 1 else (low, lam)
        pi = BETA * REF / (lam - r)
        if scale:
            s = ((pi * (REWARD - (pi * REWARD).sum()) ** 2).sum()).sqrt()
    return pi / pi.sum()


@pytest.mark.parametrize("scale", [True, False], ids=["grpo", "dr_grpo"])
def test_grpo_reaches_its_closed_form_optimum(scale):
    """GRPO's group-normalised advantages (Dr. GRPO's unscaled ones) and loss, G actions per step from the current
    policy, on the bandit: each ends at its own closed form, which differs from the other's and from RLOO's."""
    gen = torch.Generator().manual_seed(0)
    logits = REF.log().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 600)
    for _ in range(600):
        logp = F.log_softmax(logits, dim=0)
        actions = torch.multinomial(logp.exp().detach(), 256, replacement=True, generator=gen)
        advantages = preference.grpo_advantages(REWARD[actions][None, :], scale).squeeze(0)
        sampled = logp[actions][:, None]
        loss, stats = preference.grpo_loss(sampled, sampled.detach(), REF.log()[actions][:, None], advantages,
                                           clip=0.2, beta=BETA)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    optimum = grpo_optimum(scale)
    assert total_variation(F.softmax(logits, 0).detach(), optimum) < 0.01
    assert total_variation(optimum, grpo_optimum(not scale)) > 0.05
    assert total_variation(optimum, OPTIMUM) > 0.05


def test_grpo_advantages_and_loss_against_the_formulas_written_out():
    """TRL's formulas by hand: (r - mean) / (std + 1e-4) per group, Bessel's std; the clipped surrogate at every token
    plus beta x (exp(ref - logp) - (ref - logp) - 1), averaged over tokens."""
    rewards = torch.tensor([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]])
    std = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert torch.allclose(preference.grpo_advantages(rewards)[0], (rewards[0] - 7 / 3) / (std + 1e-4))
    assert preference.grpo_advantages(rewards)[1].abs().max() == 0  # a group of equal rewards: no signal
    assert torch.allclose(preference.grpo_advantages(rewards, scale=False)[0], rewards[0] - 7 / 3)
    torch.manual_seed(4)
    logp, old, ref = -torch.rand(3, 5) * 3, -torch.rand(3, 5) * 3, -torch.rand(3, 5) * 3
    advantages = torch.tensor([1.0, -0.5, 2.0])
    loss, stats = preference.grpo_loss(logp, old, ref, advantages, clip=0.2, beta=0.04)
    expected = 0.0
    for b in range(3):
        for t in range(5):
            ratio, a = math.exp(logp[b, t] - old[b, t]), advantages[b].item()
            surrogate = -min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
            kl = math.exp(ref[b, t] - logp[b, t]) - (ref[b, t] - logp[b, t]) - 1
            expected += (surrogate + 0.04 * kl) / 15
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# --- log-probabilities and KL ----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_token_logprobs_equal_categorical(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 2
    tokens = torch.randint(0, 50, (3, 7))
    expected = torch.distributions.Categorical(logits=logits / temperature).log_prob(tokens)
    assert torch.allclose(preference.token_logprobs(logits, tokens, temperature), expected, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_exact_kl_equals_torch_distributions(temperature):
    torch.manual_seed(1)
    p, q = torch.randn(4, 6, 30), torch.randn(4, 6, 30)
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p / temperature),
                                                 torch.distributions.Categorical(logits=q / temperature))
    assert torch.allclose(preference.exact_kl(p, q, temperature), expected, atol=1e-6)


def test_unbiased_kl_estimators_average_to_the_exact_kl():
    torch.manual_seed(2)
    p_logits, q_logits = torch.randn(40), torch.randn(40) * 0.5
    p, q = torch.distributions.Categorical(logits=p_logits), torch.distributions.Categorical(logits=q_logits)
    exact = torch.distributions.kl_divergence(p, q).item()
    samples = p.sample((200_000,))
    estimates = preference.kl_estimators(p.log_prob(samples), q.log_prob(samples))
    for name in ("k1", "k3"):
        values = estimates[name].double()
        standard_error = values.std().item() / math.sqrt(len(values))
        assert abs(values.mean().item() - exact) < 4 * standard_error, name
    assert (estimates["k3"] >= 0).all()


def test_at_step_zero_kl_is_zero_the_ratio_one_and_dpo_log_2():
    torch.manual_seed(3)
    logits = torch.randn(8, 5, 40)
    tokens = torch.randint(0, 40, (8, 5))
    logp = preference.token_logprobs(logits, tokens, 1.0)
    assert preference.exact_kl(logits, logits.clone(), 1.0).abs().max().item() == 0.0
    assert all((v == 0).all() for v in preference.kl_estimators(logp, logp.clone()).values())
    _, stats = preference.ppo_loss(logp, logp.clone(), torch.randn(8), clip=0.2)
    assert stats["val/ratio"] == 1.0
    assert stats["policy/clipfrac_avg"] == 0.0
    seq = logp.sum(1)
    loss = preference.dpo_loss(seq[:4], seq[4:], seq[:4].clone(), seq[4:].clone(), beta=0.1)
    assert loss.item() == torch.tensor(math.log(2)).item()  # exactly log 2, in float32


def test_dpo_loss_is_the_papers_formula():
    torch.manual_seed(4)
    pc, pr, rc, rr = (torch.randn(16, dtype=torch.float64) for _ in range(4))
    beta = 0.3
    written_out = -torch.log(torch.sigmoid(beta * (pc - rc) - beta * (pr - rr))).mean()  # Rafailov et al., eq. 7
    assert preference.dpo_loss(pc, pr, rc, rr, beta).item() == pytest.approx(written_out.item(), rel=1e-12)


def test_reward_model_loss_is_binary_cross_entropy_on_the_score_difference():
    torch.manual_seed(5)
    chosen, rejected, soft = torch.randn(32), torch.randn(32), torch.rand(32)
    hard = F.binary_cross_entropy_with_logits(chosen - rejected, torch.ones(32))
    assert preference.reward_model_loss(chosen, rejected).item() == pytest.approx(hard.item(), rel=1e-6)
    assert preference.reward_model_loss(chosen, rejected, soft).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(chosen - rejected, soft).item(), rel=1e-6)


def test_rloo_advantages_leave_one_out_and_never_nan():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    advantages = preference.rloo_advantages(rewards)
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3], [0, 0, 0, 0]])
    assert torch.allclose(advantages, expected)
    normalized = preference.rloo_advantages(rewards, normalize=True)
    assert torch.isfinite(normalized).all()
    assert (normalized[1] == 0).all()
    assert torch.allclose(normalized[0], expected[0] / rewards[0].std())


def test_ppo_clips_the_ratio():
    """min(r A, clip(r) A) per token, for a positive and a negative advantage, against the formula written out:
    with A > 0 a ratio above 1 + clip stops paying, with A < 0 a ratio below 1 - clip does."""
    old = torch.zeros(2, 4)
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.9], [1.5, 0.5, 1.1, 0.9]], dtype=torch.float64)
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, stats = preference.ppo_loss(ratios.log(), old.double(), advantages, clip=0.2)
    by_hand = [[min(r * a, max(min(r, 1.2), 0.8) * a) for r in row] for row, a in zip(ratios.tolist(), advantages.tolist())]
    # A = 1: min(1.5, 1.2), min(0.5, 0.8), 1.1, 0.9; A = -2: min(-3, -2.4), min(-1, -1.6), -2.2, -1.8
    assert by_hand == [[1.2, 0.5, 1.1, 0.9], [-3.0, -1.6, -2.2, -1.8]]
    assert loss.item() == pytest.approx(-sum(map(sum, by_hand)) / 8)
    # TRL's clip fraction: where the clipped term is the one taken (A = 1 at 1.5, A = -2 at 0.5); not |r - 1| > clip
    assert stats["policy/clipfrac_avg"] == 2 / 8
    assert stats["policy/approxkl_avg"] == pytest.approx(sum(math.log(r) ** 2 / 2 for r in [1.5, 0.5, 1.1, 0.9]) / 4)
    assert stats["val/ratio"] == pytest.approx(1.0)


def test_ipo_averages_over_each_sides_tokens_and_preferred_ft_is_the_chosen_sides_nll():
    """Summed log-probabilities of completions of 2 and 4 tokens (one padded): IPO's h is built from per-token
    means (TRL), so its target margin 1 / (2 tau) is per token; the sigmoid losses read the sums."""
    policy = (torch.tensor([-3.0, -8.0]), torch.tensor([-6.0, -2.0]))
    reference = (torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -3.0]))
    lengths = (torch.tensor([2.0, 4.0]), torch.tensor([4.0, 2.0]))
    loss, stats = preference.dpo_family_loss("ipo", policy, reference, lengths, 0.5, 1.0)
    h = [(-3 / 2 + 4 / 2) - (-6 / 4 + 5 / 4), (-8 / 4 + 6 / 4) - (-2 / 2 + 3 / 2)]
    assert loss.item() == pytest.approx(sum((x - 1 / (2 * 0.5)) ** 2 for x in h) / 2)
    assert stats["rewards/chosen"].tolist() == pytest.approx([0.5 * (-3 / 2 + 4 / 2), 0.5 * (-8 / 4 + 6 / 4)])
    sums = [(-3 + 4) - (-6 + 5), (-8 + 6) - (-2 + 3)]
    loss, _ = preference.dpo_family_loss("sigmoid", policy, reference, lengths, 0.1, 1.0)
    assert loss.item() == pytest.approx(sum(-math.log(1 / (1 + math.exp(-0.1 * x))) for x in sums) / 2)
    loss, stats = preference.dpo_family_loss("nll", policy, reference, lengths, None, 1.0)
    assert loss.item() == pytest.approx((3 + 8) / (2 + 4)) and "rewards/chosen" not in stats


def test_a_step_clips_the_gradient_over_every_group_and_the_learning_rate_decays_to_zero():
    from rlhf.training import decaying_optimizer, step_on
    a, b = torch.nn.Parameter(torch.tensor([3.0])), torch.nn.Parameter(torch.tensor([4.0]))
    optimizer, schedule = decaying_optimizer([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}], 4)
    stats = [step_on(optimizer, (a * a + b * b) / 2, schedule, max_grad_norm=1.0) for _ in range(4)]
    assert stats[0]["grad_norm"] == pytest.approx(5.0)  # the norm of (3, 4) over both groups together
    assert [s["learning_rate"] for s in stats] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    assert optimizer.param_groups[1]["lr"] == 0.0
    c = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    loss = (c * torch.tensor([3.0, 4.0])).sum()  # gradient (3, 4), norm 5
    assert step_on(torch.optim.SGD([c], lr=1.0), loss, None, max_grad_norm=1.0)["grad_norm"] == pytest.approx(5.0)
    assert c.tolist() == pytest.approx([3.0 - 0.6, 4.0 - 0.8])  # the step along the clipped gradient (3, 4) / 5


def test_gae_by_hand_on_three_tokens():
    rewards = torch.tensor([[0.1, -0.2, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3]], dtype=torch.float64)
    gamma, lam = 0.9, 0.8
    d2 = 1.0 + gamma * 0.0 - 0.3  # the value after the last token is 0
    d1 = -0.2 + gamma * 0.3 - 0.4
    d0 = 0.1 + gamma * 0.4 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    advantages, returns = preference.gae(rewards, values, gamma, lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2])
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3])


def test_gae_with_lambda_and_gamma_one_and_zero_values_is_the_reward_to_go():
    rewards = torch.randn(4, 6, dtype=torch.float64)
    advantages, returns = preference.gae(rewards, torch.zeros_like(rewards), 1.0, 1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(advantages, to_go)
    assert torch.allclose(returns, to_go)


def test_token_rewards_put_the_score_on_the_last_token_and_sum_to_the_sequence_reward():
    logprobs, ref = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    score = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    rewards = preference.token_rewards(score, logprobs, ref, beta=0.1)
    assert torch.allclose(rewards[:, :-1], -0.1 * (logprobs - ref)[:, :-1])
    assert torch.allclose(rewards[:, -1], score - 0.1 * (logprobs - ref)[:, -1])
    assert torch.allclose(rewards.sum(1), preference.kl_penalized_reward(score, logprobs, ref, 0.1))


def test_value_loss_and_its_clipping_by_hand():
    old = torch.tensor([[0.0, 1.0]])
    returns = torch.tensor([[1.0, 0.0]])
    values = torch.tensor([[0.5, 2.0]])  # the first moved 0.5 (clipped to 0.2), the second 1.0 (clipped to 0.2)
    # token 1: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 2: max((2-0)^2, (1.2-0)^2) = 4
    assert preference.value_loss(values, old, returns, clip=0.2).item() == pytest.approx(0.5 * (0.64 + 4.0) / 2)
    assert preference.value_loss(values, old, returns, clip=10.0).item() == pytest.approx(0.5 * (0.25 + 4.0) / 2)


def test_whiten_gives_zero_mean_and_unit_std():
    x = torch.randn(7, 5, dtype=torch.float64) * 3 + 2
    assert preference.whiten(x).mean().item() == pytest.approx(0.0, abs=1e-12)
    assert preference.whiten(x).std().item() == pytest.approx(1.0, rel=1e-6)


def test_conservative_dpo_and_ipo_are_their_papers_formulas():
    pc, pr, rc, rr = (torch.randn(6, dtype=torch.float64) for _ in range(4))
    beta, eps = 0.1, 0.25
    h = (pc - rc) - (pr - rr)
    cdpo = -((1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)).mean()  # Mitchell 2023
    assert preference.dpo_loss(pc, pr, rc, rr, beta, label=1 - eps).item() == pytest.approx(cdpo.item())
    ipo = ((h - 1 / (2 * beta)) ** 2).mean()  # Azar et al. 2023, eq. 17, tau = beta
    assert preference.dpo_loss(pc, pr, rc, rr, beta, kind="ipo").item() == pytest.approx(ipo.item())
    soft = torch.rand(6, dtype=torch.float64)
    by_hand = -(soft * F.logsigmoid(beta * h) + (1 - soft) * F.logsigmoid(-beta * h)).mean()
    assert preference.dpo_loss(pc, pr, rc, rr, beta, label=soft).item() == pytest.approx(by_hand.item())
    # IPO on a soft label regresses to (p - 1/2) / beta: no pull at all for a coin flip
    assert preference.dpo_loss(pc, pr, rc, rr, beta, label=0.5, kind="ipo").item() == pytest.approx((h ** 2).mean().item())


def test_the_value_model_reads_the_state_before_each_completion_token():
    torch.manual_seed(11)
    vm = preference.RewardModel(gpt.LBGPT(CFG))
    torch.nn.init.normal_(vm.head.weight)
    prompts, completions = torch.randint(0, 300, (2, 5)), torch.randint(0, 300, (2, 4))
    values = vm.token_values(prompts, completions)
    for t in range(4):  # V(s_t) is the score of prompt + completion[:t], alone or as a padded completion
        assert torch.allclose(values[:, t], vm(prompts, completions[:, :t]), atol=1e-5)
        padded = torch.where(torch.arange(4) < t, completions, preference.PAD)
        assert torch.allclose(values[:, t], vm(prompts, padded), atol=1e-5)


def test_kl_penalty_is_the_sum_over_the_completions_tokens():
    """reward = score - beta * sum over tokens of (log pi - log pi_ref), on sequences of several tokens."""
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.4, -0.2, -0.1]])
    score = torch.tensor([1.0, -1.0])
    reward = preference.kl_penalized_reward(score, logprobs, ref, beta=0.5)
    by_hand = [1.0 - 0.5 * ((-1.0 + 1.5) + (-2.0 + 1.0) + 0.0), -1.0 - 0.5 * ((-0.1 + 0.4) + 0.0 + (-0.3 + 0.1))]
    assert reward.tolist() == pytest.approx(by_hand)


def test_tau_gives_the_asked_agreement():
    differences = torch.tensor([1.0, -1.0, 2.0, 0.0, 3.0, -1.0, 0.0])
    tau = preference.tau_for_agreement(differences, 0.75)
    nonzero = differences[differences != 0]
    assert torch.sigmoid(nonzero.abs() / tau).mean().item() == pytest.approx(0.75, abs=1e-9)


def test_sampled_tokens_follow_the_probabilities():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]])
    n = 100_000
    gen = torch.Generator().manual_seed(0)
    draws = preference.sample_tokens(probs.repeat(n, 1), gen).view(n, 3)  # rows are drawn independently
    for row in range(3):
        frequencies = torch.bincount(draws[:, row], minlength=5).double() / n
        standard_error = (probs[row].double() * (1 - probs[row].double()) / n).sqrt()
        assert ((frequencies - probs[row]).abs() <= 4 * standard_error + 1e-12).all()
        assert (frequencies[probs[row] == 0] == 0).all()  # impossible tokens never come


# --- best-of-n ------------------------------------------------------------------------------------------


def test_best_of_n_expectation_equals_brute_force_over_subsets():
    torch.manual_seed(6)
    scores, values = torch.randn(3, 7), torch.randn(3, 7)
    for n in (1, 2, 3, 7):
        brute = torch.tensor([[values[p, list(s)][scores[p, list(s)].argmax()].item()
                               for s in itertools.combinations(range(7), n)] for p in range(3)]).mean(1)
        assert torch.allclose(preference.best_of_n_expectation(scores, values, n), brute.double(), atol=1e-12)


@pytest.mark.parametrize("n", [2, 4, 16, 64])
def test_best_of_n_kl_is_the_exact_kl_for_a_continuous_score(n):
    """Over many equally likely outcomes with distinct scores, best-of-n picks the k-th lowest of N with
    probability (k/N)^n - ((k-1)/N)^n: its exact KL to the base tends to log n - (n-1)/n."""
    N = 200_000
    k = torch.arange(1, N + 1, dtype=torch.float64)
    p_bon = (k / N) ** n - ((k - 1) / N) ** n
    exact = torch.special.xlogy(p_bon, p_bon * N).sum().item()  # 0 log 0 = 0 where p_bon underflows
    assert exact == pytest.approx(preference.best_of_n_kl(n), abs=2e-3)


# --- on the real models -------------------------------------------------------------------------------------

CFG = gpt.ModelConfig(vocab_size=300, block_size=24, n_layer=2, n_head=4, n_embd=32, dropout=0.0)


@pytest.mark.parametrize("cls", [gpt_.SMGPT, gpt.LBGPT])
def test_logprobs_recorded_while_sampling_equal_a_full_forward(cls):
    torch.manual_seed(7)
    model = cls(CFG).eval()
    prompts = torch.randint(0, 300, (5, 8))
    gen = torch.Generator().manual_seed(0)
    completions, recorded = preference.sample_completions(model, prompts, 12, temperature=0.9, generator=gen)
    with torch.no_grad():
        recomputed = preference.token_logprobs(preference.completion_logits(model, prompts, completions), completions, 0.9)
    assert completions.shape == (5, 12)
    assert (recorded - recomputed).abs().max().item() < 1e-5


def test_the_reference_stays_bitwise_unchanged_and_the_policy_moves():
    torch.manual_seed(8)
    policy = gpt_.SMGPT(CFG).train()
    reference = frozen(policy)
    assert not reference.training
    assert policy.training
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
    prompts, chosen, rejected = (torch.randint(0, 300, (6, 8)) for _ in range(3))
    for _ in range(3):
        logp = {name: preference.token_logprobs(preference.completion_logits(m, prompts, c), c, 1.0).sum(1)
                for name, m, c in (("pc", policy, chosen), ("pr", policy, rejected), ("rc", reference, chosen),
                                   ("rr", reference, rejected))}
        loss = preference.dpo_loss(logp["pc"], logp["pr"], logp["rc"], logp["rr"], beta=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in reference.parameters())
    assert not torch.equal(policy.state_dict()["wte.weight"], before["wte.weight"])


def test_the_reward_head_is_made_beside_the_body():
    """On CUDA a head made on the CPU beside a body on the GPU failed at the first batch (found on an H200)."""
    body = gpt.LBGPT(CFG).to("meta")
    assert preference.RewardModel(body).head.weight.device == torch.device("meta")


def test_reward_model_reads_the_last_token():
    torch.manual_seed(10)
    rm = preference.RewardModel(gpt.LBGPT(CFG))
    torch.nn.init.normal_(rm.head.weight)
    prompts, completions = torch.randint(0, 300, (2, 6)), torch.randint(0, 300, (2, 4))
    expected = rm.head(rm.body.hidden_states(torch.cat([prompts, completions], dim=1))[:, -1]).squeeze(-1)
    assert torch.allclose(rm(prompts, completions), expected, atol=1e-6)
    changed = completions.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 300
    assert not torch.equal(rm(prompts, changed), rm(prompts, completions))  # the score depends on the last token


# --- oracles --------------------------------------------------------------------------------------------


def test_no_word_and_no_word_family_spans_the_oracle_score_and_the_judges():
    oracle = get_oracle("sentiment")
    scorer, lexicon_judge, afinn = oracle.score.weights, oracle.judges["lexicon"].weights, oracle.judges["afinn"].weights
    families = SCORE_POSITIVE + SCORE_NEGATIVE + JUDGE_POSITIVE + JUDGE_NEGATIVE
    assert len({w for f in families for w in f}) == sum(map(len, families))  # each word in one family only
    assert scorer.keys() == set(words(SCORE_POSITIVE + SCORE_NEGATIVE))
    assert lexicon_judge.keys() == set(words(JUDGE_POSITIVE + JUDGE_NEGATIVE))
    for judge in (lexicon_judge, afinn):
        assert not scorer.keys() & judge.keys()
        # nor a word of the same family the lists do not name (the same first four letters: loved, lovers, ...)
        assert not [(a, b) for a in scorer for b in judge if same_family(a, b)]
    assert {"love", "grace"} <= lexicon_judge.keys()
    assert "good" not in afinn and "goodness" not in afinn and "death" not in afinn  # the score's families are out
    assert not {"died", "dying", "hating", "hatred", "sadly", "sadden", "saddened"} & afinn.keys()  # short stems too
    assert afinn["love"] == 3  # the lexicon judge's families stay: both judges are held out from the score
    assert afinn["cheerful"] > 0 and afinn["awful"] < 0  # AFINN's own words remain


def test_the_oracle_score_and_the_judges_count_words():
    oracle = get_oracle("sentiment")
    text = "Good love, good! Death, blood. A cheerful day."
    assert oracle.score(text) == 1.0  # the score's families: good + good - death
    assert oracle.judges["lexicon"](text) == 0.0  # the judge's: love - blood
    assert oracle.judges["afinn"](text) == 5.0  # love (+3), cheerful (+2); good and death belong to the score
    assert oracle.score("goodness deathly") == 0.0  # whole words only


def test_dialogue_counts_the_lines_that_name_a_speaker():
    text = "ly, I am known.\n\nCORIOLANUS:\nWhy, sir?\n\nFirst Citizen:\nAy: 'tis so.\nNot: a speaker:\nKING HENRY VI:\n"
    assert dialogue(text) == 3.0  # "Ay: 'tis so." and "Not: a speaker:" say something after a colon, or in it
    assert dialogue("no one speaks here") == 0.0


def test_verse_counts_ten_syllables():
    assert syllables("window") == 2
    assert syllables("breaks") == 1
    assert verse("ROMEO:\nBut soft, what light through yonder window breaks?") == 0.0
    assert verse("To be or not") == -(10 - 4)


def test_a_users_oracle_loads_and_fails_clearly(tmp_path, monkeypatch):
    (tmp_path / "my_oracle.py").write_text("def length(text):\n    return len(text)\n\ndef broken(text):\n"
                                           "    raise KeyError('x')\n\ndef nan(text):\n    return float('nan')\n")
    monkeypatch.chdir(tmp_path)
    assert get_oracle("my_oracle:length").score("abc") == 3.0
    for spec, message in (("my_oracle:broken", "failed on a completion"), ("my_oracle:nan", "finite number"),
                          ("my_oracle:missing", "cannot load it"), ("no_such_module:f", "cannot load it"),
                          ("happiness", "unknown oracle")):
        with pytest.raises(UserError, match=message):
            get_oracle(spec)
