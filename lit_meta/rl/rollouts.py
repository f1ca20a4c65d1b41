"""Vectorized trajectory sampling over tasks x trajectories.

Every trajectory of every task advances in the same batched tensor operation, one time step at a time:
``[T, N, ...]`` for ``T`` tasks and ``N`` trajectories each. The policy is either shared by the tasks (the
meta-parameters, before adaptation) or per task (parameters with a leading task dimension, after adaptation), so the
same sampler collects the pre- and post-update batches of MAML.

Exploration noise comes from one generator per task, drawn in full before the rollout, so a task's trajectories do
not depend on which other tasks share its meta-batch (nor on the world size), and a rerun reproduces them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from lit_meta.rl.navigation import Navigation2D
from lit_meta.rl.policy import policy_forward


@dataclass
class Trajectories:
    """A batch of trajectories of ``T`` tasks, ``N`` each, horizon ``H``.

    Attributes:
        observations: ``[T, N, H, D]`` what the policy saw at each step.
        actions: ``[T, N, H, A]`` the sampled actions.
        rewards: ``[T, N, H]`` (zero after the episode ended).
        mask: ``[T, N, H]`` 1.0 while the episode runs (the step that reaches the goal included), then 0.0.
    """

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor

    @property
    def num_tasks(self) -> int:
        return self.rewards.shape[0]

    def returns(self) -> Tensor:
        """``[T, N]`` undiscounted return of each trajectory."""
        return (self.rewards * self.mask).sum(dim=-1)

    def average_return(self) -> Tensor:
        """``[T]`` the mean return over each task's trajectories (rllab's ``AverageReturn``)."""
        return self.returns().mean(dim=-1)


@torch.no_grad()
def sample_trajectories(
    policy: nn.Module,
    params: Mapping[str, Tensor],
    env: Navigation2D,
    goals: Tensor,
    trajectories: int,
    generators: Sequence[torch.Generator],
    batched: bool,
    oracle: bool = False,
) -> Trajectories:
    """Roll out ``trajectories`` episodes of the policy in each task.

    Args:
        policy: the module, evaluated with ``params`` (see :func:`~lit_meta.rl.policy.policy_forward`).
        params: shared parameters, or, with ``batched``, per-task parameters with a leading task dimension.
        env: dynamics and reward.
        goals: ``[T, 2]`` one goal per task.
        trajectories: ``N``, episodes per task.
        generators: ``T`` generators; task ``t``'s exploration noise comes from ``generators[t]`` alone.
        batched: whether ``params`` are per task.
        oracle: the policy also observes the goal.
    """
    num_tasks = goals.shape[0]
    if len(generators) != num_tasks:
        raise ValueError(f"need one generator per task: {len(generators)} for {num_tasks} tasks")
    horizon, action_dim = env.horizon, env.action_dim
    # Drawn in float32 whatever the default dtype ("64-true" precision changes it), so that a task's seed gives the
    # same noise at every precision.
    noise = torch.stack([torch.randn((trajectories, horizon, action_dim), generator=g, dtype=torch.float32) for g in generators])
    noise = noise.to(device=goals.device, dtype=goals.dtype)
    params = {k: v.detach() for k, v in params.items()}
    target = goals[:, None, :]
    positions = env.reset(goals, trajectories)
    alive = torch.ones(positions.shape[:-1], device=goals.device, dtype=goals.dtype)
    observations, actions, rewards, masks = [], [], [], []
    for t in range(horizon):
        obs = env.observe(positions, target, oracle)
        mean, log_std = policy_forward(policy, params, obs, batched)
        action = mean + log_std.exp() * noise[:, :, t]
        positions, reward, reached = env.step(positions, action, target)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward * alive)
        masks.append(alive)
        alive = alive * (~reached).to(alive.dtype)
    return Trajectories(
        observations=torch.stack(observations, dim=2),
        actions=torch.stack(actions, dim=2),
        rewards=torch.stack(rewards, dim=2),
        mask=torch.stack(masks, dim=2),
    )
