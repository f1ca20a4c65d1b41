"""Trust-region policy optimization's step (Schulman et al., 2015), on flat parameter vectors.

To minimize a surrogate loss ``L`` subject to ``KL(pi_old || pi_new) <= delta``, with ``g = grad L`` and ``F`` the
Hessian of the mean KL at the current parameters (the Fisher information):

1. ``x = (F + lambda I)^{-1} g`` by conjugate gradient (10 iterations, damping ``lambda``), using Fisher-vector
   products only;
2. the full step ``s = -sqrt(2 delta / (x^T F x)) x``, whose quadratic KL model equals ``delta``;
3. backtracking: the first ``theta + beta^j s`` (``j = 0..max_backtracks-1``) whose exact surrogate is below the
   current one and whose exact KL is at most ``delta`` is taken; if none is, the parameters do not move.

These are rllab's ``ConjugateGradientOptimizer`` defaults (``backtrack_ratio = 0.8``, 15 backtracks,
``reg_coeff = 1e-5``), which Finn et al.'s MAML-TRPO used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10, residual_tol: float = 1e-10) -> Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite ``A`` given as ``matvec``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r.dot(r)
    for _ in range(iterations):
        if rr <= residual_tol:
            break
        ap = matvec(p)
        alpha = rr / p.dot(ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


@dataclass
class TRPOStep:
    """What one TRPO step did.

    Attributes:
        parameters: the new flat parameters (the old ones when no step was accepted).
        accepted: whether a step passed the line search.
        loss_before, loss_after: the surrogate at the old and new parameters.
        kl: the mean KL between the old and new policies (0 when nothing was accepted).
        backtracks: how many shrinkings the accepted step took (``max_backtracks`` when none was accepted).
    """

    parameters: Tensor
    accepted: bool
    loss_before: float
    loss_after: float
    kl: float
    backtracks: int


def trpo_step(
    parameters: Tensor,
    gradient: Tensor,
    fisher_vector_product: Callable[[Tensor], Tensor],
    evaluate: Callable[[Tensor], tuple[Tensor, Tensor]],
    loss_before: float,
    max_kl: float = 0.01,
    cg_iters: int = 10,
    damping: float = 1e-5,
    backtrack_ratio: float = 0.8,
    max_backtracks: int = 15,
) -> TRPOStep:
    """One constrained step from ``parameters``.

    Args:
        parameters: the current flat parameters.
        gradient: ``grad L`` there.
        fisher_vector_product: ``v -> F v``.
        evaluate: ``flat parameters -> (surrogate, mean KL from the current policy)``, exactly.
        loss_before: the surrogate at ``parameters``.
        max_kl: ``delta``.
        cg_iters, damping: the conjugate-gradient solve of ``(F + damping I) x = g``.
        backtrack_ratio, max_backtracks: the line search.
    """
    direction = conjugate_gradient(lambda v: fisher_vector_product(v) + damping * v, gradient, cg_iters)
    curvature = float(direction.dot(fisher_vector_product(direction)))
    scale = math.sqrt(2.0 * max_kl / (curvature + 1e-8))
    full_step = -scale * direction
    for j in range(max_backtracks):
        candidate = parameters + backtrack_ratio**j * full_step
        loss, kl = evaluate(candidate)
        loss, kl = float(loss), float(kl)
        if math.isfinite(loss) and math.isfinite(kl) and loss < loss_before and kl <= max_kl:
            return TRPOStep(candidate, True, loss_before, loss, kl, j)
    return TRPOStep(parameters.clone(), False, loss_before, loss_before, 0.0, max_backtracks)
