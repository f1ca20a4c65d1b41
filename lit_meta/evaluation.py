"""Evaluating trained models outside the Trainer: per-episode values on fixed episodes, and paired comparisons.

``trainer.test`` reports a mean and its 95% interval. Comparing two models by their intervals throws away that both
saw the same episodes; the paired difference (:func:`~lit_meta.metrics.paired_difference`) on the values this module
returns keeps it::

    a = episode_values(load_model("a.ckpt"), datamodule)["acc"]
    b = episode_values(load_model("b.ckpt"), datamodule)["acc"]
    mean, half_width = paired_difference(a, b)   # a - b over the same 1,000 test episodes

``benchmarks/compare.py`` does this from the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from datamodules.base import EpisodicDataModule
    from lit_meta.algorithms.base import MetaLearner


def episode_values(model: "MetaLearner", datamodule: "EpisodicDataModule", split: str = "test", episodes: int | None = None) -> dict[str, Tensor]:
    """Every per-episode metric of ``model`` on the fixed ``split`` episodes of ``datamodule`` (``[episodes]`` each).

    The same episodes, protocol and values as ``trainer.test`` averages; the model is put in eval mode and runs on
    its own device.

    Args:
        model: a trained algorithm.
        datamodule: gives the episodes (``setup`` is called here).
        split: ``"val"`` or ``"test"``.
        episodes: evaluate only the first ``episodes`` episodes (the fixed episodes are the same whatever the count).
    """
    datamodule.setup("validate" if split == "val" else "test")
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    was_training = model.training
    model.eval()
    values: dict[str, list[Tensor]] = {}
    seen = 0
    try:
        for batch in loader:
            if episodes is not None and seen >= episodes:
                break
            seen += batch.num_tasks
            # The Trainer's path: to the model's device, then the datamodule's conversion (uint8 pixels to floats).
            batch = datamodule.prepare_batch(batch.to(model.device))
            for key, value in model.episode_metrics(batch).items():
                values.setdefault(key, []).append(value.cpu())
    finally:
        model.train(was_training)
    return {key: torch.cat(parts)[:episodes] for key, parts in values.items()}
