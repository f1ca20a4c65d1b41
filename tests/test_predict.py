"""Adapting a trained model to a user's own images: the CLI ``predict`` command, ``model.adapt``, and their errors.

A tiny MAML (Conv-4, 16 filters) is meta-trained for a few steps on synthetic 28x28 classes, each a distinct random
block pattern, then adapted to three new patterns saved as files of other sizes and modes (RGB PNG, grayscale JPEG,
RGBA PNG), so the conversion to the checkpoint's input format is exercised and the easy queries must all be right.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

import lit_meta
from datamodules import ClassStore, ConfigError, DataError, LitMetaError, PredictFolderDataModule
from datamodules.images import ClassImageDataModule
from datamodules.predict_folder import InputFormat, read_query_folder, read_support_folder
from lit_meta.cli import main
from lit_meta.prediction import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["alpha", "beta", "gamma"]
SHOTS = 2


# --------------------------------------------------------------------------------------------- synthetic data
def pattern(seed: int, size: int = 28, cells: int = 4) -> np.ndarray:
    """Class ``seed``'s pattern: a random ``cells x cells`` binary grid blown up to ``size x size`` (bool)."""
    grid = np.random.default_rng(seed).random((cells, cells)) < 0.5
    grid[0, 0], grid[-1, -1] = True, False  # never blank, never full
    return np.kron(grid, np.ones((size // cells, size // cells), dtype=bool))


def pattern_image(seed: int, rng: np.random.Generator, noise: float = 0.1) -> np.ndarray:
    """One ``uint8 [28, 28]`` drawing of class ``seed``: its pattern plus pixel noise."""
    image = pattern(seed).astype(np.float32) + rng.normal(0.0, noise, (28, 28))
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


class PatternDataModule(ClassImageDataModule):
    """In-memory episodes of synthetic pattern classes (disjoint class seeds per split), 28x28 grayscale."""

    def __init__(self, classes_per_split: int = 12, images_per_class: int = 6, **kwargs) -> None:
        super().__init__(None, 28, **kwargs)
        self.classes_per_split = classes_per_split
        self.images_per_class = images_per_class

    def load_split(self, split: str) -> ClassStore:
        first = {"train": 0, "val": 100, "test": 200}[split]
        rng = np.random.default_rng(first)
        seeds = range(first, first + self.classes_per_split)
        images = np.stack([pattern_image(s, rng) for s in seeds for _ in range(self.images_per_class)])
        return ClassStore(torch.from_numpy(images)[:, None], [self.images_per_class] * len(seeds), [f"c{s}" for s in seeds])


def tiny_trainer(**kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=1,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def write_user_folders(root: Path, *, seed: int = 7) -> tuple[Path, Path, dict[str, str]]:
    """``support/<class>/`` (RGB PNGs, 56x56) and ``query/`` (one image per mode: RGB PNG 56x56, L JPEG 40x40, RGBA
    PNG 28x28, per class). Returns the folders and ``{query file: true class}``."""
    rng = np.random.default_rng(seed)
    support, query = root / "support", root / "query"
    truth = {}
    for i, name in enumerate(CLASSES):
        (support / name).mkdir(parents=True)
        for k in range(SHOTS):
            Image.fromarray(pattern_image(1000 + i, rng, 0.05)).convert("RGB").resize((56, 56), Image.NEAREST).save(support / name / f"{k}.png")
        query.mkdir(exist_ok=True)
        image = Image.fromarray(pattern_image(1000 + i, rng, 0.05))
        image.convert("RGB").resize((56, 56), Image.NEAREST).save(query / f"{name}_rgb.png")
        image.resize((40, 40), Image.NEAREST).save(query / f"{name}_gray.jpg", quality=95)
        image.convert("RGBA").save(query / f"{name}_rgba.png")
        truth.update({f"{name}_rgb.png": name, f"{name}_gray.jpg": name, f"{name}_rgba.png": name})
    return support, query, truth


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A meta-trained MAML checkpoint, a ProtoNet checkpoint, and a user's support/query folders."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    dm = PatternDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, train_batches=10, val_episodes=2, eval_meta_batch_size=2)
    model = lit_meta.MAML(lit_meta.Conv4(in_channels=1, hidden=16, out_features=3, image_size=28), inner_lr=0.4, eval_inner_steps=10)
    trainer = tiny_trainer()
    trainer.fit(model, dm)
    trainer.save_checkpoint(root / "maml.ckpt")

    from lit_meta.algorithms.protonet import ProtoNet

    proto = ProtoNet(lit_meta.Conv4(in_channels=1, hidden=16, out_features=None, image_size=28))
    trainer = tiny_trainer(limit_train_batches=2, limit_val_batches=1)
    trainer.fit(proto, dm)
    trainer.save_checkpoint(root / "protonet.ckpt")

    support, query, truth = write_user_folders(root)
    return {"root": root, "maml": root / "maml.ckpt", "protonet": root / "protonet.ckpt", "support": support, "query": query, "truth": truth}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # One thread, as conftest sets in-process: tiny models, and a busy 2-core CI machine.
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lit_meta", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


# ------------------------------------------------------------------------------------------------------ tests
def test_checkpoint_records_algorithm_and_input_format(trained):
    checkpoint = read_checkpoint(trained["maml"])
    assert checkpoint["lit_meta"]["algorithm"] == "lit_meta.algorithms.maml.MAML"
    assert checkpoint["lit_meta"]["input_format"] == {"channels": 1, "height": 28, "width": 28, "invert": False, "value_range": [0.0, 1.0]}
    assert torch.load(trained["maml"], weights_only=True)["lit_meta"]  # plain data: loads with weights_only


def test_cli_predict_writes_csv(trained, tmp_path):
    output = tmp_path / "out" / "predictions.csv"
    result = run_cli(
        "predict",
        "--ckpt_path", str(trained["maml"]),
        "--data", "datamodules.PredictFolderDataModule",
        "--data.support_dir", str(trained["support"]),
        "--data.query_dir", str(trained["query"]),
        "--data.output", str(output),
        "--trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    header, rows = read_rows(output)
    assert header == ["file", "prediction", "probability", *(f"p({c})" for c in CLASSES)]
    assert [row["file"] for row in rows] == sorted(trained["truth"])
    for row in rows:
        probabilities = [float(row[f"p({c})"]) for c in CLASSES]
        assert all(0.0 <= p <= 1.0 for p in probabilities)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert float(row["probability"]) == pytest.approx(max(probabilities), abs=1e-6)
        assert row["prediction"] in CLASSES
        assert row["prediction"] == trained["truth"][row["file"]], row
    assert not (tmp_path / "runs").exists()  # predict logs nothing

    # The same from Python, in a few lines: identical predictions.
    model = lit_meta.load_model(trained["maml"])
    assert type(model) is lit_meta.MAML and model.input_format == InputFormat(1, 28, 28)
    support_x, support_y, classes = read_support_folder(trained["support"], model.input_format)
    query_x, files = read_query_folder(trained["query"], model.input_format)
    adapted = model.adapt(support_x, support_y, class_names=classes)
    probabilities = adapted(query_x)
    assert files == [row["file"] for row in rows]
    assert adapted.predict_names(query_x) == [row["prediction"] for row in rows]
    assert adapted.predict(query_x).tolist() == probabilities.argmax(-1).tolist()
    expected = torch.tensor([[float(row[f"p({c})"]) for c in CLASSES] for row in rows])
    assert torch.allclose(probabilities, expected, atol=1e-5)


def test_adapt_works_for_metric_methods_too(trained):
    model = lit_meta.MetaLearner.load_from_checkpoint(trained["protonet"])  # the recorded algorithm is rebuilt
    assert type(model).__name__ == "ProtoNet"
    support_x, support_y, classes = read_support_folder(trained["support"], model.input_format)
    query_x, files = read_query_folder(trained["query"], model.input_format)
    names = model.adapt(support_x, support_y, class_names=classes).predict_names(query_x)
    assert names == [trained["truth"][f] for f in files]
    with pytest.raises(ConfigError, match="takes 1x28x28 images, got 1x32x32"):
        model.adapt(torch.rand(2, 1, 32, 32), torch.tensor([0, 1]))
    # uint8 pixels are converted as in training
    pixels = (support_x * 255).round().to(torch.uint8)
    assert model.adapt(pixels, support_y).predict(query_x).tolist() == model.adapt(support_x, support_y).predict(query_x).tolist()


def test_trainer_predict_from_python_without_checkpoint(trained, tmp_path):
    # A model trained in this process (format known in memory) predicts through the datamodule and the writer.
    model = lit_meta.load_model(trained["maml"])
    dm = PredictFolderDataModule(trained["support"], trained["query"], output=tmp_path / "p.csv", query_batch_size=4)
    outputs = tiny_trainer(callbacks=[lit_meta.PredictionWriter()]).predict(model, dm)
    assert [o["probabilities"].shape for o in outputs] == [(1, 4, 3), (1, 4, 3), (1, 1, 3)]
    _, rows = read_rows(tmp_path / "p.csv")
    assert len(rows) == 9 and {row["prediction"] for row in rows} == set(CLASSES)


@pytest.mark.parametrize("stage", ["fit", "test"])
def test_tasks_with_more_ways_than_the_head_has_outputs_fail_in_one_line(stage):
    # Unchecked, a 3-way head on 5-way tasks dies in cross_entropy ("index 3 is out of bounds"), after training.
    model = lit_meta.MAML(lit_meta.Conv4(hidden=8, out_features=3, pool="stride", embedding="mean"), inner_lr=0.4)
    if stage == "fit":
        dm = PatternDataModule(ways=3, train_ways=5, shots=1, queries=1, meta_batch_size=2, train_batches=2)
        run = lambda: tiny_trainer(limit_val_batches=0).fit(model, dm)  # noqa: E731
    else:
        dm = PatternDataModule(ways=5, shots=1, queries=1, test_episodes=2, eval_meta_batch_size=2)
        run = lambda: tiny_trainer().test(model, dm)  # noqa: E731
    split = "train" if stage == "fit" else "test"
    with pytest.raises(ConfigError, match=f"the {split} tasks are 5-way but this MAML's head has 3 outputs: build the backbone with out_features >= 5"):
        run()
    # Tasks the head can take pass the check (and train).
    dm = PatternDataModule(ways=3, shots=1, queries=1, meta_batch_size=2, train_batches=2, test_episodes=2, eval_meta_batch_size=2)
    tiny_trainer(limit_val_batches=0).fit(model, dm) if stage == "fit" else tiny_trainer().test(model, dm)


def test_images_are_converted_to_the_input_format(tmp_path):
    folder = tmp_path / "q"
    folder.mkdir()
    Image.new("RGB", (50, 30), (255, 255, 255)).save(folder / "white.jpg")
    Image.new("L", (10, 10), 0).save(folder / "black.png")
    x, files = read_query_folder(folder, InputFormat(1, 28, 28))
    assert files == ["black.png", "white.jpg"] and x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert x[0].max() == 0.0 and x[1].min() > 0.99
    inverted, _ = read_query_folder(folder, InputFormat(1, 28, 28, invert=True))
    assert torch.allclose(inverted, 1.0 - x, atol=1e-6)
    rgb, _ = read_query_folder(folder, InputFormat(3, 84, 84))
    assert rgb.shape == (2, 3, 84, 84)


def test_adapt_regression_and_steps():
    model = lit_meta.MAML(lit_meta.SinusoidMLP(), inner_lr=0.01, eval_inner_steps=3)
    x = torch.linspace(-5, 5, 10).unsqueeze(-1)
    y = 2.0 * torch.sin(x)
    before = model.adapt(x, y, steps=0)(x)
    assert torch.allclose(before, model.backbone(x).detach())
    assert model.adapt(x, y)(x).shape == (10, 1)
    losses = [torch.nn.functional.mse_loss(model.adapt(x, y, steps=k)(x), y) for k in (0, 3, 30)]
    assert losses[0] > losses[1] > losses[2]
    assert model.eval_inner_steps == 3  # the override was temporary
    with torch.inference_mode(), pytest.raises(LitMetaError, match="inference mode"):
        model.adapt(x, y)(x)
    with pytest.raises(ConfigError, match="0..N-1"):
        model.adapt(x, torch.tensor([0, 2] * 5))
    with pytest.raises(ConfigError, match="no inner loop"):
        from lit_meta.algorithms.protonet import ProtoNet

        ProtoNet(lit_meta.Conv4(out_features=None)).adapt(torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), steps=3)


def test_load_from_checkpoint_of_another_algorithm(trained):
    with pytest.raises(ConfigError, match="written by ProtoNet, not MAML"):
        lit_meta.MAML.load_from_checkpoint(trained["protonet"])
    with pytest.raises(ConfigError, match="written by MAML, not ANIL"):
        lit_meta.ANIL.load_from_checkpoint(trained["maml"])
    with pytest.raises(DataError, match="does not exist"):
        lit_meta.load_model(trained["root"] / "missing.ckpt")


def _predict_error(trained, monkeypatch, capsys, tmp_path, *extra: str, support=None, query=None, ckpt=None) -> str:
    """Run ``predict`` in-process (the code path of ``python -m lit_meta``); return its one error line."""
    monkeypatch.chdir(tmp_path)
    args = [
        "predict",
        "--ckpt_path", str(ckpt or trained["maml"]),
        "--data", "datamodules.PredictFolderDataModule",
        "--data.support_dir", str(support or trained["support"]),
        "--data.query_dir", str(query or trained["query"]),
        "--trainer.enable_progress_bar=false",
        *extra,
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


def _copy_folder(source: Path, target: Path) -> Path:
    for path in source.rglob("*"):
        if path.is_file():
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(source)).write_bytes(path.read_bytes())
    return target


def test_error_missing_folders(trained, monkeypatch, capsys, tmp_path):
    line = _predict_error(trained, monkeypatch, capsys, tmp_path, support=tmp_path / "nope")
    assert "support folder" in line and "nope" in line and "does not exist" in line
    line = _predict_error(trained, monkeypatch, capsys, tmp_path, query=tmp_path / "nada")
    assert "query folder" in line and "nada" in line


def test_error_class_without_images(trained, monkeypatch, capsys, tmp_path):
    support = _copy_folder(trained["support"], tmp_path / "support")
    (support / "delta").mkdir()
    (support / "delta" / "notes.txt").write_text("not an image")
    line = _predict_error(trained, monkeypatch, capsys, tmp_path, support=support)
    assert "class 'delta'" in line and "has no images" in line


def test_error_undecodable_image(trained, monkeypatch, capsys, tmp_path):
    query = _copy_folder(trained["query"], tmp_path / "query")
    (query / "broken.png").write_bytes(b"this is not a png")
    line = _predict_error(trained, monkeypatch, capsys, tmp_path, query=query)
    assert "cannot decode image" in line and "broken.png" in line


def test_error_checkpoint_of_another_algorithm(trained, monkeypatch, capsys, tmp_path):
    line = _predict_error(trained, monkeypatch, capsys, tmp_path, "--model", "lit_meta.MAML", ckpt=trained["protonet"])
    assert "written by ProtoNet, not MAML" in line
    line = _predict_error(trained, monkeypatch, capsys, tmp_path, "--model", "MetaSGD")
    assert "written by MAML, not MetaSGD" in line
    config = tmp_path / "protonet.yaml"
    config.write_text("model:\n  class_path: lit_meta.ProtoNet\n  init_args:\n    backbone: {class_path: lit_meta.Conv4, init_args: {out_features: null}}\n")
    line = _predict_error(trained, monkeypatch, capsys, tmp_path, "--config", str(config))
    assert "written by MAML, not ProtoNet" in line


def test_error_image_size_and_missing_checkpoint(trained, monkeypatch, capsys, tmp_path):
    line = _predict_error(trained, monkeypatch, capsys, tmp_path, "--data.image_size", "84")
    assert "trained on 1x28x28 images, not image_size=84" in line
    line = _predict_error(trained, monkeypatch, capsys, tmp_path, "--data.channels", "3")
    assert "not channels=3" in line
    line = _predict_error(trained, monkeypatch, capsys, tmp_path, ckpt=tmp_path / "missing.ckpt")
    assert "missing.ckpt does not exist" in line
