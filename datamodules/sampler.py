"""Counter-based episode sampling, and the same for mini-batches of labelled examples.

Task ``i`` of epoch ``e`` on rank ``r`` is drawn from a generator seeded by ``(seed, stream, r, e, i)``. The whole
state of a training stream is then ``(epoch, position)``, identical in form on every rank, so a checkpoint written by
rank 0 and loaded by every rank restores each rank's own stream exactly. Evaluation streams are fixed: episode ``i`` is
seeded by ``(seed, stream, i)`` alone and ranks take disjoint shards, so every evaluation sees the same episodes no
matter the world size.

Non-episodic training (:class:`BatchLoader`) follows the same pattern: epoch ``e`` is the permutation of all training
examples drawn from a generator seeded by ``(seed, stream, e)``, shared out over the ranks, so its state is again
``(epoch, position)``.

A training loader given an :class:`~datamodules.augmentation.Augmentation` also draws each image's augmentation
parameters, from generators keyed like the batch itself with one more key (:data:`AUGMENTATION_KEY`): task ``i``'s
images from ``(seed, stream, r, e, i, AUGMENTATION_KEY)``, batch ``b``'s examples from ``(seed, stream, r, e, b,
AUGMENTATION_KEY)``. A resumed stream therefore augments its images exactly as the uninterrupted one did.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from datamodules.augmentation import Augmentation, AugmentedBatch
from datamodules.task_batch import ExampleBatch, TaskBatch

Task = tuple[Tensor, Tensor, Tensor, Tensor]
TaskSampler = Callable[[torch.Generator], Task]
BatchSampler = Callable[[list[torch.Generator]], TaskBatch]

# Stream ids keep the splits' episodes independent even under one seed.
STREAMS = {"train": 1, "val": 2, "test": 3, "predict": 4, "batches": 5}
#: Appended to a training batch's keys for the generator of its augmentation parameters.
AUGMENTATION_KEY = 6


def episode_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key; neighbouring counters give unrelated seeds."""
    digest = hashlib.blake2b(struct.pack(f"<{len(keys)}q", *keys), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def episode_generator(*keys: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(episode_seed(*keys))
    return gen


class _EpochCursor:
    """The ``(epoch, position)`` state of a sized loader, saved in checkpoints so that a resumed run continues exactly.

    Lightning does not prefetch from a sized loader, so batches handed out equal batches consumed when a checkpoint is
    written. A restored mid-epoch state continues where it stopped; a finished pass resumes as "start the next epoch".
    A ``fixed`` loader (evaluation) replays epoch 0 on every pass.
    """

    fixed = False
    num_batches: int

    def _start_cursor(self) -> None:
        self.epoch = 0  # epoch of the pass in progress (or of the first pass, before it starts)
        self.position = 0  # batches of the current pass already handed out
        self._started = False
        self._resume = False

    def _positions(self) -> Iterator[int]:
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
            yield index

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "started": self._started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._started = bool(state["started"])
        self._resume = self._started and self.position < self.num_batches


class EpisodeLoader(_EpochCursor):
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
        augmentation: training only: draw augmentation parameters for every image (the batches are then
            :class:`~datamodules.augmentation.AugmentedBatch` es, applied on the device).

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
        augmentation: Augmentation | None = None,
    ) -> None:
        if (num_batches is None) == (num_episodes is None):
            raise ValueError("give exactly one of num_batches (training) and num_episodes (evaluation)")
        if augmentation is not None and num_episodes is not None:
            raise ValueError("evaluation episodes are never augmented")
        self.sample_task = sample_task
        self.sample_batch = sample_batch
        self.augmentation = augmentation
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
        self._start_cursor()

    def __len__(self) -> int:
        return self.num_batches

    def episode_ids(self, batch: int) -> list[tuple[int, ...]]:
        """The generator keys of the tasks in batch ``batch`` of the current epoch."""
        if self.fixed:
            ids = self.episodes[batch * self.meta_batch_size : (batch + 1) * self.meta_batch_size]
            return [(self.seed, self.stream, i) for i in ids]
        first = batch * self.meta_batch_size
        return [(self.seed, self.stream, self.rank, self.epoch, first + t) for t in range(self.meta_batch_size)]

    def batch(self, index: int) -> TaskBatch | AugmentedBatch:
        ids = self.episode_ids(index)
        generators = [episode_generator(*keys) for keys in ids]
        if self.sample_batch is not None:
            batch = self.sample_batch(generators)
        else:
            batch = TaskBatch.stack([self.sample_task(g) for g in generators])
        if self.augmentation is None:
            return batch
        return self.augmentation.draw_tasks(batch, [episode_generator(*keys, AUGMENTATION_KEY) for keys in ids])

    def __iter__(self) -> Iterator[TaskBatch | AugmentedBatch]:
        for index in self._positions():
            yield self.batch(index)


class BatchLoader(_EpochCursor):
    """A sized, stateful iterable of :class:`ExampleBatch` es: every epoch one permutation of all examples.

    Epoch ``e`` orders the ``num_examples`` examples by a permutation drawn from a generator seeded by
    ``(seed, stream, e)`` alone; rank ``r`` of ``world_size`` takes positions ``r, r + world_size, ...`` of it
    (the permutation is extended by its own first entries to a multiple of ``world_size``, so that every rank takes
    as many steps), in batches of ``batch_size`` (the last one smaller). On one process an epoch therefore hands out
    every example exactly once. The state is ``(epoch, position)``, as for :class:`EpisodeLoader`.

    Args:
        take: returns the batch of the given example indices (``long [B]``).
        num_examples: examples in the split.
        batch_size: examples per batch on each rank.
        seed: the run's seed.
        stream: keeps this stream independent of the episode streams (see :data:`STREAMS`).
        rank, world_size: this process's place in distributed training.
        augmentation: draw augmentation parameters for every image (the batches are then
            :class:`~datamodules.augmentation.AugmentedBatch` es, applied on the device).
    """

    def __init__(
        self,
        take: Callable[[Tensor], ExampleBatch],
        *,
        num_examples: int,
        batch_size: int,
        seed: int,
        stream: int = STREAMS["batches"],
        rank: int = 0,
        world_size: int = 1,
        augmentation: Augmentation | None = None,
    ) -> None:
        if num_examples <= 0 or batch_size <= 0:
            raise ValueError(f"num_examples and batch_size must be positive, got {num_examples} and {batch_size}")
        self.take = take
        self.augmentation = augmentation
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.rank = rank
        self.world_size = world_size
        self.per_rank = math.ceil(num_examples / world_size)
        self.num_batches = math.ceil(self.per_rank / batch_size)
        self._start_cursor()
        self._order: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def order(self, epoch: int | None = None) -> Tensor:
        """This rank's example indices of ``epoch`` (default: the current one), in the order they are handed out."""
        epoch = self.epoch if epoch is None else epoch
        if self._order is None or self._order[0] != epoch:
            perm = torch.randperm(self.num_examples, generator=episode_generator(self.seed, self.stream, epoch))
            padded = self.per_rank * self.world_size
            if padded > self.num_examples:
                perm = torch.cat([perm, perm[: padded - self.num_examples]])
            self._order = (epoch, perm[self.rank :: self.world_size])
        return self._order[1]

    def batch(self, index: int) -> ExampleBatch | AugmentedBatch:
        """Batch ``index`` of the current epoch."""
        batch = self.take(self.order()[index * self.batch_size : (index + 1) * self.batch_size])
        if self.augmentation is None:
            return batch
        keys = (self.seed, self.stream, self.rank, self.epoch, index, AUGMENTATION_KEY)
        return self.augmentation.draw_examples(batch, episode_generator(*keys))

    def __iter__(self) -> Iterator[ExampleBatch | AugmentedBatch]:
        for index in self._positions():
            yield self.batch(index)
