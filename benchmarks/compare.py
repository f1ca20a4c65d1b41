"""Paired comparison of two models on the same fixed test episodes: each mean ± 95% CI and the difference A - B
± its paired 95% CI (Student's t over the per-episode differences).

    python benchmarks/compare.py configs/omniglot_protonet_5w1s.yaml A.ckpt B.ckpt --root data/omniglot
    python benchmarks/compare.py configs/omniglot_protonet_5w1s.yaml M.ckpt M.ckpt --root data/omniglot \\
        --a normalization=running --b normalization=transductive      # one model under two protocols

The episodes, protocol and per-episode values are those of ``python -m lit_meta test --config CONFIG``; ``--a`` /
``--b`` override a model's hyper-parameters (``normalization``, ``eval_inner_steps``) for that side only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
import yaml  # noqa: E402

from common import REPO  # noqa: E402,F401  (first: it puts the checkout on sys.path)
from lit_meta import load_model  # noqa: E402
from lit_meta.evaluation import episode_values  # noqa: E402
from lit_meta.metrics import mean_confidence_interval, paired_difference  # noqa: E402
from reproduce import EPISODES_SUFFIX, build_datamodule, episode_source, read_config, saved_values  # noqa: E402


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``["normalization=running", "eval_inner_steps=10"]`` as keyword arguments (values read as YAML)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: override {item!r} is not key=value, e.g. normalization=running")
        overrides[key] = yaml.safe_load(value)
    return overrides


def side_values(path: str, overrides: dict[str, object], config_name: str, root: str | None, episodes: int | None):
    """Per-episode test values of one side: read from a saved ``.episodes.pt`` file, or evaluated from a checkpoint."""
    if path.endswith(EPISODES_SUFFIX):
        if overrides:
            raise SystemExit(f"error: {path} holds saved values; hyper-parameter overrides need its checkpoint instead")
        values = saved_values(path, config_name)
        return {k: v[:episodes] for k, v in values.items()} if episodes else values
    model = load_model(path, map_location="cpu", **overrides)
    return episode_values(model, build_datamodule(read_config(config_name), root), "test", episodes=episodes)


def save_values(directory: str, path: str, items: list[str], config_name: str, values: dict) -> Path:
    """Write one side's per-episode values for later pairings (named after the checkpoint and its overrides)."""
    # The config and the folder are part of the name: one checkpoint is often tested on several configs' episodes,
    # and released checkpoints are often all called after their step.
    suffix = "".join(f".{item.replace('=', '-')}" for item in items) + EPISODES_SUFFIX
    name = f"{Path(config_name).stem}.{Path(path).parent.name}-{Path(path).stem}{suffix}"
    target = Path(directory) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config_name, "episodes": episode_source(config_name), "checkpoint": path, "overrides": items,
                "values": values}, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the config whose test episodes both models are evaluated on")
    parser.add_argument("a", help="checkpoint A")
    parser.add_argument("b", help="checkpoint B")
    parser.add_argument("--root", default=None, help="the dataset folder (the config's data.init_args.root)")
    parser.add_argument("--a", dest="a_overrides", nargs="*", default=[], help="hyper-parameters for A: key=value")
    parser.add_argument("--b", dest="b_overrides", nargs="*", default=[], help="hyper-parameters for B: key=value")
    parser.add_argument("--episodes", type=int, default=None, help="only the first N test episodes")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="write each evaluated side's per-episode values to DIR/<config>.<folder>-<checkpoint>.episodes.pt")
    args = parser.parse_args(argv)

    config_name = os.path.basename(args.config)
    values = {}
    for side, path, items in (("A", args.a, args.a_overrides), ("B", args.b, args.b_overrides)):
        values[side] = side_values(path, parse_overrides(items), config_name, args.root, args.episodes)
        if args.save and not path.endswith(EPISODES_SUFFIX):
            print(f"{side}: per-episode values saved to {save_values(args.save, path, items, config_name, values[side])}")
    metrics = [k for k in values["A"] if k in values["B"]]
    n = len(values["A"][metrics[0]])
    print(f"{args.config}: {n} test episodes; A = {args.a} {' '.join(args.a_overrides)}; B = {args.b} {' '.join(args.b_overrides)}")
    print(f"{'metric':>10} | {'A':>20} | {'B':>20} | {'A - B (paired)':>20}")
    print("-" * 80)
    for key in metrics:
        # Accuracies in points; losses and the other diagnostics keep the digits their step-to-step changes need.
        scale, digits = (100.0, 3) if key.startswith("acc") else (1.0, 5)
        a_mean, a_ci = mean_confidence_interval(values["A"][key])
        b_mean, b_ci = mean_confidence_interval(values["B"][key])
        d_mean, d_ci = paired_difference(values["A"][key], values["B"][key])
        cells = [f"{f'{scale * m:.{digits}f} ± {scale * c:.{digits}f}':>20}"
                 for m, c in ((a_mean, a_ci), (b_mean, b_ci), (d_mean, d_ci))]
        print(f"{key:>10} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
