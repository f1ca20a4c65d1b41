"""Sinusoid regression (Finn et al. 2017, section 5.1)."""

from __future__ import annotations

import math

import torch

from datamodules.base import EpisodicDataModule
from datamodules.errors import ConfigError
from datamodules.sampler import Task


class SinusoidDataModule(EpisodicDataModule):
    """K-shot regression of ``y = A sin(x - phase)``.

    Each task draws ``A ~ U[amplitude_range]`` and ``phase ~ U[phase_range]``; support and query inputs are drawn
    independently from ``U[input_range]``. ``shots`` is K (support points), ``queries`` the query points per task.
    Inputs and targets are float tensors of shape ``[T, K, 1]``.

    Args:
        shots: support points per task (K).
        queries: query points per evaluation task.
        train_queries: query points per training task (default ``queries``); Finn et al. use K.
        amplitude_range, phase_range, input_range: the task distribution; defaults are the paper's.
        **kwargs: see :class:`~datamodules.base.EpisodicDataModule` (``ways`` is fixed to 1).
    """

    task_type = "regression"

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        meta_batch_size: int = 25,
        train_batches: int = 1000,
        val_episodes: int = 100,
        test_episodes: int = 600,
        eval_meta_batch_size: int = 100,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        input_range: tuple[float, float] = (-5.0, 5.0),
        train_queries: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            ways=1,
            shots=shots,
            queries=queries,
            train_queries=train_queries,
            meta_batch_size=meta_batch_size,
            train_batches=train_batches,
            val_episodes=val_episodes,
            test_episodes=test_episodes,
            eval_meta_batch_size=eval_meta_batch_size,
            seed=seed,
        )
        for name, (low, high) in (
            ("amplitude_range", amplitude_range),
            ("phase_range", phase_range),
            ("input_range", input_range),
        ):
            if not low <= high:
                raise ConfigError(f"{name} must be (low, high) with low <= high, got {(low, high)}")
        self.amplitude_range = tuple(amplitude_range)
        self.phase_range = tuple(phase_range)
        self.input_range = tuple(input_range)

    @staticmethod
    def _uniform(generator: torch.Generator, shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
        low, high = bounds
        return torch.rand(shape, generator=generator) * (high - low) + low

    def sample_function(self, generator: torch.Generator) -> tuple[float, float]:
        """Draw ``(amplitude, phase)`` of one task."""
        amplitude = self._uniform(generator, (1,), self.amplitude_range).item()
        phase = self._uniform(generator, (1,), self.phase_range).item()
        return amplitude, phase

    def sample_task(self, split: str, generator: torch.Generator) -> Task:
        amplitude, phase = self.sample_function(generator)
        shape = self.shape(split)
        x = self._uniform(generator, (shape.shots + shape.queries, 1), self.input_range)
        y = amplitude * torch.sin(x - phase)
        return x[: shape.shots], y[: shape.shots], x[shape.shots :], y[shape.shots :]
