r"""Meta-SGD (Li, Zhou, Chen & Li, 2017): MAML with a learned learning rate for every parameter entry.

The inner update uses a vector of learning rates ``alpha`` of the same shape as ``theta``, applied element-wise:

    theta_{j+1} = theta_j - alpha \circ grad L_S(theta_j),

and the outer loop learns the initialization and the rates together,

    min_{theta, alpha}  (1/T) sum_t L_Q^t(theta_k^t(theta, alpha)).

``alpha`` starts at ``inner_lr`` everywhere. The paper takes one inner step; more are allowed (the same ``alpha`` at
every step). With ``first_order`` the inner gradients are constants, but ``alpha`` still gets its meta-gradient
``-grad L_S(theta_j) \circ grad_{theta_k} L_Q`` through the update.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from datamodules.errors import ConfigError
from lit_meta.adaptation import StepSize
from lit_meta.algorithms.maml import MAML, parameter_key


class MetaSGD(MAML):
    """Meta-SGD: per-parameter learned inner learning rates, meta-learned with the initialization.

    The rates live in ``self.inner_lrs``, a :class:`~torch.nn.ParameterDict` keyed by parameter name (``.``
    replaced by ``-``), each shaped like its parameter; the outer optimizer updates them with the backbone.

    Args:
        backbone: the network being meta-learned.
        inner_lr: the initial value of every learned rate.
        inner_steps: inner steps in training (1 in the paper).
        eval_inner_steps: inner steps at evaluation.
        first_order: drop second-order terms.
        **kwargs: MAML's multi-step loss / derivative-order annealing / ``transductive`` options and the
            :class:`~lit_meta.algorithms.base.MetaLearner` arguments. ``lslr`` is Meta-SGD's own mechanism and cannot be
            combined with it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        **kwargs,
    ) -> None:
        if kwargs.get("lslr"):
            raise ConfigError("MetaSGD learns a rate per parameter entry already: lslr cannot be combined with it")
        if inner_steps == 0:
            raise ConfigError("MetaSGD learns its rates through the inner steps of training: inner_steps must be positive")
        super().__init__(backbone, inner_lr, inner_steps, eval_inner_steps, first_order, **kwargs)
        self.inner_lrs = nn.ParameterDict(
            {parameter_key(name): nn.Parameter(torch.full_like(p, float(inner_lr))) for name, p in self.fast_parameters().items()}
        )

    def step_size(self, training: bool) -> StepSize:
        """``{parameter name: learned rate tensor}`` (detached at evaluation, where no meta-gradient is needed)."""
        rates: dict[str, Tensor] = {name: self.inner_lrs[parameter_key(name)] for name in self.fast_parameters()}
        if not training:
            rates = {name: r.detach() for name, r in rates.items()}
        return rates
