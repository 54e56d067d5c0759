"""The RLHF report's statistics against plain computations on made-up numbers: the matched-KL interpolation,
the win-rate estimator, paired differences over seeds and the delta-method ratio."""
import math
import random
import statistics

import pytest
import torch

from rlhf_lib.report import at_kl, ratio_summary, sample_wins, summarise


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


def test_the_win_rate_counts_ties_half_and_leaves_the_coupled_pair_out():
    rng = random.Random(0)
    score = torch.tensor([[rng.choice([0.0, 1.0, 2.0]) for _ in range(4)] for _ in range(3)])
    base = torch.tensor([[rng.choice([0.0, 1.0, 2.0]) for _ in range(4)] for _ in range(3)])
    for coupled in (False, True):
        got = sample_wins(score, base, coupled=coupled)
        for p in range(3):
            for i in range(4):
                others = [j for j in range(4) if not (coupled and j == i)]
                wins = [1.0 if score[p, i] > base[p, j] else 0.5 if score[p, i] == base[p, j] else 0.0
                        for j in others]
                assert got[p, i].item() == pytest.approx(sum(wins) / len(wins))


def test_a_paired_difference_over_seeds_is_the_t_interval_of_the_per_seed_mean_differences():
    rng = random.Random(1)
    a = [point(1.0, [rng.gauss(0, 1) for _ in range(5)]) for _ in range(3)]
    b = [point(1.0, [rng.gauss(0, 1) for _ in range(5)]) for _ in range(3)]
    got = summarise(a, "oracle", paired_with=b)
    diffs = [statistics.mean(x - y for x, y in zip(s["per_prompt"]["oracle"], t["per_prompt"]["oracle"]))
             for s, t in zip(a, b)]
    assert got["per_seed"] == pytest.approx(diffs)
    assert got["mean"] == pytest.approx(statistics.mean(diffs))
    assert got["ci"] == pytest.approx(4.303 * statistics.stdev(diffs) / math.sqrt(3))
    one = summarise(a[:1], "oracle", paired_with=b[:1])  # one seed: over its prompts, said so
    per_prompt = [x - y for x, y in zip(a[0]["per_prompt"]["oracle"], b[0]["per_prompt"]["oracle"])]
    assert one["over"] == "prompts"
    assert one["ci"] == pytest.approx(2.776 * statistics.stdev(per_prompt) / math.sqrt(5))


def test_the_transfer_ratio_is_a_ratio_of_mean_gains_with_the_delta_method_interval():
    judge = [[0.2, 0.4, 0.3], [0.1, 0.5, 0.2], [0.3, 0.3, 0.3]]
    oracle = [[1.0, 1.2, 0.8], [0.9, 1.1, 1.3], [1.0, 1.0, 1.4]]
    per_seed = [{"gain_judge": j, "gain_oracle": o} for j, o in zip(judge, oracle)]
    got = ratio_summary(per_seed, "gain_judge", "gain_oracle")
    top, bottom = [statistics.mean(j) for j in judge], [statistics.mean(o) for o in oracle]
    ratio = statistics.mean(top) / statistics.mean(bottom)
    residual = [t - ratio * b for t, b in zip(top, bottom)]
    assert got["mean"] == pytest.approx(ratio)
    assert got["ci"] == pytest.approx(4.303 * statistics.stdev(residual) / math.sqrt(3) / statistics.mean(bottom))
