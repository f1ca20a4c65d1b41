"""Gymnasium reward wrappers for the HalfCheetah task distributions of :mod:`lit_meta.rl.locomotion`.

Both wrap gymnasium's ``HalfCheetah-v5`` environment (its dynamics, observations and resets) and replace its reward
by Finn et al.'s, with ``v = (x_after - x_before) / dt`` the forward velocity of the step and ``a`` the action
clipped to the action box:

* :class:`HalfCheetahVel`: ``r = -|v - goal| - 0.05 |a|^2``;
* :class:`HalfCheetahDir`: ``r = goal * v - 0.05 |a|^2`` with ``goal`` in ``{-1, +1}``.

The goal is set per episode with :meth:`HalfCheetahTaskWrapper.set_goal`, so one environment instance serves any
number of tasks. This module imports gymnasium: import it only once :func:`~lit_meta.rl.locomotion.require_gymnasium`
has passed.
"""

from __future__ import annotations

import abc
import warnings
from typing import Any

import gymnasium
import mujoco
import numpy as np
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

#: rllab's ``ctrl_cost = 1e-1 * 0.5 * sum(a^2)``.
CONTROL_COST = 0.05


class HalfCheetahTaskWrapper(gymnasium.Wrapper, abc.ABC):
    """``HalfCheetah-v5`` with a task's reward (subclasses define :meth:`task_reward`).

    Args:
        env: a ``HalfCheetah-v5`` environment; ``None`` builds one (without gymnasium's time limit and checker
            wrappers: the sampler counts steps itself).
        goal: the initial goal.
    """

    def __init__(self, env: gymnasium.Env | None = None, goal: float = 0.0) -> None:
        super().__init__(HalfCheetahEnv() if env is None else env)
        self.goal = float(goal)

    def set_goal(self, goal: float) -> None:
        """The task of the following steps."""
        self.goal = float(goal)

    @abc.abstractmethod
    def task_reward(self, forward_velocity: float) -> float:
        """The task's running reward of a step with this forward velocity (before the control cost)."""

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        # rllab's normalize clipped the policy's action to the box before the simulator and the control cost saw it.
        space = self.env.action_space
        action = np.clip(np.asarray(action, dtype=np.float64), space.low, space.high)
        observation, _, terminated, truncated, info = self.env.step(action)
        control = CONTROL_COST * float(np.square(action).sum())
        forward = self.task_reward(float(info["x_velocity"]))
        info = {**info, "reward_task": forward, "reward_ctrl": -control, "goal": self.goal}
        return observation, forward - control, terminated, truncated, info


class HalfCheetahVel(HalfCheetahTaskWrapper):
    """Run at the goal velocity: ``-|v - goal|`` minus the control cost."""

    def task_reward(self, forward_velocity: float) -> float:
        return -abs(forward_velocity - self.goal)


class HalfCheetahDir(HalfCheetahTaskWrapper):
    """Run in the goal direction (``goal = +1`` forward, ``-1`` backward): ``goal * v`` minus the control cost."""

    def task_reward(self, forward_velocity: float) -> float:
        return self.goal * forward_velocity


WRAPPERS: dict[str, type[HalfCheetahTaskWrapper]] = {"halfcheetah_vel": HalfCheetahVel, "halfcheetah_dir": HalfCheetahDir}


def _python_warning(message: str) -> None:
    warnings.warn(f"MuJoCo: {message.strip()}", RuntimeWarning, stacklevel=2)


def make_halfcheetah(kind: str, goal: float = 0.0) -> HalfCheetahTaskWrapper:
    """A fresh environment of task distribution ``kind`` (see :data:`lit_meta.rl.locomotion.HALFCHEETAH_KINDS`)."""
    # MuJoCo prints each warning of the model compiler (MuJoCo 4 deprecates an attribute of gymnasium's model file)
    # to the terminal and appends it to MUJOCO_LOG.TXT in the working directory, once per environment: hundreds of
    # lines per batch. As a Python warning it is shown once and can be filtered.
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(_python_warning)
    try:
        return WRAPPERS[kind](goal=goal)
    finally:
        mujoco.set_mju_user_warning(previous)


class EnvGroup:
    """The environments one process steps, one per trajectory of a batch (grown on demand, reused across batches).

    Args:
        kind: the task distribution of every environment.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.envs: list[HalfCheetahTaskWrapper] = []
        self.active = 0

    def reset(self, goals: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Start one episode per entry of ``goals [E]``, environment ``e`` reset with ``seeds[e]``: ``[E, D]``."""
        while len(self.envs) < len(goals):
            self.envs.append(make_halfcheetah(self.kind))
        self.active = len(goals)
        observations = []
        for env, goal, seed in zip(self.envs, goals, seeds):
            env.set_goal(float(goal))
            observation, _ = env.reset(seed=int(seed))
            observations.append(observation)
        return np.stack(observations)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Step the active environments with ``actions [E, A]``: ``(observations [E, D], rewards [E])``."""
        if len(actions) != self.active:
            raise ValueError(f"{len(actions)} actions for {self.active} running environments")
        observations, rewards = [], []
        for env, action in zip(self.envs, actions):
            observation, reward, _, _, _ = env.step(action)
            observations.append(observation)
            rewards.append(reward)
        return np.stack(observations), np.asarray(rewards)


def serve(connection: Any, kind: str) -> None:
    """A worker process's loop: answer ``("reset", (goals, seeds))`` and ``("step", actions)`` until ``("close", None)``."""
    group = EnvGroup(kind)
    while True:
        command, payload = connection.recv()
        if command == "close":
            connection.close()
            return
        try:
            result = group.reset(*payload) if command == "reset" else group.step(payload)
        except Exception as error:  # the parent re-raises it: a worker must not die silently
            connection.send(("error", repr(error)))
        else:
            connection.send(("ok", result))
