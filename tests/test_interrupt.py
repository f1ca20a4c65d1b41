"""Nothing trained is lost: last.ckpt follows every epoch, and after SIGTERM or a first Ctrl-C it holds the last step
and resumes exactly where the run stopped."""

import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import sinusoid_maml_run
from lit_meta import MAML, SinusoidMLP
from lit_meta.callbacks import MetaCheckpoint

STOP_AT = 4  # mid-epoch: an epoch is 3 steps, so the epoch-end checkpoints are at steps 3 and 6


class SignalAt(Callback):
    """Sends ``signum`` to this process at the end of training step ``step``, as a user or a scheduler would."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def make(tmp_path, name, max_steps, *callbacks):
    return sinusoid_maml_run(tmp_path / name, max_steps, [MetaCheckpoint(dirpath=tmp_path / name), *callbacks], validate=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stopped_run_saves_its_last_step_and_resumes_exactly(tmp_path, signum, capsys):
    full, dm, trainer = make(tmp_path, "full", 2 * STOP_AT)
    trainer.fit(full, dm)

    sigint_before = signal.getsignal(signal.SIGINT)
    stopped, dm, trainer = make(tmp_path, "stopped", 2 * STOP_AT, SignalAt(STOP_AT, signum))
    with pytest.raises(SystemExit):
        trainer.fit(stopped, dm)
    assert signal.getsignal(signal.SIGINT) is sigint_before  # Ctrl-C behaves as usual again
    last = tmp_path / "stopped" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == STOP_AT
    assert f"stopped at step {STOP_AT}" in capsys.readouterr().err

    resumed, dm, trainer = make(tmp_path, "resumed", 2 * STOP_AT)
    trainer.fit(resumed, dm, ckpt_path=last)
    assert trainer.global_step == 2 * STOP_AT
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_finished_run_leaves_ctrl_c_as_it_was(tmp_path):
    sigint_before = signal.getsignal(signal.SIGINT)
    model, dm, trainer = make(tmp_path, "done", 2)
    trainer.fit(model, dm)
    assert signal.getsignal(signal.SIGINT) is sigint_before
    assert torch.load(tmp_path / "done" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_last_checkpoint_follows_every_epoch_even_without_a_better_validation(tmp_path):
    _, dm, trainer = make(tmp_path, "flat", 3 * 3)
    # A zero learning rate: validation never improves after the first epoch, so no top-k checkpoint after it.
    model = MAML(SinusoidMLP(hidden=(16, 16)), inner_lr=0.01, inner_steps=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    trainer.fit(model, dm)
    assert [p.name for p in (tmp_path / "flat").glob("best-*.ckpt")] == ["best-0-3.ckpt"]
    assert torch.load(tmp_path / "flat" / "last.ckpt", weights_only=True)["global_step"] == 9


def test_last_checkpoint_records_the_best_of_its_own_step(tmp_path):
    # last.ckpt must be written after the top-k checkpoint of the same step: a resume from it then knows the best so
    # far (else it would keep an older best, and a later, worse epoch could replace the true best).
    _, dm, trainer = make(tmp_path, "improving", 3 * 3)
    model = MAML(SinusoidMLP(hidden=(16, 16)), inner_lr=0.01, inner_steps=1)
    trainer.fit(model, dm)
    callback = trainer.checkpoint_callback
    last = torch.load(tmp_path / "improving" / "last.ckpt", weights_only=False)
    (state,) = [s for key, s in last["callbacks"].items() if key.startswith("MetaCheckpoint")]
    assert last["global_step"] == 9
    assert state["best_model_path"] == callback.best_model_path
    assert state["last_model_path"] == str(tmp_path / "improving" / "last.ckpt")
    assert sorted(p.name for p in (tmp_path / "improving").iterdir()) == sorted(["last.ckpt", Path(callback.best_model_path).name])


def test_a_mid_epoch_validation_updates_last_checkpoint_at_once(tmp_path):
    import lightning.pytorch as pl

    from datamodules import SinusoidDataModule

    class LastAtBatchStart(Callback):
        """The step last.ckpt holds when each training batch starts."""

        def __init__(self) -> None:
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            path = tmp_path / "mid" / "last.ckpt"
            self.seen.append((trainer.global_step, torch.load(path, weights_only=True)["global_step"] if path.exists() else None))

    probe = LastAtBatchStart()
    model = MAML(SinusoidMLP(hidden=(16, 16)), inner_lr=0.01, inner_steps=1)
    dm = SinusoidDataModule(shots=5, queries=5, meta_batch_size=4, train_batches=4, val_episodes=4, test_episodes=4)
    trainer = pl.Trainer(
        max_steps=8, val_check_interval=2, logger=False, callbacks=[probe, MetaCheckpoint(dirpath=tmp_path / "mid")],
        enable_progress_bar=False, enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0,
        accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, dm)
    # Validation after batches 2 and 4 of each 4-batch epoch: last.ckpt follows at once, mid-epoch included.
    assert probe.seen == [(0, None), (1, None), (2, 2), (3, 2), (4, 4), (5, 4), (6, 6), (7, 6)]
    assert torch.load(tmp_path / "mid" / "last.ckpt", weights_only=True)["global_step"] == 8


def frozen_maml():
    """MAML with a zero learning rate: every validation gives the same score."""
    return MAML(SinusoidMLP(hidden=(16, 16)), inner_lr=0.01, inner_steps=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))


@pytest.mark.parametrize("best_file", ["kept", "deleted", "moved"])
def test_a_run_resumed_into_another_folder_keeps_the_best_of_the_whole_run(tmp_path, best_file):
    # The command line resumes into the logger's next version: a new checkpoint folder.
    _, dm, trainer = make(tmp_path, "first", 3)
    trainer.fit(frozen_maml(), dm)
    first_best = Path(trainer.checkpoint_callback.best_model_path)
    assert first_best.name == "best-0-3.ckpt"
    if best_file == "deleted":
        first_best.unlink()
    _, dm, trainer = make(tmp_path, "second", 9)
    if best_file == "moved":
        # The run's folder copied elsewhere (another machine), the original gone: resumed from the copy, the copied
        # best checkpoint keeps its place in the selection.
        (tmp_path / "first").rename(tmp_path / "copy")
        trainer.fit(frozen_maml(), dm, ckpt_path=tmp_path / "copy" / "last.ckpt")
        assert Path(trainer.checkpoint_callback.best_model_path) == tmp_path / "copy" / first_best.name
        assert not list((tmp_path / "second").glob("best-*.ckpt"))
        return
    if best_file == "kept":
        trainer.fit(frozen_maml(), dm, ckpt_path=tmp_path / "first" / "last.ckpt")
        # Equal scores after the resume are not better: the whole run's best is still the first one, and its test
        # (ckpt_path="best") uses it.
        assert Path(trainer.checkpoint_callback.best_model_path) == first_best
        assert not list((tmp_path / "second").glob("best-*.ckpt"))
        assert first_best.is_file()
    else:
        with pytest.warns(UserWarning, match="selection restarts"):
            trainer.fit(frozen_maml(), dm, ckpt_path=tmp_path / "first" / "last.ckpt")
        assert Path(trainer.checkpoint_callback.best_model_path).name == "best-1-6.ckpt"
