"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

Every class ``c`` of a task is represented by the mean embedding of its support examples, its *prototype*

    p_c = (1 / |S_c|) * sum_{(x, y) in S, y = c} f(x),

and a query ``x`` is classified by a softmax over negative squared Euclidean distances to the prototypes

    logits_c(x) = -||f(x) - p_c||^2 / T.

The embedding ``f`` (the backbone) is trained on the query cross-entropy; there is no inner loop. The cosine variant
uses ``cos(f(x), p_c) / T`` instead, with a fixed or learnable temperature ``T`` (a cosine lies in ``[-1, 1]``, so a
small temperature, e.g. 0.1, is needed for confident predictions; Euclidean logits need none: ``T = 1`` is the paper).

Training episodes may be wider than test episodes (Snell et al. train Omniglot with 60 ways, mini-ImageNet with 30
ways for 1-shot and 20 for 5-shot, and match the training shots to the test shots): set the datamodule's
``train_ways``/``train_shots``/``train_queries``; the algorithm reads the ways of every meta-batch.

How support and query pass through the batch-statistics backbone: see :mod:`lit_meta.algorithms.embedding`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.errors import ConfigError
from datamodules.task_batch import TaskBatch
from lit_meta.algorithms.base import task_loss
from lit_meta.algorithms.embedding import EmbeddingMetaLearner, class_means

DISTANCES = ("euclidean", "cosine")


class Temperature(nn.Module):
    """A positive temperature ``T``: fixed (a plain number) or learnable (a parameter, stored as ``log T``).

    A fixed temperature is no parameter at all, so that no parameter exists that never gets a gradient (DDP would
    need ``find_unused_parameters`` for it), and dividing by it is exact in any precision.
    """

    def __init__(self, value: float, learnable: bool) -> None:
        super().__init__()
        if not value > 0:
            raise ConfigError(f"temperature must be positive, got {value!r}")
        self.fixed: float | None = None if learnable else float(value)
        self.log_value = nn.Parameter(torch.tensor(math.log(value))) if learnable else None

    def forward(self, logits: Tensor) -> Tensor:
        """``logits / T``."""
        if self.log_value is None:
            return logits / self.fixed
        return logits * torch.exp(-self.log_value)

    @property
    def value(self) -> float:
        return self.fixed if self.log_value is None else float(self.log_value.detach().exp())


def squared_distances(queries: Tensor, prototypes: Tensor) -> Tensor:
    """``[Q, N]`` squared Euclidean distances.

    Written as the difference (as Snell et al.'s code), not as ``|q|^2 - 2 q.p + |p|^2``: exact, never negative, and
    its ``Q x N x D`` intermediate is small at few-shot sizes.
    """
    return (queries.unsqueeze(-2) - prototypes.unsqueeze(-3)).pow(2).sum(-1)


def cosine_similarities(queries: Tensor, prototypes: Tensor, eps: float = 1e-8) -> Tensor:
    """``[Q, N]`` cosine similarities."""
    return F.normalize(queries, dim=-1, eps=eps) @ F.normalize(prototypes, dim=-1, eps=eps).transpose(-1, -2)


class ProtoNet(EmbeddingMetaLearner):
    """Prototypical Networks.

    Args:
        backbone: an embedding network (``out_features: null``), e.g. ``Conv4(pool="max", out_features=None)``
            (64-d embeddings for 28x28 Omniglot).
        distance: ``"euclidean"`` (negative squared distance, the paper) or ``"cosine"``.
        temperature: logits are divided by it; ``None`` means 1.0 for Euclidean and 0.1 for cosine.
        learn_temperature: make the temperature a trained parameter (initialised at ``temperature``).
        joint_embedding: embed support and query as one batch (see :mod:`lit_meta.algorithms.embedding`).
        **kwargs: see :class:`~lit_meta.algorithms.base.MetaLearner` (optimizer, lr_scheduler, vectorize, chunk_size).
    """

    def __init__(
        self,
        backbone: nn.Module,
        distance: str = "euclidean",
        temperature: float | None = None,
        learn_temperature: bool = False,
        joint_embedding: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, joint_embedding=joint_embedding, **kwargs)
        if distance not in DISTANCES:
            raise ConfigError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance
        if temperature is None:
            temperature = 1.0 if distance == "euclidean" else 0.1
        self.temperature = Temperature(temperature, learn_temperature)

    def logits(self, query_embeddings: Tensor, prototypes: Tensor) -> Tensor:
        """``[Q, N]`` logits of queries against prototypes."""
        if self.distance == "euclidean":
            similarity = -squared_distances(query_embeddings, prototypes)
        else:
            similarity = cosine_similarities(query_embeddings, prototypes)
        return self.temperature(similarity)

    def task_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        support_z, query_z = self.embed_task(support_x, query_x, training)
        prototypes = class_means(support_z, support_y, self.ways_of(support_y))
        logits = self.logits(query_z, prototypes)
        return task_loss(logits, query_y), logits

    def task_metrics(self, batch: TaskBatch) -> dict[str, Tensor]:
        # Nothing adapts with gradients: evaluation needs no graph.
        with torch.no_grad():
            return super().task_metrics(batch)
