"""The 95% interval over seeds (dualgpt.evaluation.mean_interval), against plain computations."""
import math
import statistics

import pytest
import torch

from dualgpt.evaluation import mean_interval, t_975


def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x), x >= 0, for Student's t: a half, plus the trapezoid rule on its density from 0 to x (a plain
    reference)."""
    grid = torch.linspace(0.0, x, 200_001, dtype=torch.float64)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = torch.exp(log_c - (df + 1) / 2 * torch.log1p(grid**2 / df))
    return 0.5 + torch.trapezoid(density, grid).item()


@pytest.mark.parametrize("df", [*range(1, 32), 40, 63, 100, 1000])  # the table, then the expansion
def test_the_t_quantiles_are_students(df):
    assert student_t_cdf(t_975(df), df) == pytest.approx(0.975, abs=4e-5)  # the table: 3 decimals


@pytest.mark.parametrize("values", [[2.066, 2.081, 2.052], [0.5, -0.25], [1.0] * 4, list(range(40))])
def test_mean_interval_is_the_mean_and_t_times_the_standard_error(values):
    n = len(values)
    quantile = {3: 4.303, 2: 12.706, 4: 3.182, 40: 2.02269}[n]  # t(0.975, n - 1) from a printed table
    got = mean_interval(values)
    assert got["n"] == n
    assert got["mean"] == pytest.approx(statistics.mean(values))
    assert got["ci"] == pytest.approx(quantile * statistics.stdev(values) / math.sqrt(n), rel=1e-4)


def test_one_value_has_no_interval():
    assert mean_interval([3.0]) == {"mean": 3.0, "ci": None, "n": 1}
