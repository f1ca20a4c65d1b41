"""The 2-D navigation task distribution of Finn, Abbeel & Levine (ICML 2017, section 5.3), in vectorized torch.

A point agent starts at the origin of the plane and must move to a goal ``g`` drawn uniformly from
``[-0.5, 0.5]^2`` (one goal per task). At step ``t`` the policy outputs an action ``a_t`` and the agent moves

.. math::

    s_{t+1} = s_t + \\operatorname{clip}(c\\, a_t, -v, v), \\qquad r_t = -\\lVert s_{t+1} - g \\rVert_2,

with ``v = 0.1`` (the action space is the box ``[-0.1, 0.1]^2``) for a horizon of 100 steps. The observation is the
position ``s_t`` (the oracle baseline also sees the goal). The return of a trajectory is the undiscounted sum of its
rewards: an agent that stays at the origin scores ``-100 ||g||`` (``-38.3`` on average over goals), one that heads
straight for the goal at full speed about ``-0.5`` (every goal is at most 5 steps away, and the episode ends there).

These are the details of the reference implementation (``maml_examples/point_env_randgoal.py`` of the authors'
``maml_rl`` code, built on rllab):

* goals ``np.random.uniform(-0.5, 0.5, size=(2,))``; the state is reset to ``(0, 0)``;
* ``step`` adds the action to the state, the reward is minus the Euclidean distance to the goal *after* the move,
  and the episode ends (``done``) once ``|x - g_x| < 0.01`` and ``|y - g_y| < 0.01``; the steps after it are masked;
* the environment is wrapped in rllab's ``normalize``, which maps a policy action ``a`` in ``[-1, 1]`` to
  ``lb + (a + 1)(ub - lb)/2 = 0.1 a`` and clips it to the box: hence the action scale ``c = 0.1``. A unit-variance
  Gaussian policy thus explores with steps of about 0.1, and the inner learning rate 0.1 acts on that scale.

Everything here is batched over any leading dimensions (tasks x trajectories).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from datamodules.errors import ConfigError


@dataclass(frozen=True)
class Navigation2D:
    """Dynamics and reward of the point agent (the goal distribution is :meth:`sample_goals`).

    Args:
        horizon: steps per trajectory.
        max_speed: half-width ``v`` of the action box: each coordinate moves at most this much per step.
        action_scale: ``c``, the map from the policy's action to a displacement before clipping (rllab's
            ``normalize`` gives 0.1 for the box ``[-0.1, 0.1]``).
        goal_range: goals are uniform in ``goal_range^2``.
        goal_tolerance: the episode ends once both coordinates are closer than this to the goal; ``0`` never ends.
    """

    horizon: int = 100
    max_speed: float = 0.1
    action_scale: float = 0.1
    goal_range: tuple[float, float] = (-0.5, 0.5)
    goal_tolerance: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.horizon, int) or self.horizon <= 0:
            raise ConfigError(f"horizon must be a positive integer, got {self.horizon!r}")
        if not self.max_speed > 0 or not self.action_scale > 0:
            raise ConfigError(f"max_speed and action_scale must be positive, got {self.max_speed} and {self.action_scale}")
        low, high = self.goal_range
        if not low <= high:
            raise ConfigError(f"goal_range must be (low, high) with low <= high, got {tuple(self.goal_range)}")
        if self.goal_tolerance < 0:
            raise ConfigError(f"goal_tolerance must be >= 0, got {self.goal_tolerance}")

    observation_dim = 2
    action_dim = 2

    def sample_goals(self, generator: torch.Generator, count: int = 1) -> Tensor:
        """``[count, 2]`` goals, uniform in ``goal_range^2``, from ``generator`` alone."""
        low, high = self.goal_range
        return torch.rand((count, 2), generator=generator, dtype=torch.float64).float() * (high - low) + low

    def reset(self, goals: Tensor, trajectories: int) -> Tensor:
        """Start positions ``[*goals.shape[:-1], trajectories, 2]``: the origin."""
        return goals.new_zeros((*goals.shape[:-1], trajectories, 2))

    def displacement(self, actions: Tensor) -> Tensor:
        """The move a policy action makes: ``clip(c a, -v, v)`` per coordinate."""
        return (self.action_scale * actions).clamp(-self.max_speed, self.max_speed)

    def step(self, positions: Tensor, actions: Tensor, goals: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One step of every agent.

        Args:
            positions: ``[..., 2]``.
            actions: ``[..., 2]`` policy actions (before scaling and clipping).
            goals: broadcastable to ``positions``.

        Returns:
            ``(next_positions, rewards [...], reached [...])``: reward ``-||s' - g||``, and whether the goal is within
            ``goal_tolerance`` in both coordinates after the move (the end of the episode).
        """
        nxt = positions + self.displacement(actions)
        offset = nxt - goals
        reward = -offset.norm(dim=-1)
        reached = (offset.abs() < self.goal_tolerance).all(dim=-1)
        return nxt, reward, reached

    @staticmethod
    def observe(positions: Tensor, goals: Tensor, oracle: bool = False) -> Tensor:
        """The policy's input: the position, or position and goal for the oracle (``[..., 2]`` or ``[..., 4]``)."""
        if not oracle:
            return positions
        return torch.cat([positions, goals.expand_as(positions)], dim=-1)
