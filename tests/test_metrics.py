"""Confidence intervals: Student's t quantiles against published tables, the streaming metric against the batch
computation, and paired differences."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lit_meta.metrics import MeanConfidenceInterval, mean_confidence_interval, paired_difference, student_t_quantile

# t_{0.975, df} from standard tables (e.g. NIST/SEMATECH e-Handbook, Table 1.4.2.7).
T_975 = {1: 12.706, 2: 4.303, 5: 2.571, 10: 2.228, 19: 2.093, 30: 2.042, 100: 1.984, 999: 1.962}


@pytest.mark.parametrize("df,expected", sorted(T_975.items()))
def test_student_t_quantile_matches_the_table(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=6e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-expected, abs=6e-4)


def test_large_df_tends_to_the_normal_quantile():
    assert student_t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)


def test_twenty_runs_use_the_t_interval():
    """Lake's 20 runs: the half-width is t_{0.975,19} s / sqrt(20), 6.8% wider than the normal one."""
    values = torch.tensor([0.95, 1.0, 0.9, 0.85, 1.0, 0.95, 0.9, 1.0, 0.8, 0.95] * 2)
    mean, ci = mean_confidence_interval(values)
    s = statistics.stdev(values.tolist())
    assert mean == pytest.approx(statistics.fmean(values.tolist()))
    assert ci == pytest.approx(2.0930240544 * s / math.sqrt(20), rel=1e-6)


def test_streaming_metric_equals_the_batch_computation():
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    metric = MeanConfidenceInterval()
    for part in values.split(64):
        metric.update(part)
    mean, ci = metric.compute()
    expected = mean_confidence_interval(values)
    assert float(mean) == pytest.approx(expected[0], rel=1e-12)
    assert float(ci) == pytest.approx(expected[1], rel=1e-9)


def test_paired_difference_is_the_interval_of_the_differences():
    g = torch.Generator().manual_seed(1)
    shared = torch.rand(500, generator=g)  # episode difficulty both models see
    a = shared + 0.02 + 0.01 * torch.randn(500, generator=g)
    b = shared + 0.01 * torch.randn(500, generator=g)
    mean, ci = paired_difference(a, b)
    d = (a - b).double().tolist()
    assert mean == pytest.approx(statistics.fmean(d))
    assert ci == pytest.approx(student_t_quantile(0.975, 499) * statistics.stdev(d) / math.sqrt(500), rel=1e-9)
    # Pairing removes the shared variation: far narrower than either model's own interval.
    assert ci < 0.2 * mean_confidence_interval(a)[1]
    assert mean - ci > 0  # the difference is resolved although the two intervals overlap
    assert mean_confidence_interval(a)[0] - mean_confidence_interval(a)[1] < mean_confidence_interval(b)[0] + mean_confidence_interval(b)[1]
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference(a, b[:10])
