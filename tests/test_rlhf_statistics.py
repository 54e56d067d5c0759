"""The RLHF report's statistics against plain computations on made-up numbers: the matched-KL interpolation and
its bracket bound, paired differences over seeds, the delta-method ratio, Student's t, the
p-values, Holm's correction, and the reward model's accuracy on a policy's own samples."""
import math
import random
import statistics

import pytest
import torch
from scipy import stats

from rlhf.report import (at_kl, gao_fit, holm, matched_rows, mean_interval, p_value, primary_results,
                         pair_accuracy, primary_lines, ratio_summary, seeds_for_power, summarise)
from rlhf.study import keep_kls


def point(kl, scores):
    return {"kl": kl, "per_prompt": {"oracle": scores}}


def test_at_kl_interpolates_linearly_in_sqrt_kl_between_the_points_around_the_first_crossing():
    curve = [point(0.0, [0.0, 1.0]), point(1.0, [2.0, 3.0]), point(4.0, [6.0, 3.0]), point(1.5, [9.0, 9.0]),
             point(9.0, [7.0, 7.0])]
    got = at_kl(curve, 2.25)  # sqrt: 1.5, halfway from sqrt(1) to sqrt(4)
    assert got["bracket"] == [1.0, 4.0]
    assert got["per_prompt"]["oracle"] == pytest.approx([4.0, 3.0])
    assert at_kl(curve, 1.0)["per_prompt"]["oracle"] == pytest.approx([2.0, 3.0])  # a kept point itself
    w = (math.sqrt(0.5) - 0.0) / (1.0 - 0.0)
    assert at_kl(curve, 0.5)["per_prompt"]["oracle"] == pytest.approx([2.0 * w, 1.0 + 2.0 * w])
    assert at_kl(curve, 10.0) is None  # never reached
    assert at_kl([point(0.0, [1.0]), point(0.0, [2.0])], 0.0) is None  # no width to bridge


def test_a_paired_difference_over_seeds_is_the_t_interval_of_the_per_seed_mean_differences():
    rng = random.Random(1)
    a = [point(1.0, [rng.gauss(0, 1) for _ in range(5)]) for _ in range(3)]
    b = [point(1.0, [rng.gauss(0, 1) for _ in range(5)]) for _ in range(3)]
    got = summarise(a, "oracle", paired_with=b)
    diffs = [statistics.mean(x - y for x, y in zip(s["per_prompt"]["oracle"], t["per_prompt"]["oracle"]))
             for s, t in zip(a, b)]
    assert got["per_seed"] == pytest.approx(diffs)
    assert got["mean"] == pytest.approx(statistics.mean(diffs))
    assert got["ci"] == pytest.approx(4.303 * statistics.stdev(diffs) / math.sqrt(3), rel=5e-4)
    one = summarise(a[:1], "oracle", paired_with=b[:1])  # one seed: over its prompts, and no p-value
    assert p_value(one) is None and one["n"] == 5
    per_prompt = [x - y for x, y in zip(a[0]["per_prompt"]["oracle"], b[0]["per_prompt"]["oracle"])]
    assert one["ci"] == pytest.approx(2.776 * statistics.stdev(per_prompt) / math.sqrt(5), rel=5e-4)


def test_the_transfer_ratio_is_a_ratio_of_mean_gains_with_the_delta_method_interval():
    judge = [[0.2, 0.4, 0.3], [0.1, 0.5, 0.2], [0.3, 0.3, 0.3]]
    oracle = [[1.0, 1.2, 0.8], [0.9, 1.1, 1.3], [1.0, 1.0, 1.4]]
    per_seed = [{"per_prompt": {"gain_judge": j, "gain_oracle": o}} for j, o in zip(judge, oracle)]  # readings at a KL
    got = ratio_summary(per_seed, "gain_judge", "gain_oracle")
    top, bottom = [statistics.mean(j) for j in judge], [statistics.mean(o) for o in oracle]
    ratio = statistics.mean(top) / statistics.mean(bottom)
    residual = [t - ratio * b for t, b in zip(top, bottom)]
    assert got["mean"] == pytest.approx(ratio)
    assert got["ci"] == pytest.approx(4.303 * statistics.stdev(residual) / math.sqrt(3) / statistics.mean(bottom), rel=5e-4)


