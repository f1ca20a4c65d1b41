"""The Throughput callback: tasks/s and meta-steps/s in the logs and the progress bar, and in the CLI's defaults."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

import lit_meta.callbacks as callbacks_module
from datamodules import SinusoidDataModule, TaskBatch
from datamodules.errors import ConfigError
from lit_meta import MAML, SinusoidMLP
from lit_meta.callbacks import Throughput

REPO = Path(__file__).resolve().parents[1]


class FakeModule:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}
        self.options: dict[str, dict] = {}

    def log(self, name: str, value: float, **options) -> None:
        self.logged[name] = value
        self.options[name] = options


def batch(tasks: int) -> TaskBatch:
    x = torch.zeros(tasks, 2, 1)
    return TaskBatch(x, x, x, x)


def test_rates_over_a_window(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 4.0, 8.0])  # start mark, then the end of each batch
    monkeypatch.setattr(callbacks_module.time, "perf_counter", lambda: next(clock))
    callback, module = Throughput(window=2), FakeModule()
    trainer = SimpleNamespace(world_size=2)
    callback.on_train_batch_start(trainer, module, batch(4), 0)
    for index in range(4):
        callback.on_train_batch_end(trainer, module, None, batch(4), index)
    # The last two batches (ends at 4.0 and 8.0, window opening at 3.0): 2 steps, 2 x 4 tasks x 2 ranks in 5 s.
    assert module.logged["train/steps_per_sec"] == pytest.approx(2 / 5)
    assert module.logged["train/tasks_per_sec"] == pytest.approx(16 / 5)
    assert module.options["train/tasks_per_sec"]["prog_bar"] is True


def test_validation_restarts_the_window(monkeypatch):
    clock = iter([0.0, 1.0, 100.0, 101.0])
    monkeypatch.setattr(callbacks_module.time, "perf_counter", lambda: next(clock))
    callback, module = Throughput(window=5), FakeModule()
    trainer = SimpleNamespace(world_size=1)
    callback.on_train_batch_start(trainer, module, batch(3), 0)
    callback.on_train_batch_end(trainer, module, None, batch(3), 0)
    callback.on_validation_start(trainer, module)  # 99 s of validation must not count
    callback.on_train_batch_start(trainer, module, batch(3), 1)
    callback.on_train_batch_end(trainer, module, None, batch(3), 1)
    assert module.logged["train/tasks_per_sec"] == pytest.approx(3.0)


def test_batches_without_a_task_count_log_steps_only(monkeypatch):
    clock = iter([0.0, 2.0])
    monkeypatch.setattr(callbacks_module.time, "perf_counter", lambda: next(clock))
    callback, module = Throughput(), FakeModule()
    trainer = SimpleNamespace(world_size=1)
    callback.on_train_batch_start(trainer, module, object(), 0)
    callback.on_train_batch_end(trainer, module, None, object(), 0)
    assert module.logged == {"train/steps_per_sec": pytest.approx(0.5)}


def test_bad_window():
    with pytest.raises(ConfigError, match="window"):
        Throughput(window=0)


def test_throughput_in_a_real_fit_and_progress_bar():
    torch.manual_seed(0)
    model = MAML(SinusoidMLP(hidden=(8, 8)))
    dm = SinusoidDataModule(shots=5, queries=5, meta_batch_size=4, train_batches=5)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        limit_val_batches=0,
        callbacks=[Throughput(window=3)],
    )
    trainer.fit(model, dm)
    bar = trainer.progress_bar_metrics
    assert bar["train/tasks_per_sec"] > 0
    assert bar["train/tasks_per_sec"] / bar["train/steps_per_sec"] == pytest.approx(4, rel=1e-4)


def test_cli_has_throughput_by_default(tmp_path, monkeypatch):
    from lit_meta.cli import MetaCLI

    monkeypatch.chdir(tmp_path)
    cli = MetaCLI(args=["--config", str(REPO / "configs" / "sinusoid_maml.yaml"), "--trainer.logger=false"], run=False)
    assert any(isinstance(c, Throughput) for c in cli.trainer.callbacks)


def test_line_progress_prints_a_line_every_n_steps_and_per_validation(capsys):
    import io

    from lit_meta.callbacks import LineProgress

    torch.manual_seed(0)
    model = MAML(SinusoidMLP(hidden=(8, 8)))
    dm = SinusoidDataModule(shots=5, queries=5, meta_batch_size=4, train_batches=4, val_episodes=4, eval_meta_batch_size=4)
    out = io.StringIO()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        inference_mode=False,
        num_sanity_val_steps=1,
        callbacks=[Throughput(window=2), LineProgress(every_n_steps=2, stream=out)],
    )
    trainer.fit(model, dm)
    lines = out.getvalue().splitlines()
    steps = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in steps] == [
        "epoch 0 step 2 (batch 2/4)",
        "epoch 0 step 4 (batch 4/4)",
        "epoch 1 step 6 (batch 2/4)",
        "epoch 1 step 8 (batch 4/4)",
    ]
    assert all("train/loss" in line and "train/mse" in line for line in steps)
    assert "steps/s" in steps[1] and "train/steps_per_sec" in steps[1]
    validations = [line for line in lines if line.startswith("validation")]
    assert len(validations) == 2, "one per validation run, none for the sanity check"
    assert validations[0].startswith("validation epoch 0 step 4 | ") and "val/mse " in validations[0]
    assert [line.split(" | ")[0] for line in lines if line.startswith("end of")] == ["end of epoch 0 step 4 (batch 4/4)", "end of epoch 1 step 8 (batch 4/4)"]
    assert len(lines) == 8
    assert "\r" not in out.getvalue() and capsys.readouterr().out == "", "nothing but the lines, and only to the stream"


def test_line_progress_is_quiet_when_disabled_and_checks_its_argument():
    from lit_meta.callbacks import LineProgress

    with pytest.raises(ConfigError, match="every_n_steps"):
        LineProgress(every_n_steps=0)
    import io

    out = io.StringIO()
    bar = LineProgress(stream=out)
    bar.disable()
    bar.print("hidden")
    bar.enable()
    bar.print("shown")
    assert out.getvalue() == "shown\n"
