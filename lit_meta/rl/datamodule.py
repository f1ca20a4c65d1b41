"""The meta-RL datamodule: meta-batches of tasks (goals and seeds), never trajectories.

The tasks are Finn et al.'s 2-D navigation goals (:mod:`lit_meta.rl.navigation`) or a HalfCheetah goal velocity or
direction (:mod:`lit_meta.rl.locomotion`), chosen by ``environment``.

A batch holds only what defines its tasks. Trajectories are collected inside the algorithm's ``training_step``,
first with the current policy and then with the adapted ones: both depend on the parameters of that very step, so
no loader could produce them ahead of time.

Tasks come from :class:`~datamodules.sampler.EpisodeLoader`: task ``i`` of epoch ``e`` on rank ``r`` is drawn from a
generator seeded by ``(seed, stream, r, e, i)``, so the training stream resumes exactly from a checkpoint
(``state_dict``), and validation and test are fixed task sets shared out over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from datamodules.base import EpisodicDataModule
from datamodules.errors import ConfigError
from lit_meta.rl.locomotion import HALFCHEETAH_KINDS, HalfCheetahTasks
from lit_meta.rl.navigation import Navigation2D

#: The task distributions ``environment`` names.
ENVIRONMENTS = ("navigation2d", *HALFCHEETAH_KINDS)

#: Seeds of the rollouts' exploration noise are drawn below this bound (they fit an int64 tensor).
SEED_BOUND = 2**62


@dataclass
class NavigationTasks:
    """A meta-batch of tasks (the name is historical: HalfCheetah tasks use it too).

    Attributes:
        goals: ``[T, 2]`` navigation goals, or ``[T, 1]`` HalfCheetah goal velocities or directions.
        seeds: ``[T]`` int64; each task's rollouts draw their noise from generators keyed by it.
    """

    goals: Tensor
    seeds: Tensor

    @property
    def num_tasks(self) -> int:
        return self.goals.shape[0]

    def to(self, device: torch.device | str) -> "NavigationTasks":
        return NavigationTasks(self.goals.to(device), self.seeds.to(device))


class RolloutDataModule(EpisodicDataModule):
    """Meta-batches of Finn et al.'s (2017, section 5.3) RL tasks: 2-D navigation goals uniform in ``goal_range^2``,
    or HalfCheetah goal velocities uniform in ``velocity_range`` or directions ``+-1``.

    Args:
        environment: ``navigation2d``, ``halfcheetah_vel`` or ``halfcheetah_dir`` (the algorithm's must match).
        meta_batch_size: tasks per training step (Finn et al.: 20); per rank under DDP.
        train_batches: meta-iterations per epoch.
        val_episodes: fixed validation tasks.
        test_episodes: fixed test tasks.
        eval_meta_batch_size: tasks per evaluation batch.
        goal_range: the square the navigation goals are drawn from.
        velocity_range: the interval the HalfCheetah goal velocities are drawn from.
        monitor: the validation value the best checkpoint is chosen on (higher is better): ``return_1``, the return
            after one adaptation step, or ``return_k`` for another number of steps (``return_0`` for the oracle,
            which does not adapt).
        seed: seeds every task (see :mod:`datamodules.sampler`).
    """

    task_type = "reinforcement"

    def __init__(
        self,
        meta_batch_size: int = 20,
        train_batches: int = 10,
        val_episodes: int = 40,
        test_episodes: int = 100,
        eval_meta_batch_size: int = 20,
        goal_range: tuple[float, float] = (-0.5, 0.5),
        velocity_range: tuple[float, float] = (0.0, 2.0),
        environment: str = "navigation2d",
        monitor: str = "return_1",
        seed: int = 0,
    ) -> None:
        super().__init__(
            ways=1,
            shots=1,
            queries=1,
            meta_batch_size=meta_batch_size,
            train_batches=train_batches,
            val_episodes=val_episodes,
            test_episodes=test_episodes,
            eval_meta_batch_size=eval_meta_batch_size,
            seed=seed,
        )
        low, high = goal_range
        if not low <= high:
            raise ConfigError(f"goal_range must be (low, high) with low <= high, got {tuple(goal_range)}")
        self.goal_range = (float(low), float(high))
        if environment not in ENVIRONMENTS:
            raise ConfigError(f"environment must be one of {', '.join(ENVIRONMENTS)}, got {environment!r}")
        self.environment = environment
        self.env: Navigation2D | HalfCheetahTasks
        if environment == "navigation2d":
            self.env = Navigation2D(goal_range=self.goal_range)
        else:
            self.env = HalfCheetahTasks(kind=environment, velocity_range=(float(velocity_range[0]), float(velocity_range[1])))
        if not (monitor.startswith("return_") and monitor[len("return_") :].isdigit()):
            raise ConfigError(f"monitor must be return_k (the return after k adaptation steps), got {monitor!r}")
        #: The checkpoint callback keeps the best checkpoint on this validation value (see ``MetaCheckpoint``).
        self.validation_metric = (f"val/{monitor}", "max")

    def sample_tasks(self, split: str, generators: list[torch.Generator]) -> NavigationTasks:  # type: ignore[override]
        """Task ``t`` (its goal, then its rollout seed) from ``generators[t]`` alone."""
        goals, seeds = [], []
        for generator in generators:
            goals.append(self.env.sample_goals(generator))
            seeds.append(torch.randint(0, SEED_BOUND, (1,), generator=generator))
        return NavigationTasks(torch.cat(goals), torch.cat(seeds))

    def prepare_batch(self, batch: NavigationTasks) -> NavigationTasks:  # type: ignore[override]
        """Goals are already floats: nothing to convert."""
        return batch

    def sample_task(self, split: str, generator: torch.Generator):  # type: ignore[override]
        raise ConfigError(f"{type(self).__name__} draws whole meta-batches of tasks (sample_tasks), not episodes")
