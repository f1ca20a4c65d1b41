"""Lightning callbacks for meta-learning runs."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

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
    (lower) for regression, or the datamodule's own ``validation_metric = (name, "min" | "max")`` where it has one
    (the return of the reinforcement-learning tasks). The command line adds this callback to every run.

    **last.ckpt follows the run.** Lightning's ``save_last`` writes ``last.ckpt`` only with a new top-k checkpoint,
    so after an epoch whose validation did not improve it still held an older epoch and a resume from it lost the
    epochs since. Here it is written after every training epoch and every mid-epoch validation (after the top-k
    checkpoint of the same step, so it records the current best), and when training ends; ``save_last=False``
    turns it off, and ``save_last="link"`` is Lightning's own (a link to the latest top-k file).

    **Stopping a run keeps its last step.** ``SIGTERM`` (a job scheduler's stop, ``kill``) and a first ``Ctrl-C``
    end training after the step in progress, and ``last.ckpt`` is written at that step: ``fit --ckpt_path
    .../last.ckpt`` continues exactly where the run stopped, mid-epoch included (the episode loaders' position is in
    the checkpoint). A second ``Ctrl-C`` aborts at once, as usual. Lightning turns ``SIGTERM`` into a stop at the
    next step boundary; this callback routes the first ``SIGINT`` the same way, and saves on that stop (other
    exceptions leave the checkpoints of the last completed epoch as they are). Under DDP (several processes) a stop
    keeps Lightning's behaviour: the run ends and the last epoch's checkpoints remain.

    Only Lightning's public surfaces are used: ``Trainer.save_checkpoint``, ``format_checkpoint_name``,
    ``last_model_path``, ``file_exists`` and the callback hooks.

    Args:
        **kwargs: :class:`~lightning.pytorch.callbacks.ModelCheckpoint`'s; ``save_last`` defaults to ``True`` and
            ``save_top_k`` to 1.
    """

    def __init__(self, **kwargs: Any) -> None:
        save_last = kwargs.pop("save_last", True)
        kwargs.setdefault("save_top_k", 1)
        #: Whether this callback keeps ``last.ckpt`` current (Lightning's own ``save_last`` is then off).
        self.keep_last = save_last is True
        self._version_last = kwargs.get("enable_version_counter", True)
        super().__init__(save_last=None if self.keep_last else save_last, **kwargs)
        self._previous_sigint: Any = None
        self._last_saved_step = 0  # as Lightning: nothing to save before the first step
        self._epoch_batches = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is None:
            dm = trainer.datamodule
            regression = getattr(dm, "task_type", "classification") == "regression"
            # A datamodule may name its own (metric, "min" | "max"), e.g. the return of reinforcement learning.
            self.monitor, self.mode = getattr(dm, "validation_metric", None) or (
                ("val/mse", "min") if regression else ("val/acc", "max")
            )
            self.kth_value = torch.tensor(float("inf") if self.mode == "min" else float("-inf"))
            self.filename = "best-{epoch}-{step}"
            self.auto_insert_metric_name = False
        # The checkpoint being resumed is known only once the trainer restores it (after setup); see load_state_dict.
        self._trainer = trainer
        super().setup(trainer, pl_module, stage)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------------------------------------ selection
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state of the run that wrote the checkpoint, its best-checkpoint selection included.

        ``fit --ckpt_path`` continues in a new folder (the logger's next version), and Lightning then restores only
        ``best_model_path``: the score is lost, the first validation after the resume becomes the best however poor,
        and the run is tested on it. Here the previous best checkpoints stay in the selection while their files exist
        (Lightning never deletes a checkpoint outside the current folder); where none is left, selection restarts at
        the resume, with a warning. A best checkpoint no longer at its recorded path counts where a file of the same
        name lies beside the resumed checkpoint: a run folder copied elsewhere (``last.ckpt`` with its
        ``best-*.ckpt``) continues with its selection.
        """
        super().load_state_dict(state_dict)
        if self.best_model_score is not None or state_dict.get("best_model_score") is None:
            return  # the same folder (Lightning restored everything), or nothing was selected yet
        resumed = getattr(getattr(self, "_trainer", None), "ckpt_path", None)
        beside = Path(resumed).parent if resumed and "://" not in str(resumed) else None
        kept = {}
        for path, score in state_dict.get("best_k_models", {}).items():
            moved = beside / Path(path).name if beside is not None else None
            if Path(path).is_file():
                kept[path] = score
            elif moved is not None and moved.is_file():
                kept[str(moved)] = score
        if not kept:
            rank_zero_warn(
                f"the best checkpoint of the resumed run ({state_dict['best_model_path']}) is not there: "
                "best-checkpoint selection restarts from this resume"
            )
            self.best_model_path = ""
            return
        better, worse = (max, min) if self.mode == "max" else (min, max)
        self.best_k_models = kept
        self.best_model_path = better(kept, key=lambda path: float(kept[path]))
        self.best_model_score = kept[self.best_model_path]
        self.kth_best_model_path = worse(kept, key=lambda path: float(kept[path]))
        self.kth_value = kept[self.kth_best_model_path]

    # ------------------------------------------------------------------------------------------------- last.ckpt
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._epoch_batches = batch_idx + 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # A validation that ends an epoch is followed by on_train_epoch_end, where Lightning may still write this
        # step's top-k checkpoint: last.ckpt waits for it there, so that it records the current best.
        if self._epoch_batches < trainer.num_training_batches:
            self._keep_last_current(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._keep_last_current(trainer)
        self._epoch_batches = 0

    def _keep_last_current(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` at the current step unless it is there already (or nothing is to be saved now)."""
        if not self.keep_last or trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.global_step == self._last_saved_step:
            return
        metrics = {
            **trainer.callback_metrics,
            "epoch": torch.tensor(trainer.current_epoch),
            "step": torch.tensor(trainer.global_step),
        }
        path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        if self._version_last:
            # As Lightning: a last.ckpt of another run in the same folder is kept, this one becomes last-v1.ckpt.
            version = self.STARTING_VERSION
            while path != self.last_model_path and self.file_exists(path, trainer):
                path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST, ver=version)
                version += 1
        # Set before saving: the path is part of the callback's state in the checkpoint.
        previous, self.last_model_path = self.last_model_path, path
        trainer.save_checkpoint(path, self.save_weights_only)
        self._last_saved_step = trainer.global_step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
        if previous and self._is_stale_last(trainer, previous, path):
            trainer.strategy.remove_checkpoint(previous)

    def _is_stale_last(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        """Whether the previous ``last`` file (another name, e.g. with ``{step}`` in it) is this run's to remove."""
        if previous == current or previous in self.best_k_models or "://" in previous:
            return False
        previous_path = Path(previous).absolute()
        if trainer.ckpt_path is not None and previous_path == Path(trainer.ckpt_path).absolute():
            return False  # the checkpoint this run resumed from
        return self.dirpath is not None and Path(self.dirpath).absolute() in previous_path.parents

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()
        super().on_train_end(trainer, pl_module)
        # A run that stops inside an epoch (max_steps, max_time) keeps its last step too.
        self._keep_last_current(trainer)

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


def _format_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class LineProgress(ProgressBar):
    """Progress for log files: one line every ``every_n_steps`` training steps, and one per epoch, validation and test.

    Lightning's bar redraws itself in place many times a second; a terminal shows the last drawing, but a log file
    keeps every one (about 300 bytes per step). The command line uses this callback instead whenever standard output
    is not a terminal. A line holds the epoch, the step, the steps per second since the previous line, and the
    progress-bar metrics (``train/loss``, ``train/acc``, throughput, ...), e.g.::

        epoch 0 step 25/250 | 4.1 steps/s | train/loss 2.31 train/acc 0.42 train/tasks_per_sec 8.2
        validation epoch 0 step 250 | val/acc 0.81 val/acc_ci95 0.012 val/loss 0.61

    Only global rank 0 prints.

    Args:
        every_n_steps: a line every this many optimizer steps; ``None``: the trainer's ``log_every_n_steps``.
        stream: where lines go; ``None``: standard output at the time of printing.
    """

    def __init__(self, every_n_steps: int | None = None, stream: TextIO | None = None) -> None:
        super().__init__()
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ConfigError(f"LineProgress every_n_steps must be a positive integer or null, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.stream = stream
        self._enabled = True
        self._printed_step = -1
        self._mark: tuple[float, int] | None = None  # (time, step) of the previous training line
        self._batch = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, file=self.stream or sys.stdout, flush=True, **kwargs)

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str | None = None) -> str:
        if prefix is None:
            items = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        else:
            items = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        return " ".join(f"{name} {_format_value(value)}" for name, value in sorted(items.items()))

    def _where(self, trainer: pl.Trainer) -> str:
        total = self.total_train_batches
        batches = f"/{int(total)}" if isinstance(total, int) or (isinstance(total, float) and total != float("inf")) else ""
        return f"epoch {trainer.current_epoch} step {trainer.global_step} (batch {self._batch + 1}{batches})"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark = (time.perf_counter(), trainer.global_step)
        self._batch = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch_idx
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        step = trainer.global_step
        if step == self._printed_step or step % every:
            return
        self._printed_step = step
        now = time.perf_counter()
        rate = ""
        if self._mark is not None and step > self._mark[1] and now > self._mark[0]:
            rate = f" | {(step - self._mark[1]) / (now - self._mark[0]):.3g} steps/s"
        self._mark = (now, step)
        self.print(f"{self._where(trainer)}{rate} | {self._metrics(trainer, pl_module)}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print(f"end of {self._where(trainer)} | {self._metrics(trainer, pl_module)}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        where = f"epoch {trainer.current_epoch} step {trainer.global_step}" if trainer.state.fn == TrainerFn.FITTING else ""
        self.print(f"validation {where} | {self._metrics(trainer, pl_module, 'val/')}".replace("  ", " "))
        # The validation pause is not training time.
        self._mark = (time.perf_counter(), trainer.global_step)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print(f"test | {self._metrics(trainer, pl_module, 'test/')}")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print(f"predict | {sum(trainer.num_predict_batches)} batches")
