"""Counter-based episode sampling.

Task ``i`` of epoch ``e`` on rank ``r`` is drawn from a generator seeded by ``(seed, stream, r, e, i)``. The whole
state of a training stream is then ``(epoch, position)``, identical in form on every rank, so a checkpoint written by
rank 0 and loaded by every rank restores each rank's own stream exactly. Evaluation streams are fixed: episode ``i`` is
seeded by ``(seed, stream, i)`` alone and ranks take disjoint shards, so every evaluation sees the same episodes no
matter the world size.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from datamodules.task_batch import TaskBatch

Task = tuple[Tensor, Tensor, Tensor, Tensor]
TaskSampler = Callable[[torch.Generator], Task]
BatchSampler = Callable[[list[torch.Generator]], TaskBatch]

# Stream ids keep the splits' episodes independent even under one seed.
STREAMS = {"train": 1, "val": 2, "test": 3, "predict": 4}


def episode_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key; neighbouring counters give unrelated seeds."""
    digest = hashlib.blake2b(struct.pack(f"<{len(keys)}q", *keys), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def episode_generator(*keys: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(episode_seed(*keys))
    return gen


class EpisodeLoader:
    """A sized, stateful iterable of :class:`TaskBatch` es.

    Args:
        sample_task: draws one task from the generator it is given.
        meta_batch_size: tasks per batch (``T``).
        seed: the run's seed.
        stream: which split (see :data:`STREAMS`); keeps splits independent.
        num_batches: training only: batches per epoch on each rank.
        num_episodes: evaluation only: the total number of fixed episodes, shared out over the ranks.
        rank, world_size: this process's place in distributed training.
        sample_batch: optional; draws a whole meta-batch, task ``t`` from the ``t``-th generator only (to vectorize
            the gather across tasks); replaces stacking ``sample_task`` calls.

    Exactly one of ``num_batches`` (a training stream, new episodes every epoch) and ``num_episodes`` (a fixed
    evaluation set) is given.
    """

    def __init__(
        self,
        sample_task: TaskSampler,
        *,
        meta_batch_size: int,
        seed: int,
        stream: int,
        num_batches: int | None = None,
        num_episodes: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        sample_batch: BatchSampler | None = None,
    ) -> None:
        if (num_batches is None) == (num_episodes is None):
            raise ValueError("give exactly one of num_batches (training) and num_episodes (evaluation)")
        self.sample_task = sample_task
        self.sample_batch = sample_batch
        self.meta_batch_size = meta_batch_size
        self.seed = seed
        self.stream = stream
        self.rank = rank
        self.world_size = world_size
        self.fixed = num_episodes is not None
        if self.fixed:
            self.episodes = list(range(rank, num_episodes, world_size))
            self.num_batches = math.ceil(len(self.episodes) / meta_batch_size)
        else:
            self.num_batches = num_batches
        self.epoch = 0  # epoch of the pass in progress (or of the first pass, before it starts)
        self.position = 0  # batches of the current pass already handed out
        self._started = False
        self._resume = False

    def __len__(self) -> int:
        return self.num_batches

    def episode_ids(self, batch: int) -> list[tuple[int, ...]]:
        """The generator keys of the tasks in batch ``batch`` of the current epoch."""
        if self.fixed:
            ids = self.episodes[batch * self.meta_batch_size : (batch + 1) * self.meta_batch_size]
            return [(self.seed, self.stream, i) for i in ids]
        first = batch * self.meta_batch_size
        return [(self.seed, self.stream, self.rank, self.epoch, first + t) for t in range(self.meta_batch_size)]

    def batch(self, index: int) -> TaskBatch:
        generators = [episode_generator(*keys) for keys in self.episode_ids(index)]
        if self.sample_batch is not None:
            return self.sample_batch(generators)
        return TaskBatch.stack([self.sample_task(g) for g in generators])

    def __iter__(self) -> Iterator[TaskBatch]:
        # Lightning does not prefetch from a sized loader, so batches handed out == batches consumed when a
        # checkpoint is written; a restored mid-epoch state continues where it stopped.
        if self._resume:
            self._resume = False
        else:
            if self._started and not self.fixed:
                self.epoch += 1
            self.position = 0
        self._started = True
        while self.position < self.num_batches:
            index = self.position
            self.position += 1
            yield self.batch(index)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "started": self._started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._started = bool(state["started"])
        # A finished pass resumes as "start the next epoch"; an unfinished one continues.
        self._resume = self._started and self.position < self.num_batches
