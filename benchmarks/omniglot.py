"""Omniglot few-shot accuracy of every algorithm within a wall-clock budget.

Trains on the real Omniglot (Vinyals split: 1028 / 172 / 423 characters, x4 with 90-degree rotations, 28x28) for
``--minutes`` of wall-clock time, then prints the test accuracy (mean +- 95% CI over ``--episodes`` fixed test
episodes, last model, no validation-based selection) beside the published number, the wall times, and the accuracy on
Lake et al.'s 20 one-shot runs (20-way within-alphabet, 400 test images).

    python benchmarks/omniglot.py                                   # ProtoNet 5-way 1-shot, 15 minutes
    python benchmarks/omniglot.py --ways 20 --shots 5 --minutes 30
    python benchmarks/omniglot.py --method maml --minutes 20        # Finn et al.'s 5-way 1-shot setting
    python benchmarks/omniglot.py --method fomaml --minutes 20
    python benchmarks/omniglot.py --method matchingnet --minutes 15
    python benchmarks/omniglot.py --method metabgd --inner-steps 5
    python benchmarks/omniglot.py --minutes 1 --episodes 200        # a smoke run

MAML / FOMAML / ANIL / Meta-SGD follow Finn et al. 2017: Conv-4 with stride-2 convs and a spatially averaged 64-d
feature, a linear head; 5-way: one inner step alpha=0.4 in training, 3 at test, meta-batch 32; 20-way: 5 steps
alpha=0.1, meta-batch 16; one query per class in training (the paper's K queries), Adam 1e-3. The paper trains
60,000 meta-iterations; a bounded run here says how far it gets in the budget.

Setup (Snell et al. 2017 for ProtoNet): Conv-4 (64 filters, 3x3 conv, batch-statistics norm, ReLU, 2x2 max-pool;
64-d embeddings), support and query embedded jointly; ProtoNet trains on 60-way episodes with the test's shots and
5 queries per class, one episode per step; MatchingNet and MetaBGD train on the test's ways and shots with 15
queries, 4 episodes per step. Adam 1e-3. Unlike the papers' schedules (ProtoNet halves the rate every 2,000
episodes), the learning rate follows a cosine over the *wall-clock* budget, so any budget ends annealed.

Lake's runs: with the Vinyals split, 78 of the runs' 200 characters were among the training characters (the Vinyals
training split takes 8 evaluation alphabets), so that number is optimistic; ``--split lake`` trains on the 30
background alphabets only (Lake's protocol; then the split's test set is the 20 evaluation alphabets).
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from common import REPO, quiet_trainer  # noqa: E402  (first: it puts the checkout on sys.path)
from data_paths import OMNIGLOT  # noqa: E402
from datamodules import OmniglotDataModule  # noqa: E402
from lit_meta.algorithms import ANIL, MAML, MatchingNet, MetaBGD, MetaSGD, ProtoNet  # noqa: E402
from lit_meta.backbones import Conv4  # noqa: E402

#: Published Omniglot test accuracies (%), Vinyals split with rotations, Conv-4.
PAPER = {
    "protonet": ({(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9}, "Snell et al. 2017, Table 1"),
    "matchingnet": ({(5, 1): 98.1, (5, 5): 98.9, (20, 1): 93.8, (20, 5): 98.5}, "Vinyals et al. 2016, Table 1"),
    "metabgd": ({}, "no published number for this method"),
    "maml": ({(5, 1): 98.7, (5, 5): 99.9, (20, 1): 95.8, (20, 5): 98.9}, "Finn et al. 2017, Table 1"),
    "fomaml": ({(5, 1): 98.3, (5, 5): 99.2, (20, 1): 89.4, (20, 5): 97.9}, "Finn et al. 2017, Table 1"),
    "anil": ({}, "no Omniglot number in Raghu et al. 2020"),
    "metasgd": ({(5, 1): 99.53, (5, 5): 99.93, (20, 1): 95.93, (20, 5): 98.97}, "Li et al. 2017, Table 1"),
}
OPTIMIZATION = ("maml", "fomaml", "anil", "metasgd")
LAKE_REFERENCE = "people 95.5, Bayesian Program Learning 96.7 (Lake et al. 2015)"


class WallClockCosine(torch.optim.lr_scheduler.LambdaLR):
    """Cosine decay of the learning rate from its initial value to ``floor`` times it over ``seconds`` of wall time.

    Stepped every optimizer step; the factor depends on the time elapsed since the first step, so the schedule fits
    the budget whatever the speed of the machine.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, seconds: float, floor: float = 0.01) -> None:
        self.seconds, self.floor, self.start = seconds, floor, None
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        now = time.monotonic()
        if self.start is None or step == 0:
            self.start = now
        progress = min(1.0, (now - self.start) / self.seconds)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(args: argparse.Namespace, seconds: float) -> pl.LightningModule:
    # The native norm kernel is exact (and faster) wherever its second derivatives are not needed: no second-order
    # terms (ProtoNet, MatchingNet, first-order methods), or only in the head (ANIL); the configs do the same.
    fused = args.method in ("protonet", "matchingnet", "fomaml", "anil") or (args.first_order and args.method in OPTIMIZATION)
    if args.method in OPTIMIZATION:
        backbone = Conv4(
            in_channels=1, hidden=64, out_features=args.ways, pool="stride", image_size=28, embedding="mean", fused_norm=fused
        )
    else:
        backbone = Conv4(in_channels=1, hidden=64, out_features=None, pool="max", image_size=28, fused_norm=fused)
    common = dict(
        optimizer=lambda params: torch.optim.Adam(params, lr=args.lr),
        lr_scheduler=lambda optimizer: WallClockCosine(optimizer, seconds),
        scheduler_interval="step",
        # One episode per step gains nothing from vmap on a CPU (it was slower here); several do on a GPU.
        vectorize=args.meta_batch_size > 1 or torch.cuda.is_available(),
        chunk_size=args.eval_chunk,
    )
    if args.method == "protonet":
        return ProtoNet(backbone, distance=args.distance, **common)
    if args.method == "matchingnet":
        return MatchingNet(backbone, fce=args.fce, **common)
    if args.method in OPTIMIZATION:
        cls = {"maml": MAML, "fomaml": MAML, "anil": ANIL, "metasgd": MetaSGD}[args.method]
        return cls(
            backbone,
            inner_lr=args.inner_lr,
            inner_steps=args.inner_steps,
            eval_inner_steps=args.eval_inner_steps,
            first_order=args.method == "fomaml" or args.first_order,
            **common,
        )
    return MetaBGD(
        backbone, inner_lr=args.inner_lr, inner_steps=args.inner_steps, eval_inner_steps=args.eval_inner_steps, first_order=args.first_order, **common
    )


