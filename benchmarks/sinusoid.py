"""Sinusoid regression (Finn et al. 2017, section 5.1): train MAML, then print the K-shot test MSE after 1/5/10
inner steps beside the paper.

    python benchmarks/sinusoid.py                      # the full schedule: 70,000 meta-iterations
    python benchmarks/sinusoid.py --iterations 10000   # a bounded run

Setup: MLP 1-40-40-1, one inner step alpha=0.01 in training, Adam 1e-3, meta-batch 25, K=5 (trained and tested
with the same K). Test: 600 fixed tasks, 100 query points each, mean MSE +- 95% CI.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("WANDB_MODE", "disabled")

import lightning.pytorch as pl  # noqa: E402

from common import quiet_trainer  # noqa: E402  (first: it puts the checkout on sys.path)
from datamodules import SinusoidDataModule  # noqa: E402
from lit_meta import MAML, SinusoidMLP  # noqa: E402

PAPER = {1: 0.67, 5: 0.38, 10: 0.35}  # Finn et al.'s K = 5 MAML curve, as configs/sinusoid_maml.yaml cites it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=70_000)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed, verbose=False)
    per_epoch = min(1000, args.iterations)
    dm = SinusoidDataModule(
        shots=args.shots, queries=10, meta_batch_size=25, train_batches=per_epoch, test_episodes=600, seed=args.seed
    )
    model = MAML(SinusoidMLP(), inner_lr=0.01, inner_steps=1)
    trainer = quiet_trainer(
        max_steps=args.iterations,
        accelerator="cpu",
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    train_time = time.perf_counter() - start

    test_dm = SinusoidDataModule(shots=args.shots, queries=100, test_episodes=600, eval_meta_batch_size=100, seed=args.seed)
    rows = []
    for steps in (1, 5, 10):
        model.eval_inner_steps = steps
        result = trainer.test(model, test_dm, verbose=False)[0]
        rows.append((steps, result["test/mse"], result["test/mse_ci95"], result["test/mse_pre"]))

    print(f"\nMAML sinusoid, K={args.shots}, {args.iterations} meta-iterations in {train_time:.0f} s (CPU)")
    print(f"{'inner steps':>11} | {'MSE (ours)':>16} | {'Finn et al.':>11} | {'before adaptation':>17}")
    print("-" * 65)
    for steps, mse, ci, pre in rows:
        paper = f"{PAPER[steps]:.2f}" if args.shots == 5 else "-"
        print(f"{steps:>11} | {mse:>8.3f} +- {ci:.3f} | {paper:>11} | {pre:>17.3f}")


if __name__ == "__main__":
    main()
