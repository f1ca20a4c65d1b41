"""Lightning callbacks for meta-learning runs."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from datamodules.errors import ConfigError


class Throughput(Callback):
    """Log meta-training speed: tasks per second and meta-steps (optimizer steps) per second.

    Both are measured over the last ``window`` training batches, on wall-clock time between batch ends, so that
    episode sampling and host-to-device transfer count (the data path is part of what a run waits on), while
    validation pauses do not: the window restarts after every validation run.

    Under DDP every rank trains on its own meta-batch in the same step, so ``tasks_per_sec`` counts the tasks of all
    ranks: the per-rank meta-batch times ``world_size``, the effective meta-batch (see ``docs/scaling.md``).
    ``steps_per_sec`` is the same on every rank.

    Logged as ``train/tasks_per_sec`` and ``train/steps_per_sec`` (on step, to the loggers every
    ``log_every_n_steps`` and, with ``prog_bar``, to the progress bar).

    Args:
        window: number of recent batches the rates average over.
        prog_bar: show the rates in the progress bar.
    """

    def __init__(self, window: int = 20, prog_bar: bool = True) -> None:
        super().__init__()
        if not isinstance(window, int) or window < 1:
            raise ConfigError(f"Throughput window must be a positive integer, got {window!r}")
        self.window = window
        self.prog_bar = prog_bar
        # (time, tasks) at the end of each batch; the first entry is a start mark with 0 tasks.
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)

    @staticmethod
    def tasks_in(batch: Any, world_size: int) -> int | None:
        """Tasks of one training step over all ranks (``None`` if the batch has no task count)."""
        tasks = getattr(batch, "num_tasks", None)
        return None if tasks is None else int(tasks) * world_size

    def rates(self) -> tuple[float, float | None] | None:
        """``(steps_per_sec, tasks_per_sec)`` over the current window, or ``None`` before the first step ended."""
        if len(self._marks) < 2:
            return None
        elapsed = self._marks[-1][0] - self._marks[0][0]
        if elapsed <= 0:
            return None
        steps = len(self._marks) - 1
        tasks = [t for _, t in list(self._marks)[1:]]
        tasks_rate = None if any(t < 0 for t in tasks) else sum(tasks) / elapsed
        return steps / elapsed, tasks_rate

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._marks.clear()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation time is not training time: start a new window at the next training batch.
        self._marks.clear()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._marks:
            # The clock starts here, so the fetch of a window's first batch is not timed; every later interval spans
            # the next batch's fetch and its step.
            self._marks.append((time.perf_counter(), 0))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tasks = self.tasks_in(batch, trainer.world_size)
        self._marks.append((time.perf_counter(), -1 if tasks is None else tasks))
        rates = self.rates()
        if rates is None:
            return
        steps_per_sec, tasks_per_sec = rates
        options = dict(on_step=True, on_epoch=False, prog_bar=self.prog_bar, batch_size=1)
        if tasks_per_sec is not None:
            pl_module.log("train/tasks_per_sec", tasks_per_sec, **options)
        pl_module.log("train/steps_per_sec", steps_per_sec, **options)
