"""What the benchmark scripts share: the checkout on ``sys.path``, and a Trainer that only trains (no logging,
checkpoints, validation or bars)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]
# The scripts import common first, so that they also run from a bare checkout (a GPU machine with no install).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lit_meta.allocator import tune_cpu_allocator  # noqa: E402

# The benchmarks train as the command line does, with its allocator settings (LIT_META_MALLOC=system: without).
tune_cpu_allocator()


def quiet_trainer(**overrides: Any) -> pl.Trainer:
    """A Trainer for timing and scoring runs; ``inference_mode`` off because evaluation adapts with gradients."""
    options: dict[str, Any] = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    options.update(overrides)
    return pl.Trainer(**options)