def test_a_reading_from_kept_points_too_far_apart_is_refused_and_says_so():
    curve = [point(0.0, [0.0]), point(0.7, [1.0]), point(1.8, [2.0]), point(6.0, [3.0])]
    assert at_kl(curve, 1.0, max_bracket=1.1)["per_prompt"]["oracle"] == pytest.approx(
        [1.0 + (1 - math.sqrt(0.7)) / (math.sqrt(1.8) - math.sqrt(0.7))])
    assert at_kl(curve, 1.0, max_bracket=1.0) == {"bracket": [0.7, 1.8], "too_wide": True}  # 1.1 nats apart
    assert at_kl(curve, 4.0, max_bracket=1.0) == {"bracket": [1.8, 6.0], "too_wide": True}
    seeds = [{"rloo": at_kl(curve, 1.0, 1.2), "best-of-n": at_kl(curve, 1.0, 1.2)},
             {"rloo": at_kl(curve, 1.0, 1.0), "best-of-n": at_kl(curve, 1.0, 1.2)}]
    rows = matched_rows(seeds, ["oracle"])
    assert rows["rloo"]["oracle"] == {"mean": None, "reason": "bracket too wide"}
    assert rows["rloo"]["brackets"] == [[0.7, 1.8], [0.7, 1.8]]  # the widths are reported with the refusal
    assert rows["best-of-n"]["oracle"]["mean"] == pytest.approx(at_kl(curve, 1.0)["per_prompt"]["oracle"][0])


def test_runs_keep_their_policy_on_both_sides_of_every_target_within_half_the_bound():
    kls = keep_kls({"kl_targets": "1,2,4", "max_bracket": 1.0})
    assert kls == pytest.approx([0.75, 1.25, 1.5, 2.5, 3.0, 5.0])
    for target in (1, 2, 4):
        below, above = max(k for k in kls if k < target), min(k for k in kls if k > target)
        assert above - below <= 0.5 * target


@pytest.mark.parametrize("values", [[2.066, 2.081, 2.052], [0.5, -0.25], [1.0, 1.5, 0.5, 2.0], list(range(40))])
def test_mean_interval_is_the_mean_and_t_times_the_standard_error(values):
    """The quantiles below, and the intervals above (rel=5e-4), are from a printed table: 3 decimals."""
    n = len(values)
    quantile = {3: 4.303, 2: 12.706, 4: 3.182, 40: 2.02269}[n]  # t(0.975, n - 1) from a printed table
    got = mean_interval(values)
    assert got["n"] == n
    assert got["mean"] == pytest.approx(statistics.mean(values))
    assert got["ci"] == pytest.approx(quantile * statistics.stdev(values) / math.sqrt(n), rel=5e-4)
    assert mean_interval([3.0]) == {"mean": 3.0, "ci": None, "n": 1}


def test_the_p_value_is_the_two_sided_t_test_of_the_per_seed_values():
    values = [0.3, 0.5, 0.1, 0.4, 0.2]
    t = statistics.mean(values) / (statistics.stdev(values) / math.sqrt(5))
    assert p_value({"per_seed": values}) == pytest.approx(2 * stats.t.sf(t, 4))
    assert p_value({"per_seed": [0.3]}) is None  # one seed: no test over training runs
    assert p_value({"per_seed": [0.2, 0.2, 0.2]}) == 0.0


def test_holm_is_the_step_down_procedure():
    rng = random.Random(2)
    for _ in range(50):
        p = [rng.random() * rng.choice([0.1, 1.0]) for _ in range(rng.randint(1, 12))]
        m, adjusted = len(p), holm(p)
        # plain: reject the i-th smallest while p_(i) <= alpha / (m - i); adjusted p < alpha iff rejected at alpha
        for alpha in (0.01, 0.05, 0.2):
            rejected, order = set(), sorted(range(m), key=lambda i: p[i])
            for rank, i in enumerate(order):
                if p[i] > alpha / (m - rank):
                    break
                rejected.add(i)
            assert {i for i in range(m) if adjusted[i] <= alpha} == rejected
        assert all(a >= q for a, q in zip(adjusted, p)) and max(adjusted) <= 1
    assert holm([0.04, 0.03]) == pytest.approx([0.06, 0.06])  # monotone: 0.04 falls with 0.03's 0.06


