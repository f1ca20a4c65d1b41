"""Finn et al.'s MuJoCo locomotion task distributions: HalfCheetah running at a goal velocity or in a goal direction.

Finn, Abbeel & Levine (ICML 2017, section 5.3) meta-train a half cheetah on two task distributions. With ``v`` the
forward velocity of the torso, ``a`` the action (clipped to the action box ``[-1, 1]^6``) and a horizon of 200 steps,

.. math::

    \\text{vel:}\\quad r_t = -\\lvert v - v^\\ast \\rvert - 0.05 \\lVert a_t \\rVert_2^2, \\quad v^\\ast \\sim U[0, 2],
    \\qquad
    \\text{dir:}\\quad r_t = d\\, v - 0.05 \\lVert a_t \\rVert_2^2, \\quad d \\in \\{-1, +1\\} \\text{ equally likely}.

These are the constants of the authors' reference code (``rllab/envs/mujoco/half_cheetah_env_rand.py`` and
``half_cheetah_env_rand_direc.py`` of ``cbfinn/maml_rl``): ``ctrl_cost = 1e-1 * 0.5 * sum(square(clip(action)))``,
``run_cost = 1. * abs(comvel_x - goal_vel)`` for the velocity task and ``goal_direction * -1 * comvel_x`` for the
direction task, whose direction is ``-1`` when a ``U[0, 2]`` draw is below 1 and ``+1`` otherwise; goal velocities
are ``np.random.uniform(0.0, 2.0)``. The episode never terminates early.

The dynamics, observation and reset are gymnasium's ``HalfCheetah-v5`` (MuJoCo, frame skip 5, ``dt = 0.05``):
observations are ``qpos[1:]`` and ``qvel`` (17 values), resets perturb the initial state by ``U[-0.1, 0.1]`` in
positions and ``0.1 N(0, 1)`` in velocities. Two differences from rllab's environment, stated rather than
emulated: the forward velocity is gymnasium's ``(x_after - x_before) / dt`` of the root joint (rllab read the
torso's centre-of-mass velocity after the step), and the observation omits rllab's three torso centre-of-mass
coordinates. The reward wrappers that apply the formulas above are in :mod:`lit_meta.rl.halfcheetah_env`; this
module only describes the distributions and draws their tasks, so it does not need gymnasium.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from datamodules.errors import ConfigError

#: The task distributions, by the name configs give them.
HALFCHEETAH_KINDS = ("halfcheetah_vel", "halfcheetah_dir")


def require_gymnasium() -> None:
    """Raise a one-line :class:`ConfigError` naming the fix when gymnasium's MuJoCo environments are missing."""
    try:
        import gymnasium  # noqa: F401
        import mujoco  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"the HalfCheetah tasks need gymnasium with MuJoCo ({error}): pip install 'lit-meta[rl]'") from None


@dataclass(frozen=True)
class HalfCheetahTasks:
    """A HalfCheetah task distribution: its goals and the sizes of its spaces.

    Args:
        kind: ``"halfcheetah_vel"`` (goal velocity) or ``"halfcheetah_dir"`` (goal direction).
        horizon: steps per trajectory (Finn et al.: 200).
        velocity_range: the goal velocities of ``halfcheetah_vel`` are uniform in this interval.
    """

    kind: str = "halfcheetah_vel"
    horizon: int = 200
    velocity_range: tuple[float, float] = (0.0, 2.0)

    observation_dim = 17
    action_dim = 6

    def __post_init__(self) -> None:
        if self.kind not in HALFCHEETAH_KINDS:
            raise ConfigError(f"kind must be one of {', '.join(HALFCHEETAH_KINDS)}, got {self.kind!r}")
        if not isinstance(self.horizon, int) or self.horizon <= 0:
            raise ConfigError(f"horizon must be a positive integer, got {self.horizon!r}")
        low, high = self.velocity_range
        if not low <= high:
            raise ConfigError(f"velocity_range must be (low, high) with low <= high, got {tuple(self.velocity_range)}")

    def sample_goals(self, generator: torch.Generator, count: int = 1) -> Tensor:
        """``[count, 1]`` goals from ``generator`` alone: a velocity, or a direction ``-1.0`` / ``+1.0``."""
        if self.kind == "halfcheetah_dir":
            return torch.randint(0, 2, (count, 1), generator=generator).float() * 2.0 - 1.0
        low, high = self.velocity_range
        return torch.rand((count, 1), generator=generator, dtype=torch.float64).float() * (high - low) + low
