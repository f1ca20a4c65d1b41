"""Meta-BGD's designs before any meta-training: what the initial head and the fine-tuning do on the random Conv-4
features of real Omniglot test episodes.

    python benchmarks/metabgd_init.py --root data/omniglot            # 5-way and 20-way 1-shot, 100 episodes each

One row per ablation config (``configs/omniglot_metabgd_ablation_*_20w1s.yaml``), built from the config with a freshly
initialised Conv-4 (seed 0), evaluated on the config's test episodes re-shaped to each way count, with transductive
batch statistics (a model that has not trained has no running statistics). Columns: accuracy of the initial head
and after the config's fine-tuning steps, the largest ``alpha * lambda_max`` of a fine-tuning step (below 2 a step
does not diverge, below 1 it does not oscillate), the relative change of the head, and the mean cosine between the
raw class-mean embeddings of an episode.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import REPO  # noqa: E402  (first: it puts the checkout on sys.path)
from lit_meta.algorithms.embedding import class_means  # noqa: E402
from lit_meta.backbones import build_backbone  # noqa: E402
from lit_meta.metrics import mean_confidence_interval  # noqa: E402
from reproduce import build_datamodule, read_config  # noqa: E402

VARIANTS = ("mlp_generator", "full", "protomaml", "finetune_only", "generator_only")


def build_model(config: dict, **overrides):
    """The config's model, freshly initialised (no optimizer or scheduler: nothing is trained here)."""
    module_name, _, class_name = config["model"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    init_args = {k: v for k, v in config["model"]["init_args"].items() if k not in ("optimizer", "lr_scheduler", "scheduler_interval")}
    init_args["backbone"] = build_backbone(init_args["backbone"])
    init_args.update(overrides)
    return cls(**init_args)


def class_mean_cosine(model, batch) -> float:
    """Mean pairwise cosine between the raw class-mean embeddings of the episodes' support sets."""
    values = []
    with torch.no_grad():
        for sx, sy in zip(batch.support_x, batch.support_y):
            means = F.normalize(class_means(model.embed(sx), sy, batch.ways), dim=-1)
            cos = means @ means.T
            n = cos.shape[0]
            values.append((cos.sum() - n) / (n * (n - 1)))
    return float(torch.stack(values).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO / "data" / "omniglot"), help="the Omniglot folder")
    parser.add_argument("--episodes", type=int, default=100, help="test episodes per way count")
    parser.add_argument("--ways", type=int, nargs="*", default=[5, 20])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'variant':>15} | {'ways':>4} | {'initial head':>14} | {'fine-tuned':>14} | {'alpha*lambda':>12} | {'drift':>6} | {'cos(means)':>10}")
    print("-" * 96)
    for variant in VARIANTS:
        config = read_config(f"omniglot_metabgd_ablation_{variant}_20w1s.yaml")
        for ways in args.ways:
            torch.manual_seed(0)
            model = build_model(config, normalization="transductive", eval_inner_steps=5)
            data = build_datamodule(config, args.root, ways=ways, test_episodes=args.episodes, eval_meta_batch_size=args.episodes)
            data.setup("test")
            batch = data.prepare_batch(next(iter(data.test_dataloader())))
            values = model.episode_metrics(batch)
            pre, post = (mean_confidence_interval(values[k]) for k in ("acc_pre", "acc"))
            drift = float(values["drift"].mean()) if "drift" in values else float("nan")
            print(
                f"{variant:>15} | {ways:>4} | {100 * pre[0]:6.2f} ± {100 * pre[1]:4.2f} | {100 * post[0]:6.2f} ± {100 * post[1]:4.2f} | "
                f"{float(values['stability'].max()):12.3f} | {drift:6.3f} | {class_mean_cosine(model, batch):10.3f}"
            )


if __name__ == "__main__":
    main()
