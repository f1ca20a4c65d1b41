"""Nothing trained is lost: last.ckpt follows every epoch, and after SIGTERM or a first Ctrl-C it holds the last step
and resumes exactly where the run stopped."""

import os
import signal

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
