"""Rollouts of a policy in many MuJoCo environments at once: tasks x trajectories, stepped in lock-step.

:class:`VectorHalfCheetah` holds one environment per trajectory of a meta-batch (``T`` tasks x ``N`` trajectories)
and steps them all with one batched policy evaluation per time step. With ``num_workers = 1`` the environments live in
this process and are stepped in a loop; with more, they are split into contiguous slices, each stepped by a worker
process (``multiprocessing``, spawned: no state is shared with the parent), so the simulation of the slices runs in
parallel while the parent waits. Either way the trajectories are the same: nothing random happens in the workers.

Randomness (:func:`sample_env_trajectories`): task ``t``'s exploration noise ``[N, H, A]`` and then its ``N`` reset
seeds are drawn from ``generators[t]`` alone, as for the navigation sampler (:mod:`lit_meta.rl.rollouts`): a task's
trajectories do not depend on the other tasks of its meta-batch, nor on the number of workers, and a rerun (or a
resumed run) reproduces them exactly.
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from datamodules.errors import ConfigError
from lit_meta.rl.locomotion import HalfCheetahTasks, require_gymnasium
from lit_meta.rl.policy import policy_forward
from lit_meta.rl.rollouts import Trajectories

#: Reset seeds are drawn below this bound (any non-negative int seeds gymnasium; this one also fits an int32).
RESET_SEED_BOUND = 2**31 - 1


class VectorHalfCheetah:
    """A batch of HalfCheetah environments of one task distribution, stepped together.

    Args:
        kind: the task distribution (:data:`~lit_meta.rl.locomotion.HALFCHEETAH_KINDS`).
        num_workers: processes that step the environments; 1 steps them in this process.
    """

    def __init__(self, kind: str, num_workers: int = 1) -> None:
        self._connections: list[Any] = []
        self._processes: list[Any] = []
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise ConfigError(f"num_workers must be a positive integer, got {num_workers!r}")
        require_gymnasium()
        from lit_meta.rl.halfcheetah_env import EnvGroup, serve

        self.kind = kind
        self.num_workers = num_workers
        self._local = EnvGroup(kind) if num_workers == 1 else None
        self._slices: list[slice] = []
        if num_workers > 1:
            context = multiprocessing.get_context("spawn")
            for _ in range(num_workers):
                parent, child = context.Pipe()
                process = context.Process(target=serve, args=(child, kind), daemon=True)
                process.start()
                child.close()
                self._connections.append(parent)
                self._processes.append(process)

    def _scatter(self, command: str, payloads: list[Any]) -> list[Any]:
        for connection, payload in zip(self._connections, payloads):
            connection.send((command, payload))
        results = []
        for connection in self._connections[: len(payloads)]:
            status, result = connection.recv()
            if status != "ok":
                raise RuntimeError(f"a HalfCheetah worker failed: {result}")
            results.append(result)
        return results

    def reset(self, goals: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Start an episode in environment ``e`` with goal ``goals[e]`` and reset seed ``seeds[e]``: ``[E, D]``."""
        if self._local is not None:
            return self._local.reset(goals, seeds)
        bounds = np.linspace(0, len(goals), min(self.num_workers, len(goals)) + 1).round().astype(int)
        self._slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        return np.concatenate(self._scatter("reset", [(goals[s], seeds[s]) for s in self._slices]))

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(observations [E, D], rewards [E])`` after one step of every environment with ``actions [E, A]``."""
        if self._local is not None:
            return self._local.step(actions)
        results = self._scatter("step", [actions[s] for s in self._slices])
        return np.concatenate([o for o, _ in results]), np.concatenate([r for _, r in results])

    def close(self) -> None:
        """Stop the worker processes (a no-op in this process's mode); the object is unusable afterwards."""
        for connection in self._connections:
            try:
                connection.send(("close", None))
                connection.close()
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=5)
        self._connections, self._processes = [], []

    def __del__(self) -> None:
        self.close()


@torch.no_grad()
def sample_env_trajectories(
    policy: nn.Module,
    params: Mapping[str, Tensor],
    envs: VectorHalfCheetah,
    tasks: HalfCheetahTasks,
    goals: Tensor,
    trajectories: int,
    generators: Sequence[torch.Generator],
    batched: bool,
    oracle: bool = False,
) -> Trajectories:
    """Roll out ``trajectories`` episodes of ``tasks.horizon`` steps of the policy in each task.

    Args:
        policy: the module, evaluated with ``params`` (see :func:`~lit_meta.rl.policy.policy_forward`).
        params: shared parameters, or, with ``batched``, per-task parameters with a leading task dimension.
        envs: the environments (grown to ``T * N`` as needed).
        tasks: the task distribution (horizon and sizes).
        goals: ``[T, 1]`` one goal per task.
        trajectories: ``N``, episodes per task.
        generators: ``T`` generators; task ``t``'s noise and reset seeds come from ``generators[t]`` alone.
        batched: whether ``params`` are per task.
        oracle: the policy also observes its task's goal (Finn et al.'s oracle): the goal is appended to every
            observation, which the trajectories then hold (18 values).

    Returns:
        The trajectories; no episode ends early, so the mask is all ones.
    """
    num_tasks = goals.shape[0]
    if len(generators) != num_tasks:
        raise ValueError(f"need one generator per task: {len(generators)} for {num_tasks} tasks")
    horizon, action_dim = tasks.horizon, tasks.action_dim
    noise, seeds = [], []
    for generator in generators:
        noise.append(torch.randn((trajectories, horizon, action_dim), generator=generator, dtype=torch.float32))  # as in rollouts.py
        seeds.append(torch.randint(0, RESET_SEED_BOUND, (trajectories,), generator=generator))
    noise_t = torch.stack(noise).to(device=goals.device, dtype=goals.dtype)
    params = {k: v.detach() for k, v in params.items()}
    flat_goals = goals[:, 0].repeat_interleave(trajectories).cpu().double().numpy()
    obs_np = envs.reset(flat_goals, torch.cat(seeds).numpy())
    observations, actions, rewards = [], [], []
    for t in range(horizon):
        obs = torch.as_tensor(obs_np, dtype=goals.dtype, device=goals.device).reshape(num_tasks, trajectories, -1)
        if oracle:
            obs = torch.cat([obs, goals[:, None, :].expand(num_tasks, trajectories, goals.shape[1])], dim=-1)
        mean, log_std = policy_forward(policy, params, obs, batched)
        action = mean + log_std.exp() * noise_t[:, :, t]
        obs_np, reward = envs.step(action.reshape(num_tasks * trajectories, action_dim).cpu().double().numpy())
        observations.append(obs)
        actions.append(action)
        rewards.append(torch.as_tensor(reward, dtype=goals.dtype, device=goals.device).reshape(num_tasks, trajectories))
    reward_t = torch.stack(rewards, dim=2)
    return Trajectories(
        observations=torch.stack(observations, dim=2),
        actions=torch.stack(actions, dim=2),
        rewards=reward_t,
        mask=torch.ones_like(reward_t),
    )
