"""The Gaussian MLP policy of Finn et al. (2017): two hidden layers of 100 ReLU units and a learned log-std.

.. math::

    \\pi_\\theta(a \\mid s) = \\mathcal N\\big(a;\\ \\mu_\\theta(s),\\ \\operatorname{diag}(e^{2 \\log\\sigma})\\big),

with ``log sigma`` a parameter vector that does not depend on the state (rllab's ``GaussianMLPPolicy`` with
``learn_std`` and ``init_std=1``). The module returns ``(mean, log_std)``, so it works with
:func:`torch.func.functional_call` and, for per-task parameters, under :func:`torch.func.vmap`
(:func:`policy_forward`).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from datamodules.errors import ConfigError
from lit_meta.backbones import Backbone

LOG_2PI = math.log(2.0 * math.pi)


class GaussianMLPPolicy(Backbone):
    """``obs -> hidden (ReLU) -> ... -> mean``, plus a state-independent learned ``log_std``.

    Args:
        in_features: observation size (2 for the navigation task, 17 for HalfCheetah; the oracle's input adds the goal:
            4 and 18).
        hidden: hidden layer widths.
        out_features: action size.
        init_std: the initial standard deviation of every action coordinate.
    """

    def __init__(self, in_features: int = 2, hidden: tuple[int, ...] = (100, 100), out_features: int = 2, init_std: float = 1.0) -> None:
        super().__init__()
        if not init_std > 0:
            raise ConfigError(f"init_std must be positive, got {init_std}")
        sizes = (in_features, *tuple(hidden))
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.mean = nn.Linear(sizes[-1], out_features)
        self.log_std = nn.Parameter(torch.full((out_features,), math.log(init_std)))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean [..., A], log_std [..., A])`` of the action distribution at ``obs [..., D]``."""
        mean = self.mean(self.features(obs))
        return mean, self.log_std.expand_as(mean)


def policy_forward(policy: nn.Module, params: Mapping[str, Tensor], obs: Tensor, batched: bool) -> tuple[Tensor, Tensor]:
    """The policy with ``params``; with ``batched``, every tensor of ``params`` and ``obs`` has a leading task dim.

    Per-task parameters (the adapted policies of a meta-batch) run as one vmapped computation.
    """
    if not batched:
        return functional_call(policy, dict(params), (obs,))
    return torch.func.vmap(lambda p, o: functional_call(policy, p, (o,)))(dict(params), obs)


def gaussian_log_prob(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """``log N(a; mean, diag(exp(2 log_std)))`` summed over the last (action) dimension."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * LOG_2PI).sum(dim=-1)


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """``KL(N_p || N_q)`` of diagonal Gaussians, summed over the last dimension."""
    var_ratio = torch.exp(2.0 * (log_std_p - log_std_q))
    mahalanobis = (mean_p - mean_q).square() * torch.exp(-2.0 * log_std_q)
    return (0.5 * (var_ratio + mahalanobis - 1.0) + log_std_q - log_std_p).sum(dim=-1)
