"""Mixed precision against float32: train the same meta-learner at each precision, print the test results side by side.

    python benchmarks/precision.py                                  # MAML, Omniglot 5-way 1-shot (Vinyals split)
    python benchmarks/precision.py --steps 300 --meta-batch-size 4 --hidden 32 --test-episodes 200   # a CPU smoke run
    python benchmarks/precision.py --datamodule datamodules.SinusoidDataModule --steps 500            # regression
    python benchmarks/precision.py --inner-loop-fp32                # also 16/bf16 with the inner loop in float32

Each precision starts from the same seed (same initialization, same episodes) and is tested on the same fixed
episodes: mean accuracy (or MSE) with its 95% confidence interval, final training loss, skipped (non-finite) steps,
wall time and tasks per second. Second-order meta-gradients differ between precisions (bf16 by tens of percent on
Conv-4, see docs/scaling.md), so the comparison is convergence, not equality.

``16-mixed`` is real float16 everywhere: on a GPU Lightning's ``precision="16-mixed"``; on CPU, where Lightning would
silently use bf16 for that string, an explicit ``MixedPrecision("16-mixed", "cpu", GradScaler("cpu"))`` plugin.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from common import quiet_trainer  # noqa: E402  (first: it puts the checkout on sys.path)
from data_paths import OMNIGLOT as DEFAULT_ROOT  # noqa: E402
from datamodules.base import EpisodicDataModule  # noqa: E402
from lit_meta import MAML, Conv4, SinusoidMLP  # noqa: E402
from lit_meta.algorithms.base import MetaLearner  # noqa: E402
from lit_meta.callbacks import Throughput  # noqa: E402


def load_class(path: str) -> type:
    """``"package.module.Class"`` -> the class."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_datamodule(args: argparse.Namespace) -> EpisodicDataModule:
    cls = load_class(args.datamodule)
    common = dict(
        meta_batch_size=args.meta_batch_size,
        train_batches=args.steps,
        test_episodes=args.test_episodes,
        val_episodes=args.val_episodes,
        eval_meta_batch_size=args.eval_meta_batch_size,
        seed=args.seed,
    )
    if getattr(cls, "task_type", "classification") == "regression":
        return cls(shots=args.shots if args.shots is not None else 10, queries=args.queries, **common)
    options: dict[str, Any] = dict(ways=args.ways, shots=args.shots or 1, queries=args.queries, **common)
    if args.root is not None:
        options["root"] = args.root
    return cls(**options)


def build_model(args: argparse.Namespace, dm: EpisodicDataModule, inner_loop_fp32: bool) -> MetaLearner:
    """Finn et al.'s MAML: Conv-4 (stride-2 convolutions, spatial mean) for images, the 40-40 MLP for regression."""
    optimizer = lambda params: torch.optim.Adam(params, lr=args.meta_lr)  # noqa: E731
    common = dict(inner_steps=args.inner_steps, eval_inner_steps=args.eval_inner_steps, first_order=args.first_order,
                  optimizer=optimizer, inner_loop_fp32=inner_loop_fp32)
    if dm.task_type == "regression":
        return MAML(SinusoidMLP(), inner_lr=args.inner_lr if args.inner_lr is not None else 0.01, **common)
    dm.setup("fit")  # to read the image shape off one batch
    sample = dm.train_dataloader().batch(0)
    channels, size = sample.support_x.shape[2], sample.support_x.shape[-1]
    backbone = Conv4(in_channels=channels, hidden=args.hidden, out_features=args.ways, pool="stride", embedding="mean", image_size=size)
    return MAML(backbone, inner_lr=args.inner_lr if args.inner_lr is not None else 0.4, **common)


def precision_options(precision: str, accelerator: str) -> dict[str, Any]:
    """Trainer arguments for ``precision``; real fp16 (explicit plugin + GradScaler) where Lightning would use bf16."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision == "16-mixed" and on_cpu:
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


def run(args: argparse.Namespace, precision: str, inner_loop_fp32: bool) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    dm = build_datamodule(args)
    model = build_model(args, dm, inner_loop_fp32)
    throughput = Throughput(window=max(1, min(50, args.steps)))
    trainer = quiet_trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.steps,
        callbacks=[throughput],
        **precision_options(precision, args.accelerator),
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    tasks_per_sec = float(trainer.callback_metrics.get("train/tasks_per_sec", float("nan")))
    results = trainer.test(model, dm, verbose=False)[0]
    metric = "acc" if dm.task_type == "classification" else "mse"
    return {
        "precision": precision + (" +fp32 inner" if inner_loop_fp32 else ""),
        "metric": metric,
        "value": results[f"test/{metric}"],
        "ci": results[f"test/{metric}_ci95"],
        "train_loss": train_loss,
        "skipped": model.skipped_steps,
        "seconds": seconds,
        "tasks_per_sec": tasks_per_sec,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datamodule", default="datamodules.OmniglotDataModule", help="class path of an EpisodicDataModule")
    parser.add_argument("--root", default=None, help=f"data folder (default for Omniglot: {DEFAULT_ROOT})")
    parser.add_argument("--precisions", default="32-true,bf16-mixed,16-mixed")
    parser.add_argument("--inner-loop-fp32", action="store_true", help="also run each mixed precision with inner_loop_fp32")
    parser.add_argument("--steps", type=int, default=5000, help="meta-training steps")
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=None, help="default: 1 (classification), 10 (regression)")
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=64, help="Conv-4 width")
    parser.add_argument("--inner-lr", type=float, default=None, help="default: 0.4 (images), 0.01 (regression)")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--eval-inner-steps", type=int, default=3)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--val-episodes", type=int, default=16)
    parser.add_argument("--eval-meta-batch-size", type=int, default=16)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.root is None and args.datamodule.endswith("OmniglotDataModule") and DEFAULT_ROOT.exists():
        args.root = str(DEFAULT_ROOT)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for precision in args.precisions.split(","):
        variants = [False] + ([True] if args.inner_loop_fp32 and precision != "32-true" else [])
        for inner_fp32 in variants:
            rows.append(run(args, precision, inner_fp32))
            print(f"done: {rows[-1]['precision']} in {rows[-1]['seconds']:.0f} s", flush=True)

    name = load_class(args.datamodule).__name__
    order = "first" if args.first_order else "second"
    metric = rows[0]["metric"]
    if metric == "mse":
        setting = f"{args.shots or 10}-shot regression, {args.queries} query points, MLP 40-40"
    else:
        setting = (
            f"{args.ways}-way {args.shots or 1}-shot, {args.queries} queries, Conv-4 width {args.hidden}, "
            "batch-statistics norm (transductive)"
        )
    print(
        f"\nMAML ({order} order) on {name}: {setting}; {args.steps} steps x {args.meta_batch_size} tasks, "
        f"inner steps {args.inner_steps} (test {args.eval_inner_steps}); last checkpoint, "
        f"{args.test_episodes} test episodes, mean +- 95% CI"
    )
    header = f"{'precision':<24} | {'test ' + metric:>17} | {'train loss':>10} | {'skipped':>7} | {'time':>7} | {'tasks/s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        value = f"{r['value']:.4f} +- {r['ci']:.4f}"
        print(f"{r['precision']:<24} | {value:>17} | {r['train_loss']:>10.4f} | {r['skipped']:>7} | {r['seconds']:>6.0f}s | {r['tasks_per_sec']:>8.1f}")


if __name__ == "__main__":
    main()