def init_from(model: pl.LightningModule, path: Path) -> None:
    """Load the weights of a checkpoint this script saved, or exit with a one-line reason."""
    if not path.is_file():
        raise SystemExit(f"--init-from: no file {path}")
    state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict")
    if state is None:
        raise SystemExit(f"--init-from: {path} holds no 'state_dict': pass a checkpoint this script saved")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 else lines[0]  # lines[0] only says that loading failed
        raise SystemExit(f"--init-from: {path} does not fit this model ({first}); use the method and ways it was trained with")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(PAPER), default="protonet")
    parser.add_argument("--ways", type=int, default=5, help="test ways")
    parser.add_argument("--shots", type=int, default=1, help="test shots (training uses the same unless --train-shots)")
    parser.add_argument("--queries", type=int, default=15, help="test queries per class")
    parser.add_argument("--train-ways", type=int, default=None, help="default: 60 for protonet, else --ways")
    parser.add_argument("--train-shots", type=int, default=None, help="default: --shots")
    parser.add_argument("--train-queries", type=int, default=None, help="default: 5 for protonet, else 15")
    parser.add_argument("--meta-batch-size", type=int, default=None, help="episodes per step; default 1 for protonet, else 4")
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget")
    parser.add_argument("--episodes", type=int, default=1000, help="fixed test episodes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--distance", choices=["euclidean", "cosine"], default="euclidean", help="protonet")
    parser.add_argument("--fce", action="store_true", help="matchingnet: full-context embeddings")
    parser.add_argument("--inner-steps", type=int, default=None, help="inner steps in training (MAML 5-way: 1, 20-way: 5; metabgd: 5)")
    parser.add_argument("--eval-inner-steps", type=int, default=None, help="inner steps at test (MAML 5-way: 3, 20-way: 5)")
    parser.add_argument("--inner-lr", type=float, default=None, help="MAML 5-way: 0.4, 20-way: 0.1; metabgd: 0.5")
    parser.add_argument("--first-order", action="store_true", help="maml family and metabgd")
    parser.add_argument("--split", choices=["vinyals", "lake"], default="vinyals")
    parser.add_argument("--root", type=Path, default=OMNIGLOT, help=f"the full Omniglot (default: {OMNIGLOT})")
    parser.add_argument("--no-lake-runs", action="store_true", help="skip Lake's 20 one-shot runs")
    parser.add_argument("--eval-batch", type=int, default=50, help="test episodes per batch")
    parser.add_argument("--eval-chunk", type=int, default=None, help="vmap chunk of evaluation tasks (memory)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--save", type=Path, default=None, help="where to write the trained model (default: runs/benchmarks/<method>-<ways>w<shots>s.ckpt)"
    )
    parser.add_argument(
        "--init-from", type=Path, default=None,
        help="start from the weights of a model this script saved (same method and ways), with a fresh optimizer and "
        "learning-rate cosine over --minutes: a warm restart; pass another --seed for unseen training episodes",
    )
    args = parser.parse_args()
    args.save = args.save or REPO / "runs" / "benchmarks" / f"{args.method}-{args.ways}w{args.shots}s.ckpt"
    protonet, optimization = args.method == "protonet", args.method in OPTIMIZATION
    five_way = args.ways <= 5
    args.train_ways = args.train_ways or (60 if protonet else args.ways)
    args.train_shots = args.train_shots or args.shots
    args.train_queries = args.train_queries or (5 if protonet else args.shots if optimization else 15)
    args.meta_batch_size = args.meta_batch_size or (1 if protonet else (32 if five_way else 16) if optimization else 4)
    if optimization:
        args.inner_steps = args.inner_steps or (1 if five_way else 5)
        args.eval_inner_steps = args.eval_inner_steps or (3 if five_way else 5)
        args.inner_lr = args.inner_lr or (0.4 if five_way else 0.1)
    else:
        args.inner_steps = args.inner_steps or 5
        args.eval_inner_steps = args.eval_inner_steps or args.inner_steps
        args.inner_lr = args.inner_lr or 0.5
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Lake's runs.*")  # the overlap is printed with the result
    pl.seed_everything(args.seed, verbose=False)

    seconds = args.minutes * 60
    data = OmniglotDataModule(
        root=args.root,
        split=args.split,
        ways=args.ways,
        shots=args.shots,
        queries=args.queries,
        train_ways=args.train_ways,
        train_shots=args.train_shots,
        train_queries=args.train_queries,
        meta_batch_size=args.meta_batch_size,
        train_batches=1000,
        test_episodes=args.episodes,
        eval_meta_batch_size=args.eval_batch,
        seed=args.seed,
    )
    start = time.perf_counter()
    data.prepare_data()
    data.setup("fit")  # decoding (or reading the cache) is not training time
    data_time = time.perf_counter() - start

    model = build_model(args, seconds)
    if args.init_from is not None:
        init_from(model, args.init_from)
    trainer = quiet_trainer(
        max_time={"seconds": seconds},
        max_epochs=-1,
        precision="32-true",
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_time = time.perf_counter() - start
    steps = trainer.global_step

    # Keep what was trained whatever happens next (an evaluation error must not cost the run).
    args.save.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(args.save)
    print(f"saved the trained model to {args.save} ({steps} steps)", flush=True)

    start = time.perf_counter()
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    test_time = time.perf_counter() - start
    print(f"test accuracy {100 * result['test/acc']:.2f} ± {100 * result['test/acc_ci95']:.2f} %", flush=True)

    lake = None
    outputs = model.head_outputs()
    if not args.no_lake_runs and outputs is not None and outputs < 20:
        print(f"Lake's runs skipped: they are 20-way and this model's head has {outputs} outputs", flush=True)
    elif not args.no_lake_runs:
        runs = OmniglotDataModule(
            root=args.root, split=args.split, ways=20, test_set="lake_runs", eval_meta_batch_size=20, seed=args.seed
        )
        start = time.perf_counter()
        lake = trainer.test(model, datamodule=runs, verbose=False)[0]
        lake_time = time.perf_counter() - start

    name = {
        "protonet": "ProtoNet",
        "matchingnet": "MatchingNet" + (" (FCE)" if args.fce else ""),
        "metabgd": "MetaBGD",
        "maml": "MAML (second order)",
        "fomaml": "FOMAML",
        "anil": "ANIL",
        "metasgd": "Meta-SGD",
    }[args.method]
    numbers, source = PAPER[args.method]
    paper = numbers.get((args.ways, args.shots)) if args.split == "vinyals" else None
    paper_text = f"{paper:.1f} ({source})" if paper is not None else f"- ({source if not numbers else 'different setting'})"
    print()
    print(f"{name} on Omniglot, {args.split} split{' with 90-degree rotations' if args.split == 'vinyals' else ''}, 28x28, Conv-4 64-d")
    if args.init_from is not None:
        print(f"  continued from {args.init_from} (its weights; fresh Adam and cosine, seed {args.seed})")
    print(
        f"  training : {args.train_ways}-way {args.train_shots}-shot {args.train_queries}-query, {args.meta_batch_size} episode(s)/step, "
        f"Adam {args.lr:g} cosine over {args.minutes:g} min: {steps} steps in {train_time:.0f} s "
        f"({train_time / max(steps, 1):.2f} s/step; data ready in {data_time:.0f} s; {torch.get_num_threads()} threads)"
    )
    print(f"  {'setting':<34} {'accuracy %':>16}   {'published':<40} {'wall':>7}")
    setting = f"{args.ways}-way {args.shots}-shot, {args.episodes} episodes"
    acc = f"{100 * result['test/acc']:.2f} ± {100 * result['test/acc_ci95']:.2f}"
    print(f"  {setting:<34} {acc:>16}   {paper_text:<40} {test_time:>6.0f}s")
    if optimization:
        print(f"  {'  inner steps train / test, alpha':<34} {args.inner_steps} / {args.eval_inner_steps}, {args.inner_lr:g}")
    if args.method == "metabgd":
        pre = f"{100 * result['test/acc_pre']:.2f} ± {100 * result['test/acc_pre_ci95']:.2f}"
        print(f"  {'  (generated head, no fine-tuning)':<34} {pre:>16}")
    if lake is not None:
        acc = f"{100 * lake['test/acc']:.2f} ± {100 * lake['test/acc_ci95']:.2f}"
        print(f"  {'Lake 20 runs, 20-way 1-shot':<34} {acc:>16}   {LAKE_REFERENCE:<40} {lake_time:>6.0f}s")
        if args.split == "vinyals":
            print("  (78 of the runs' 200 characters are in the Vinyals training split: optimistic; --split lake is clean)")
    print(f"  total wall time {train_time + test_time + (lake_time if lake else 0) + data_time:.0f} s")


if __name__ == "__main__":
    main()
