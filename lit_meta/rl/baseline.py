"""Returns, rllab's linear feature baseline and (generalized) advantages, per task.

For a trajectory with rewards ``r_t``, valid steps ``m_t`` and discount ``gamma``:

.. math::

    R_t = \\sum_{k \\ge t} \\gamma^{k-t} r_k m_k, \\qquad
    \\phi(s_t, t) = \\big[s_t,\\ s_t^2,\\ t/100,\\ (t/100)^2,\\ (t/100)^3,\\ 1\\big]

(rllab's ``LinearFeatureBaseline``, observations clipped to ``[-10, 10]``). The baseline of a task is
``b = phi w`` with ``w`` the regularized least-squares fit ``(Phi^T M Phi + c I) w = Phi^T M R`` over all valid steps of
that task's trajectories (``c = 1e-5``, multiplied by 10 while the solution is not finite, as rllab does).
Advantages are generalized advantage estimates (Schulman et al., 2016),

.. math::

    \\delta_t = r_t + \\gamma b_{t+1} m_{t+1} - b_t, \\qquad A_t = \\sum_{k \\ge t} (\\gamma\\tau)^{k-t} \\delta_k m_k,

which for ``tau = 1`` (rllab's default, Finn et al.'s setting) is ``R_t - b_t``. rllab then centres them per batch
(``center_adv``): ``(A - mean) / (std + 1e-8)`` over the task's valid steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_meta.rl.rollouts import Trajectories


def discounted_cumsum(values: Tensor, mask: Tensor, factor: float) -> Tensor:
    """``out_t = sum_{k >= t} factor^(k-t) values_k mask_k`` along the last dimension."""
    out = torch.empty_like(values)
    running = torch.zeros_like(values[..., 0])
    for t in range(values.shape[-1] - 1, -1, -1):
        running = values[..., t] * mask[..., t] + factor * running
        out[..., t] = running
    return out


def discounted_returns(trajectories: Trajectories, discount: float) -> Tensor:
    """``[T, N, H]`` discounted returns-to-go."""
    return discounted_cumsum(trajectories.rewards, trajectories.mask, discount)


def baseline_features(observations: Tensor) -> Tensor:
    """``[..., H, 2D + 4]`` rllab's features of every step of ``[..., H, D]`` observations."""
    obs = observations.clamp(-10.0, 10.0)
    horizon = obs.shape[-2]
    time = (torch.arange(horizon, device=obs.device, dtype=obs.dtype) / 100.0).expand(*obs.shape[:-1])[..., None]
    return torch.cat([obs, obs.square(), time, time.square(), time.pow(3), torch.ones_like(time)], dim=-1)


def fit_linear_baseline(trajectories: Trajectories, returns: Tensor, reg_coeff: float = 1e-5) -> Tensor:
    """``[T, N, H]`` the values of each task's own least-squares baseline, fitted on that task's trajectories."""
    features = baseline_features(trajectories.observations).to(torch.float64)
    tasks, _, _, width = features.shape
    phi = features.reshape(tasks, -1, width)
    weight = trajectories.mask.reshape(tasks, -1, 1).to(torch.float64)
    target = returns.reshape(tasks, -1, 1).to(torch.float64)
    gram = phi.transpose(1, 2) @ (weight * phi)
    moment = phi.transpose(1, 2) @ (weight * target)
    eye = torch.eye(width, dtype=torch.float64, device=phi.device)
    for _ in range(5):
        coeffs = torch.linalg.solve(gram + reg_coeff * eye, moment)
        if torch.isfinite(coeffs).all():
            break
        reg_coeff *= 10.0
    values = (phi @ coeffs).reshape(returns.shape)
    return values.to(returns.dtype) * trajectories.mask


def advantages(
    trajectories: Trajectories,
    discount: float = 0.99,
    gae_lambda: float = 1.0,
    normalize: bool = True,
    reg_coeff: float = 1e-5,
) -> Tensor:
    """``[T, N, H]`` advantages of every step (zero on masked steps), with each task's own linear baseline.

    Args:
        trajectories: the batch.
        discount: ``gamma``.
        gae_lambda: ``tau`` of generalized advantage estimation; 1 gives ``R_t - b_t``.
        normalize: centre and scale per task over its valid steps (rllab's ``center_adv``).
        reg_coeff: the least-squares ridge ``c``.
    """
    mask = trajectories.mask
    values = fit_linear_baseline(trajectories, discounted_returns(trajectories, discount), reg_coeff)
    next_values = torch.cat([values[..., 1:] * mask[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = trajectories.rewards + discount * next_values - values
    adv = discounted_cumsum(deltas, mask, discount * gae_lambda)
    if normalize:
        count = mask.sum(dim=(1, 2), keepdim=True)
        mean = (adv * mask).sum(dim=(1, 2), keepdim=True) / count
        # rllab's np.std: the population standard deviation.
        std = (((adv - mean) * mask).square().sum(dim=(1, 2), keepdim=True) / count).sqrt()
        adv = (adv - mean) / (std + 1e-8)
    return adv * mask
