"""Episodic LightningDataModules for few-shot learning; every one yields :class:`TaskBatch`."""

from datamodules.base import EpisodeShape, EpisodicDataModule
from datamodules.errors import ConfigError, DataError, LitMetaError
from datamodules.sampler import EpisodeLoader, episode_generator, episode_seed
from datamodules.sinusoid import SinusoidDataModule
from datamodules.task_batch import TaskBatch

__all__ = [
    "ConfigError",
    "DataError",
    "EpisodeLoader",
    "EpisodeShape",
    "EpisodicDataModule",
    "LitMetaError",
    "SinusoidDataModule",
    "TaskBatch",
    "episode_generator",
    "episode_seed",
]