def test_holm_covers_the_primary_comparisons_alone_and_every_other_difference_is_exploratory():
    """Three seeds, two comparisons named in primary (on the first judge) among eight differences: the two get Holm's
    adjusted p over the two (the step-down written out) and the seeds for power; the rest no test at all."""
    rng = random.Random(5)

    def difference():
        values = [rng.gauss(0.3, 0.2) for _ in range(3)]
        return {"mean": statistics.mean(values), "ci": 0.1, "per_seed": values}

    matched = {"2": {"dpo": {k: difference() for k in ("oracle - best-of-n", "judge_lexicon - best-of-n")},
                     "rloo": {k: difference() for k in ("oracle - best-of-n", "judge_lexicon - best-of-n")}},
               "4": {"rloo": {k: difference() for k in ("oracle - best-of-n", "judge_lexicon - best-of-n")}}}
    report = {"judges": ["lexicon"], "measure": "oracle", "config": {"primary": "dpo@2,rloo@4"},
              "methods": {"base": {}, "dpo": {"gain_oracle": difference(), "val_bpb_change": difference()}},
              "matched_kl": matched}
    primary = primary_results(report)
    named = [matched["2"]["dpo"]["judge_lexicon - best-of-n"], matched["4"]["rloo"]["judge_lexicon - best-of-n"]]
    assert [c["summary"] for c in primary] == named and [c["kl"] for c in primary] == ["2", "4"]
    p = [stats.ttest_1samp(d["per_seed"], 0).pvalue for d in named]
    low, high = sorted(range(2), key=lambda i: p[i])
    expected = {low: min(1, 2 * p[low])}
    expected[high] = max(expected[low], p[high])
    assert [d["p_holm"] for d in named] == pytest.approx([expected[0], expected[1]])
    assert all(d["seeds_for_power"] == seeds_for_power(d["per_seed"], 0.05 / 2) for d in named)
    others = [d for rows in matched.values() for row in rows.values() for d in row.values() if d not in named]
    others += [report["methods"]["dpo"]["gain_oracle"], report["methods"]["dpo"]["val_bpb_change"]]
    assert len(others) == 6 and all("p" not in d and "p_holm" not in d for d in others)
    lines = primary_lines(dict(report, primary=primary, seeds=[1, 2, 3]))
    for c, d in zip(primary, named):
        row = next(line for line in lines if line.startswith(f"| {c['method']} − best-of-n at {c['kl']} nats |"))
        assert f"| {d['p']:.3g} | {d['p_holm']:.3g} | {d['seeds_for_power'] or '—'} |" in row
    assert "Holm's correction over these 2 alone" in lines[0] and "exploratory" in lines[-1]


def test_the_seeds_for_power_reach_80_percent_and_one_fewer_does_not_by_simulation():
    """Simulated studies: n seeds drawn with the mean and spread seen, a two-sided t-test at Holm's first level."""
    gen = torch.Generator().manual_seed(0)
    per_seed, alpha = [0.9, 0.2, 0.6, 0.4], 0.05 / 6
    n = seeds_for_power(per_seed, alpha)
    assert 5 <= n <= 30

    def power(k):
        draws = torch.randn(40_000, k, generator=gen, dtype=torch.float64) * statistics.stdev(per_seed)
        draws += statistics.mean(per_seed)
        return (stats.ttest_1samp(draws.numpy(), 0, axis=1).pvalue < alpha).mean()

    assert power(n) > 0.79 and power(n - 1) < 0.81
    assert seeds_for_power([0.1, -0.1], alpha) is None and seeds_for_power([0.2, 0.2], alpha) is None


def test_gao_et_als_form_is_recovered_from_a_best_of_n_curve_that_follows_it():
    """Best-of-n at n = 1 ... 1024 (KL = log n - (n-1)/n) whose gain is exactly d (1.2 - 0.3 d): alpha 1.2, beta 0.3,
    the peak at d = 2 (KL 4), R^2 1; a curve that only rises has no peak."""
    kls = [math.log(n) - (n - 1) / n for n in (2 ** k for k in range(11))]
    curve = [{"kl": kl, "oracle": 0.5 + math.sqrt(kl) * (1.2 - 0.3 * math.sqrt(kl)), "rm": math.sqrt(kl) + 0.1 * kl}
             for kl in kls]
    fit = gao_fit(curve, "oracle")
    assert fit["alpha"] == pytest.approx(1.2) and fit["beta"] == pytest.approx(0.3)
    assert fit["peak_kl"] == pytest.approx(4.0) and fit["r2"] == pytest.approx(1.0)
    rising = gao_fit(curve, "rm")
    assert rising["alpha"] == pytest.approx(1.0) and rising["beta"] == pytest.approx(-0.1)
    assert rising["peak_kl"] is None


def test_the_reward_models_accuracy_on_a_policys_own_samples_is_over_its_decided_pairs():
    rng = random.Random(3)
    rm = torch.tensor([[rng.choice([0.0, 1.0, 2.0]) for _ in range(4)] for _ in range(5)])
    oracle = torch.tensor([[rng.choice([0.0, 1.0]) for _ in range(4)] for _ in range(5)])
    right = []
    for p in range(5):
        for i in range(4):
            for j in range(i + 1, 4):
                if oracle[p, i] != oracle[p, j]:
                    r = rm[p, i] - rm[p, j]
                    right.append(0.5 if r == 0 else float((r > 0) == (oracle[p, i] > oracle[p, j])))
    assert pair_accuracy(rm, oracle) == pytest.approx(sum(right) / len(right))
    assert math.isnan(pair_accuracy(rm, torch.zeros(5, 4)))  # no pair the oracle decides
