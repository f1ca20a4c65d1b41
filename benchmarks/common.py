"""What the benchmark scripts share: a Trainer that only trains (no logging, checkpoints, validation or bars)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


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
