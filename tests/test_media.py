"""The validation media: PNGs under the run directory when W&B is off, W&B images when it is on."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

import lit_meta
from datamodules import SinusoidDataModule
from lit_meta.media import MediaCallback, active_wandb_loggers, adaptation_curve, embedding_projection

sys.path.insert(0, str(Path(__file__).parent))
from test_predict import PatternDataModule, tiny_trainer  # noqa: E402  (the synthetic pattern classes)


def fit_with_media(model, datamodule, tmp_path: Path, **trainer_kwargs) -> tuple[MediaCallback, Path]:
    media = MediaCallback()
    logger = CSVLogger(tmp_path, name="run")
    trainer = tiny_trainer(logger=logger, callbacks=[media], num_sanity_val_steps=1, **trainer_kwargs)
    trainer.fit(model, datamodule)
    return media, Path(trainer.log_dir) / "media"


def pattern_data(**kwargs) -> PatternDataModule:
    return PatternDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, train_batches=2, val_episodes=2, eval_meta_batch_size=2, **kwargs)


def test_png_media_for_an_optimization_method(tmp_path):
    model = lit_meta.MAML(lit_meta.Conv4(hidden=8, out_features=3), inner_lr=0.4, eval_inner_steps=4)
    media, folder = fit_with_media(model, pattern_data(), tmp_path, max_epochs=2)
    names = sorted(p.name for p in folder.glob("*.png"))
    # one set per validation epoch (the sanity check draws nothing)
    assert names == [
        "adaptation-epoch000-step000002.png",
        "adaptation-epoch001-step000004.png",
        "episode-epoch000-step000002.png",
        "episode-epoch001-step000004.png",
    ]
    assert sorted(media.written) == sorted(folder / n for n in names)
    with Image.open(folder / names[-1]) as image:
        assert image.size[0] > 200 and image.size[1] > 100


def test_png_media_for_a_metric_method(tmp_path):
    from lit_meta.algorithms.protonet import ProtoNet

    model = ProtoNet(lit_meta.Conv4(hidden=8, out_features=None))
    _, folder = fit_with_media(model, pattern_data(), tmp_path)
    assert sorted(p.name.split("-")[0] for p in folder.glob("*.png")) == ["embeddings", "episode"]


def test_png_media_for_regression(tmp_path):
    model = lit_meta.MAML(lit_meta.SinusoidMLP(), inner_lr=0.01, eval_inner_steps=5)
    dm = SinusoidDataModule(meta_batch_size=2, train_batches=2, val_episodes=2, eval_meta_batch_size=2)
    _, folder = fit_with_media(model, dm, tmp_path)
    assert sorted(p.name.split("-")[0] for p in folder.glob("*.png")) == ["adaptation", "episode"]


def test_curve_and_projection_values():
    dm = pattern_data()
    episode = dm.prepare_batch(dm.sample_tasks("val", [torch.Generator().manual_seed(0)]))
    model = lit_meta.MAML(lit_meta.Conv4(hidden=8, out_features=3), inner_lr=0.4, eval_inner_steps=10)
    curve = adaptation_curve(model, episode, points=6)
    assert curve["steps"] == [0, 2, 4, 6, 8, 10]
    assert curve["loss"][-1] < curve["loss"][0]  # adapting on the support set helps its (near-duplicate) queries
    from lit_meta.algorithms.protonet import ProtoNet

    projection = embedding_projection(ProtoNet(lit_meta.Conv4(hidden=8, out_features=None)), episode)
    assert projection["support"].shape == (3, 2) and projection["query"].shape == (6, 2) and projection["means"].shape == (3, 2)


class RecordingWandbLogger(WandbLogger):
    """A W&B logger that records images instead of starting a run."""

    def __init__(self) -> None:
        super().__init__(offline=True, mode="offline")
        self.images: list[tuple[str, int, list]] = []

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, step, images))


def test_wandb_images_instead_of_png(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = RecordingWandbLogger()
    assert active_wandb_loggers(SimpleNamespace(loggers=[logger])) == [logger]
    dm = pattern_data()
    media = MediaCallback()
    media._episode = dm.prepare_batch(dm.sample_tasks("val", [torch.Generator().manual_seed(0)]))
    trainer = SimpleNamespace(
        loggers=[logger], sanity_checking=False, current_epoch=0, global_step=7, is_global_zero=True, log_dir=str(tmp_path), default_root_dir=str(tmp_path)
    )
    model = lit_meta.MAML(lit_meta.Conv4(hidden=8, out_features=3), inner_lr=0.4, eval_inner_steps=2)
    media.on_validation_epoch_end(trainer, model)
    assert [(key, step) for key, step, _ in logger.images] == [("media/episode", 7), ("media/adaptation", 7)]
    assert all(isinstance(images[0], Image.Image) for _, _, images in logger.images)
    assert not list(tmp_path.rglob("*.png"))  # W&B on: no PNGs unless png=True
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert active_wandb_loggers(SimpleNamespace(loggers=[logger])) == []


def test_importing_lit_meta_does_not_import_wandb_or_media():
    import subprocess

    code = "import lit_meta, sys; print('wandb' in sys.modules, 'lit_meta.media' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stderr[-2000:]
