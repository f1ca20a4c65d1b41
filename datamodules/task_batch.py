"""The one task contract between datamodules and algorithms."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class TaskBatch:
    """A meta-batch of ``T`` few-shot tasks.

    Attributes:
        support_x: ``[T, N*K, ...]`` support inputs.
        support_y: ``[T, N*K]`` support targets: class labels ``0..N-1`` per task (long), or float targets
            for regression (``[T, N*K, D]``).
        query_x: ``[T, N*Q, ...]`` query inputs.
        query_y: ``[T, N*Q]`` query targets, same convention as ``support_y``.

    Image inputs may be ``uint8``; the datamodule turns them into float after the batch reached its device
    (``on_after_batch_transfer``), so only a quarter of the bytes cross the bus. Lightning moves a dataclass of
    tensors to the device as one object.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        t = self.support_x.shape[0]
        for f in fields(self):
            value = getattr(self, f.name)
            if value.shape[0] != t:
                raise ValueError(f"TaskBatch.{f.name} has {value.shape[0]} tasks, support_x has {t}: the leading dimension must be T for every field")
        if self.support_x.shape[1] != self.support_y.shape[1] or self.query_x.shape[1] != self.query_y.shape[1]:
            raise ValueError("TaskBatch inputs and targets disagree on the number of examples per task")

    @property
    def num_tasks(self) -> int:
        """``T``, the number of tasks in the meta-batch."""
        return self.support_x.shape[0]

    @property
    def is_classification(self) -> bool:
        return not torch.is_floating_point(self.support_y)

    @property
    def ways(self) -> int:
        """``N``, the number of classes per task (classification only)."""
        return int(self.support_y.max().item()) + 1

    def to(self, *args, **kwargs) -> "TaskBatch":
        return TaskBatch(*(getattr(self, f.name).to(*args, **kwargs) for f in fields(self)))

    def task(self, i: int) -> "TaskBatch":
        """The ``i``-th task as a meta-batch of one."""
        return TaskBatch(*(getattr(self, f.name)[i : i + 1] for f in fields(self)))

    def chunks(self, size: int) -> list["TaskBatch"]:
        """Split along the task dimension into meta-batches of at most ``size`` tasks."""
        return [TaskBatch(*parts) for parts in zip(*(getattr(self, f.name).split(size) for f in fields(self)))]

    @staticmethod
    def stack(tasks: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]]) -> "TaskBatch":
        """Build a meta-batch from per-task ``(support_x, support_y, query_x, query_y)`` tuples."""
        return TaskBatch(*(torch.stack(parts) for parts in zip(*tasks)))

    @staticmethod
    def cat(batches: Sequence["TaskBatch"]) -> "TaskBatch":
        """Concatenate meta-batches along the task dimension."""
        return TaskBatch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in fields(TaskBatch)))


@dataclass
class ExampleBatch:
    """A mini-batch of labelled examples, for non-episodic training (``train_mode: batches``).

    Attributes:
        x: ``[B, ...]`` inputs (images may be ``uint8``, turned into float on the device like a :class:`TaskBatch`).
        y: ``[B]`` class labels, indices into the union of the split's classes.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"ExampleBatch has {self.x.shape[0]} inputs but {self.y.shape[0]} labels")

    @property
    def num_examples(self) -> int:
        """``B``, the number of examples."""
        return self.x.shape[0]

    def to(self, *args, **kwargs) -> "ExampleBatch":
        return ExampleBatch(self.x.to(*args, **kwargs), self.y.to(*args, **kwargs))
