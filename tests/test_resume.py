"""Exact resume: fit 2N steps == fit N steps, then resume from the checkpoint for N more."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from conftest import sinusoid_maml_run
from datamodules import SinusoidDataModule
from lit_meta import MAML


class RecordTasks(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch.support_x.sum().item(), batch.query_y.sum().item()))


def make(tmp_path, max_steps, callbacks, name):
    return sinusoid_maml_run(tmp_path / name, max_steps, callbacks)


@pytest.mark.parametrize("n", [4, 3], ids=["mid-epoch", "epoch-boundary"])
def test_resume_is_exact(tmp_path, n):
    full_record = RecordTasks()
    model_full, dm, trainer = make(tmp_path, 2 * n, [full_record], "full")
    trainer.fit(model_full, dm)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=n, save_top_k=-1)
    model_a, dm_a, trainer_a = make(tmp_path, n, [ckpt], "first")
    trainer_a.fit(model_a, dm_a)
    path = next((tmp_path / "ckpt").glob(f"*step={n}.ckpt"))

    resumed_record = RecordTasks()
    model_b, dm_b, trainer_b = make(tmp_path, 2 * n, [resumed_record], "second")
    # A different global RNG state must not matter: episodes come from counter-based generators.
    torch.manual_seed(12345)
    trainer_b.fit(model_b, dm_b, ckpt_path=path)

    assert resumed_record.seen == full_record.seen[n:]
    for (name, a), b in zip(model_full.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("validate", [False, True], ids=["saved-at-train-epoch-end", "saved-after-validation"])
def test_epoch_based_run_resumes_exactly_from_an_epoch_end_checkpoint(tmp_path, validate):
    # Every shipped config stops on max_epochs, and its checkpoints (best, last) are written when an epoch ends. From
    # such a checkpoint Lightning does not hand the train loader its saved state, so the datamodule must: otherwise
    # the resumed run replays epoch 0's episodes.
    def run(name, callbacks, ckpt_path=None):
        record = RecordTasks()
        model, dm, trainer = sinusoid_maml_run(tmp_path / name, 9, [record, *callbacks], validate, by_epochs=True)
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model, record.seen

    full, seen_full = run("full", [])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    _, seen_first = run("first", [ckpt])
    assert seen_first == seen_full
    path = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    resumed, seen_resumed = run("resumed", [], ckpt_path=path)
    assert seen_resumed == seen_full[3:]
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_next_epoch_draws_new_tasks():
    dm = SinusoidDataModule(meta_batch_size=2, train_batches=2)
    loader = dm.train_dataloader()
    first = [b.support_x for b in loader]
    second = [b.support_x for b in loader]
    assert not torch.equal(first[0], second[0])
    assert loader.epoch == 1


def test_load_from_checkpoint_rebuilds_backbone(tmp_path):
    model, dm, trainer = make(tmp_path, 2, [], "load")
    trainer.fit(model, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # plain data only: no pickled modules or callables
    assert raw["hyper_parameters"]["backbone"]["class_path"] == "lit_meta.backbones.SinusoidMLP"
    loaded = MAML.load_from_checkpoint(path)
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    assert loaded.inner_lr == model.inner_lr


class RecordRates(Callback):
    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


SCHEDULES = {
    # Halve every epoch (the ProtoNet configs), or every second step.
    "epoch": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
}


@pytest.mark.parametrize("interval", list(SCHEDULES))
@pytest.mark.parametrize(
    "where", ["mid-epoch", "train-epoch-end", "after-validation"]
)
def test_resume_with_a_scheduler_is_exact(tmp_path, interval, where):
    """With an epoch- or step-interval scheduler, a run resumed from a checkpoint written mid-epoch, at a train
    epoch's end or after validation follows the uninterrupted run's learning rates and weights exactly."""
    validate = where == "after-validation"

    def run(name, callbacks, ckpt_path=None):
        record = RecordRates()
        _, dm, trainer = sinusoid_maml_run(tmp_path / name, 9, [record, *callbacks], validate, by_epochs=True)
        import lightning.pytorch as pl

        from lit_meta import SinusoidMLP

        pl.seed_everything(0)
        model = MAML(
            SinusoidMLP(hidden=(16, 16)), inner_lr=0.01, inner_steps=1,
            lr_scheduler=SCHEDULES[interval], scheduler_interval=interval,
        )
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model, record.rates

    full, rates_full = run("full", [])
    assert len({lr for _, lr in rates_full}) > 2  # the schedule really moves the rate
    if where == "mid-epoch":
        ckpt, pattern = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1), "*step=4.ckpt"
    else:
        ckpt, pattern = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1), "*step=3.ckpt"
    run("first", [ckpt])
    path = next((tmp_path / "ckpt").glob(pattern))
    resumed, rates_resumed = run("resumed", [], ckpt_path=path)
    assert rates_resumed == rates_full[len(rates_full) - len(rates_resumed):]
    assert len(rates_resumed) == 9 - int(pattern.split("=")[1].split(".")[0])
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
