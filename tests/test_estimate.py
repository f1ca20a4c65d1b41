"""benchmarks/estimate.py: the hours it prints are the measured step times times the config's schedule, and its
synthetic images have the real dataset's shape, so a machine without the data measures the same work."""

from __future__ import annotations

import math
import shutil
import sys

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import estimate  # noqa: E402
import reproduce  # noqa: E402


def test_hours_are_the_timed_steps_times_the_schedule() -> None:
    config = REPO / "configs" / "sinusoid_maml.yaml"
    row = estimate.measure(config, None, synthetic=False, device="cpu", warmup=1, steps=2, eval_batches=1)
    settings = yaml.safe_load(config.read_text())
    data, trainer = settings["data"]["init_args"], settings["trainer"]
    steps = trainer["max_epochs"] * data["train_batches"]
    assert row["steps"] == steps == 70_000  # Finn et al.'s 70,000 iterations
    assert row["train_h"] == pytest.approx(steps * row["step_s"] / 3600)
    validations = trainer["max_epochs"] // trainer.get("check_val_every_n_epoch", 1)
    eval_size = data.get("eval_meta_batch_size", 100)  # SinusoidDataModule's default: one batch per split
    val_batches = math.ceil(data["val_episodes"] / eval_size)
    assert row["validation_h"] == pytest.approx(validations * val_batches * row["eval_batch_s"] / 3600)
    assert row["test_h"] == pytest.approx(math.ceil(data["test_episodes"] / eval_size) * row["eval_batch_s"] / 3600)
    assert 0 < row["step_s"] < 5 and 0 < row["eval_batch_s"] < 30


def test_timer_counts_every_step_it_was_asked_for() -> None:
    timer = estimate.StepTimer()
    model, datamodule, _ = estimate.build(REPO / "configs" / "sinusoid_maml.yaml", None)
    estimate.common.quiet_trainer(accelerator="cpu", max_steps=4, callbacks=[timer]).fit(model, datamodule)
    assert len(timer.train) == 4 and all(t > 0 for t in timer.train)


def test_synthetic_omniglot_has_the_vinyals_splits_and_image_shape() -> None:
    """No file is read: the real datamodule samples its episodes from random images of Omniglot's shape."""
    model, datamodule, _ = estimate.build(REPO / "configs" / "omniglot_maml_20w1s.yaml", "/nonexistent/omniglot")
    estimate.make_synthetic(datamodule, channels=model.backbone.in_channels)
    datamodule.setup("fit")
    assert [datamodule.num_classes(s) for s in ("train", "val", "test")] == [4112, 688, 1692]
    batch = next(iter(datamodule.train_dataloader()))
    data = yaml.safe_load((REPO / "configs" / "omniglot_maml_20w1s.yaml").read_text())["data"]["init_args"]
    assert list(batch.support_x.shape) == [data["meta_batch_size"], data["ways"] * data["shots"], 1, 28, 28]


def test_synthetic_refuses_a_dataset_whose_splits_it_does_not_know() -> None:
    from conftest import random_images

    with pytest.raises(SystemExit, match="give --root"):
        estimate.make_synthetic(random_images(), channels=3)


def test_record_writes_the_estimate_the_table_shows(tmp_path) -> None:
    records = tmp_path / "reproduction.yaml"
    shutil.copy(reproduce.RECORDS, records)
    row = {"config": "omniglot_maml_20w1s.yaml", "device": "one NVIDIA H200", "step_s": 0.12, "eval_batch_s": 0.5,
           "steps": 60_000, "train_h": 2.0, "validation_h": 0.1, "test_h": 0.02}
    estimate.record_estimate(row, records)
    entries = reproduce.load_records(records)
    text = entries["omniglot_maml_20w1s.yaml"]["estimate"]
    assert text.startswith("about 2.1 h on one NVIDIA H200") and "0.120 s per training step" in text
    assert "about 2.1 h on one NVIDIA H200" in reproduce.render(entries)
    with pytest.raises(SystemExit, match="no entry"):
        estimate.record_estimate({**row, "config": "missing.yaml"}, records)


def test_unrun_lists_configs_without_a_result_those_needing_a_gpu_first() -> None:
    records = reproduce.load_records()
    names = estimate.unrun_configs()
    assert names and not any(records[n].get("results") for n in names)
    assert "omniglot_maml_5w1s.yaml" not in names and "miniimagenet_maml_5w1s.yaml" in names
    needs_gpu = ["GPU" in str(records[n].get("estimate")) for n in names]
    assert needs_gpu == sorted(needs_gpu, reverse=True) and any(needs_gpu) and not all(needs_gpu)
