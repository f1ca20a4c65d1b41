"""Lightning callbacks for meta-learning runs."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

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


class MetaCheckpoint(ModelCheckpoint):
    """``last.ckpt`` and the best checkpoint on the datamodule's validation metric, and nothing lost on interruption.

    The monitored metric follows the datamodule: ``val/acc`` (higher is better) for classification, ``val/mse``
    (lower) for regression. The command line adds this callback to every run.

    **Stopping a run keeps its last step.** ``SIGTERM`` (a job scheduler's stop, ``kill``) and a first ``Ctrl-C``
    end training after the step in progress, and ``last.ckpt`` is written at that step: ``fit --ckpt_path
    .../last.ckpt`` continues exactly where the run stopped, mid-epoch included (the episode loaders' position is in
    the checkpoint). A second ``Ctrl-C`` aborts at once, as usual. Lightning turns ``SIGTERM`` into a stop at the
    next step boundary; this callback routes the first ``SIGINT`` the same way, and saves on that stop (other
    exceptions leave the checkpoints of the last completed epoch as they are). Under DDP (several processes) a stop
    keeps Lightning's behaviour: the run ends and the last epoch's checkpoints remain.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("save_top_k", 1)
        super().__init__(**kwargs)
        self._previous_sigint: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is None:
            dm = trainer.datamodule
            regression = getattr(dm, "task_type", "classification") == "regression"
            self.monitor = "val/mse" if regression else "val/acc"
            self.mode = "min" if regression else "max"
            self.kth_value = torch.tensor(float("inf") if regression else float("-inf"))
            self.filename = "best-{epoch}-{step}"
            self.auto_insert_metric_name = False
        super().setup(trainer, pl_module, stage)

    # ------------------------------------------------------------------------------------------------- last.ckpt
    # Lightning (2.6) writes last.ckpt only at steps where it also wrote a top-k checkpoint, so after an epoch whose
    # validation did not improve, last.ckpt still held an older epoch and a resume from it lost the epochs since.
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._keep_last_current(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._keep_last_current(trainer)

    def _keep_last_current(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # ----------------------------------------------------------------------------------------------- interruption
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Signal handlers can only be set from the main thread (a notebook's or a test's fit may run elsewhere); under
        # DDP Ctrl-C keeps Lightning's handling (see the class docstring).
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._stop_after_this_step)

    def _stop_after_this_step(self, signum: int, frame: Any) -> None:
        self._restore_sigint()  # a second Ctrl-C interrupts at once
        sys.stderr.write("\nstopping after this step and saving last.ckpt (Ctrl-C again to abort at once)\n")
        # Lightning's own SIGTERM handler (installed for the run) stops at the next step boundary, on every rank.
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        # One process only: saving is collective under DDP, and Lightning does not stop all ranks at the same step (a
        # rank that stopped would wait for the others in the save's barrier); there the epoch checkpoints remain.
        if isinstance(exception, SIGTERMException) and trainer.world_size == 1:
            # Raised between steps, so the state is that of a completed step: an exact resume point.
            self._keep_last_current(trainer)
            if self.last_model_path:
                path = self.last_model_path
                sys.stderr.write(f"stopped at step {trainer.global_step}: saved {path}; resume with --ckpt_path {path}\n")
            return
        super().on_exception(trainer, pl_module, exception)
