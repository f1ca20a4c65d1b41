"""Episodic LightningDataModules for few-shot learning: every one yields :class:`TaskBatch` es, and the image ones
also mini-batches of labelled examples (:class:`ExampleBatch`, ``train_mode: batches``)."""

from datamodules.augmentation import Augmentation, AugmentationParams, AugmentedBatch
from datamodules.base import EpisodeShape, EpisodicDataModule
from datamodules.cifar import CIFARFSDataModule, FC100DataModule
from datamodules.errors import ConfigError, DataError, LitMetaError
from datamodules.image_folder import ImageFolderDataModule
from datamodules.images import ClassImageDataModule
from datamodules.mini_imagenet import MiniImageNetDataModule
from datamodules.omniglot import OmniglotDataModule
from datamodules.predict_folder import InputFormat, PredictFolderDataModule
from datamodules.sampler import BatchLoader, EpisodeLoader, episode_generator, episode_seed
from datamodules.sinusoid import SinusoidDataModule
from datamodules.store import ClassStore
from datamodules.task_batch import ExampleBatch, TaskBatch

__all__ = [
    "Augmentation",
    "AugmentationParams",
    "AugmentedBatch",
    "BatchLoader",
    "CIFARFSDataModule",
    "ClassImageDataModule",
    "ClassStore",
    "ConfigError",
    "DataError",
    "EpisodeLoader",
    "EpisodeShape",
    "EpisodicDataModule",
    "ExampleBatch",
    "FC100DataModule",
    "InputFormat",
    "ImageFolderDataModule",
    "LitMetaError",
    "MiniImageNetDataModule",
    "OmniglotDataModule",
    "PredictFolderDataModule",
    "SinusoidDataModule",
    "TaskBatch",
    "episode_generator",
    "episode_seed",
]
