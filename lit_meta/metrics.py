"""Episode metrics: means with 95% confidence intervals over evaluation episodes, and paired differences.

The interval is Student's ``t`` interval, ``t_{0.975, n-1} s / sqrt(n)``: right for small ``n`` (Lake's 20 one-shot
runs: ``t = 2.093``) and equal to the normal ``1.96 s / sqrt(n)`` to three digits at 1,000 episodes (``1.962``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` (Lentz's continued fraction)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * result / a


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's ``t`` with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's ``t`` with ``df`` degrees of freedom (bisection on the CDF, to 1e-12)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2.0
    while high - low > 1e-12 * max(1.0, high):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if student_t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


def mean_confidence_interval(values: Tensor, confidence: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the ``confidence`` t-interval of ``values`` (``nan`` half-width for one value)."""
    values = values.detach().reshape(-1).to(torch.float64)
    n = values.numel()
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan
    t = student_t_quantile(0.5 + confidence / 2.0, n - 1)
    return mean, t * float(values.std(correction=1)) / math.sqrt(n)


def paired_difference(a: Tensor, b: Tensor, confidence: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of ``a - b`` over the same episodes: the paired comparison of two models.

    Pairing removes the variation between episodes that both models share, so the interval is much narrower than
    the difference of two independent intervals would suggest.
    """
    a, b = a.reshape(-1), b.reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same episodes: got {a.numel()} and {b.numel()} values")
    return mean_confidence_interval(a.to(torch.float64) - b.to(torch.float64), confidence)


class MeanConfidenceInterval(Metric):
    """Mean of per-episode values with the half-width of its ``confidence`` t-interval, ``t s / sqrt(n)``.

    States are sums, reduced by addition across processes, so under DDP the result covers every episode of every
    rank exactly once.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, confidence: float = 0.95, **kwargs) -> None:
        super().__init__(**kwargs)
        self.confidence = confidence
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        values = values.detach().reshape(-1).to(torch.float64)
        self.total += values.sum()
        self.total_sq += values.square().sum()
        self.count += values.numel()

    def compute(self) -> tuple[Tensor, Tensor]:
        n = self.count.to(torch.float64)
        mean = self.total / n
        if self.count < 2:
            return mean, torch.tensor(math.nan, dtype=torch.float64)
        var = ((self.total_sq - n * mean.square()) / (n - 1)).clamp_min(0.0)
        t = student_t_quantile(0.5 + self.confidence / 2.0, int(self.count) - 1)
        return mean, t * var.sqrt() / n.sqrt()
