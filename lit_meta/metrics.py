"""Episode metrics: mean with a 95% confidence interval over evaluation episodes."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


class MeanConfidenceInterval(Metric):
    """Mean of per-episode values with the half-width of its 95% normal confidence interval, ``1.96 s / sqrt(n)``.

    States are sums, reduced by addition across processes, so under DDP the result covers every episode of every
    rank exactly once.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, z: float = 1.96, **kwargs) -> None:
        super().__init__(**kwargs)
        self.z = z
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
        return mean, self.z * var.sqrt() / n.sqrt()
