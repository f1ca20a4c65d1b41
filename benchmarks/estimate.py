"""How long a config's full schedule takes on this machine: training steps and evaluation batches timed, times the
schedule.

    python benchmarks/estimate.py configs/omniglot_maml_20w1s.yaml --root data/omniglot
    python benchmarks/estimate.py configs/miniimagenet_*.yaml --synthetic --device cuda
    python benchmarks/estimate.py configs/miniimagenet_maml_5w1s.yaml --synthetic --device cuda --record

For each config it builds the model and datamodule as ``python -m lit_meta fit --config CONFIG`` does, trains
``--warmup`` steps, times ``--steps`` more, then times ``--eval-batches`` test batches (validation and test run the same
evaluation), and prints seconds per step and per evaluation batch with the schedule's hours: training steps from the
config (``benchmarks/reproduction.yaml``'s ``schedule_steps`` where an epoch's length is the dataset's), one
validation every ``check_val_every_n_epoch`` epochs, and the final test. Medians, so one slow step does not count.

``--synthetic`` replaces the images with random ones of the dataset's shape, class count and class size (the real
loading and sampling code still runs on them): a machine without the data can measure the timing, which does not
depend on the pixels. ``--record`` writes the measurement into ``benchmarks/reproduction.yaml`` as the config's
estimate (shown in docs/reproduce.md for configs without a result). Steps that change during training are timed in
their final form: MAML++'s derivative-order annealing (first order in the first epochs) is timed second order.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the checkout on sys.path)
import lightning.pytorch as pl
import torch
import yaml

import reproduce

# The real datasets' splits, for --synthetic: classes of (train, val, test) and images per class.
SYNTHETIC_SPLITS: dict[str, tuple[tuple[int, int, int], int]] = {
    "OmniglotDataModule": ((1028 * 4, 172 * 4, 423 * 4), 20),  # Vinyals split with the four rotations as classes
    "MiniImageNetDataModule": ((64, 16, 20), 600),
    "CIFARFSDataModule": ((64, 16, 20), 600),
    "FC100DataModule": ((60, 20, 20), 600),
}


class StepTimer(pl.Callback):
    """Wall-clock seconds of every training and test batch (the device synchronized at both ends)."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.test: list[float] = []
        self._start = 0.0

    def _now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._start = self._now(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.train.append(self._now(pl_module) - self._start)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._start = self._now(pl_module)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.test.append(self._now(pl_module) - self._start)


def build(config_path: Path, root: str | None) -> tuple[pl.LightningModule, pl.LightningDataModule, dict[str, Any]]:
    """The config's model and datamodule, built by the command line's parser, and the config file's contents."""
    from lit_meta.cli import MetaCLI

    args = ["--config", str(config_path), "--trainer.logger", "false"]
    if root is not None:
        args += ["--data.init_args.root", root]
    cli = MetaCLI(args=args, run=False)
    return cli.model, cli.datamodule, yaml.safe_load(config_path.read_text())


def make_synthetic(datamodule: Any, channels: int, seed: int = 0) -> None:
    """Give an image datamodule random ``uint8`` images in place of its files (same splits, classes and sizes)."""
    from datamodules import ClassImageDataModule, ClassStore
    from datamodules.images import SPLITS

    name = type(datamodule).__name__
    if not isinstance(datamodule, ClassImageDataModule):
        return  # generated tasks (sinusoid, reinforcement learning) need no files
    if name not in SYNTHETIC_SPLITS:
        raise SystemExit(f"error: --synthetic knows the splits of {', '.join(SYNTHETIC_SPLITS)}, not {name}: give --root")
    classes, per_class = SYNTHETIC_SPLITS[name]
    size = datamodule.image_size

    def load_split(split: str) -> ClassStore:
        count = classes[SPLITS.index(split)]
        g = torch.Generator().manual_seed(seed + SPLITS.index(split))
        images = torch.randint(0, 256, (count * per_class, channels, size, size), generator=g, dtype=torch.uint8)
        return ClassStore(images, [per_class] * count, [f"{split}{c}" for c in range(count)])

    datamodule.prepare_files = lambda: None
    datamodule.load_split = load_split


def final_form(model: pl.LightningModule) -> None:
    """Time the step the schedule spends most of its time in: second order after derivative-order annealing."""
    if getattr(model, "first_order_epochs", 0):
        model.first_order_epochs = 0


def measure(
    config_path: Path, root: str | None, synthetic: bool, device: str, warmup: int, steps: int, eval_batches: int
) -> dict[str, Any]:
    """Seconds per training step and per evaluation batch of one config, with its schedule's totals."""
    model, datamodule, config = build(config_path, root)
    trainer_config = config.get("trainer") or {}
    if synthetic:
        make_synthetic(datamodule, channels=int(getattr(model.backbone, "in_channels", 3)))
    final_form(model)
    precision = trainer_config.get("precision", "32-true")
    timer = StepTimer()
    options = dict(accelerator=device, devices=1, precision=precision, callbacks=[timer], max_epochs=-1)
    trainer = common.quiet_trainer(max_steps=warmup + steps, **options)
    trainer.fit(model, datamodule)
    common.quiet_trainer(limit_test_batches=eval_batches + 1, **options).test(model, datamodule, verbose=False)
    step = statistics.median(timer.train[warmup:])
    batch = statistics.median(timer.test[1:]) if len(timer.test) > 1 else timer.test[0]

    entry = reproduce.load_records().get(config_path.name) or {}
    epochs = int(trainer_config.get("max_epochs") or 1)
    if getattr(datamodule, "train_mode", "episodes") == "batches" and not entry.get("schedule_steps"):
        total_steps = epochs * trainer.num_training_batches  # an epoch is one pass over the training images
    else:
        total_steps = reproduce.schedule_steps(config, entry)
    validations = epochs // int(trainer_config.get("check_val_every_n_epoch") or 1)
    val_batches, test_batches = (math.ceil(datamodule.num_episodes(s) / datamodule.eval_meta_batch_size) for s in ("val", "test"))
    return {
        "config": config_path.name,
        "device": device_name(device),
        "step_s": step,
        "eval_batch_s": batch,
        "steps": total_steps,
        "train_h": total_steps * step / 3600,
        "validation_h": validations * val_batches * batch / 3600,
        "test_h": test_batches * batch / 3600,
    }


def unrun_configs() -> list[str]:
    """Configs without a recorded result whose data ``--synthetic`` can stand in for (not a user's image folder, and
    not reinforcement learning, which benchmarks/rl_speed.py times)."""
    records = reproduce.load_records()
    names = []
    for path in sorted(reproduce.CONFIGS.glob("*.yaml")):
        datamodule = yaml.safe_load(path.read_text())["data"]["class_path"].rpartition(".")[2]
        if not (records.get(path.name) or {}).get("results") and datamodule in SYNTHETIC_SPLITS:
            names.append(path.name)
    # Those a CPU cannot run first, so that a time-limited GPU run measures them before the others.
    return sorted(names, key=lambda name: "GPU" not in str(records.get(name, {}).get("estimate", "")))


def device_name(device: str) -> str:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"one {torch.cuda.get_device_name()}"
    threads = torch.get_num_threads()
    return f"{threads} CPU thread{'s' if threads > 1 else ''}"


def estimate_text(row: dict[str, Any]) -> str:
    total = row["train_h"] + row["validation_h"] + row["test_h"]
    return (
        f"about {total:.1f} h on {row['device']} (measured {datetime.date.today().isoformat()}: {row['step_s']:.3f} s per"
        f" training step, {row['eval_batch_s']:.3f} s per evaluation batch; benchmarks/estimate.py)"
    )


def record_estimate(row: dict[str, Any], path: Path = reproduce.RECORDS) -> None:
    records = reproduce.load_records(path)
    if row["config"] not in records:
        raise SystemExit(f"error: benchmarks/reproduction.yaml has no entry for {row['config']}: add its paper first")
    records[row["config"]]["estimate"] = estimate_text(row)
    reproduce.save_records(records, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, help="files in configs/")
    parser.add_argument("--root", default=None, help="the dataset folder (the configs' data.init_args.root)")
    parser.add_argument("--synthetic", action="store_true", help="random images of the dataset's shape instead of files")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--warmup", type=int, default=3, help="training steps before the clock starts")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--eval-batches", type=int, default=3, help="evaluation batches timed (after one warm-up batch)")
    parser.add_argument("--record", action="store_true", help="write each estimate into benchmarks/reproduction.yaml")
    parser.add_argument("--unrun", action="store_true", help="only list the configs without a recorded result")
    args = parser.parse_args(argv)
    if args.unrun:
        print(" ".join(unrun_configs()))
        return
    if not args.configs:
        parser.error("give at least one config (or --unrun)")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    print("| config | device | s/step | steps | training h | s/eval batch | validation h | test h | total h |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in args.configs:
        try:
            row = measure(path, args.root, args.synthetic, args.device, args.warmup, args.steps, args.eval_batches)
        except (Exception, SystemExit) as error:  # one config's failure leaves the others' rows
            print(f"| {path.name} | failed: {str(error).splitlines()[0] if str(error) else type(error).__name__} |", flush=True)
            continue
        total = row["train_h"] + row["validation_h"] + row["test_h"]
        print(
            f"| {row['config']} | {row['device']} | {row['step_s']:.3f} | {row['steps']:,} | {row['train_h']:.2f} |"
            f" {row['eval_batch_s']:.3f} | {row['validation_h']:.2f} | {row['test_h']:.2f} | {total:.2f} |",
            flush=True,
        )
        if args.record:
            record_estimate(row)


if __name__ == "__main__":
    main()
