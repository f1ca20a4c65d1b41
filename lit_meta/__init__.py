"""lit_meta: meta-learning (few-shot learning) on PyTorch Lightning."""

from datamodules.errors import ConfigError, DataError, LitMetaError
from datamodules.task_batch import TaskBatch
from lit_meta.algorithms import ANIL, MAML, MetaLearner, MetaSGD, Reptile
from lit_meta.backbones import BatchStatNorm, Conv4, ResNet12, SinusoidMLP
from lit_meta.metrics import MeanConfidenceInterval

__version__ = "0.1.0"

__all__ = [
    "ANIL",
    "MAML",
    "BatchStatNorm",
    "ConfigError",
    "Conv4",
    "DataError",
    "LitMetaError",
    "MeanConfidenceInterval",
    "MetaLearner",
    "MetaSGD",
    "Reptile",
    "ResNet12",
    "SinusoidMLP",
    "TaskBatch",
]
