"""lit_meta: meta-learning (few-shot learning) on PyTorch Lightning."""

from datamodules.errors import ConfigError, DataError, LitMetaError
from datamodules.task_batch import TaskBatch
from lit_meta.allocator import tune_cpu_allocator
from lit_meta.algorithms import (
    ANIL,
    IMAML,
    MAML,
    MatchingNet,
    MetaBaseline,
    MetaBGD,
    MetaLearner,
    MetaSGD,
    Pretrain,
    ProtoNet,
    Reptile,
)
from lit_meta.backbones import BatchStatNorm, Conv4, DropBlock, ResNet12, SinusoidMLP
from lit_meta.metrics import MeanConfidenceInterval
from lit_meta.prediction import AdaptedModel, PredictionWriter, load_model
from lit_meta.timm_backbone import TimmBackbone

__version__ = "0.1.0"

__all__ = [
    "AdaptedModel",
    "ANIL",
    "IMAML",
    "MAML",
    "MatchingNet",
    "MetaBaseline",
    "MetaBGD",
    "BatchStatNorm",
    "ConfigError",
    "Conv4",
    "DataError",
    "DropBlock",
    "LitMetaError",
    "MeanConfidenceInterval",
    "MetaLearner",
    "MetaSGD",
    "PredictionWriter",
    "Pretrain",
    "ProtoNet",
    "Reptile",
    "ResNet12",
    "SinusoidMLP",
    "TaskBatch",
    "TimmBackbone",
    "load_model",
    "tune_cpu_allocator",
]
