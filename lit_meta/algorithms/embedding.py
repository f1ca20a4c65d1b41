"""What the embedding-based methods (ProtoNet, MatchingNet, MetaBGD) share on top of :class:`MetaLearner`.

* **The backbone returns embeddings.** It is built without a classifier head (``out_features: null``); a head would be
  a set of parameters that never receives a gradient, which DDP rejects (and which would silently waste memory).
* **How an episode is embedded** (``joint_embedding``). In training the backbones normalise with the statistics of
  the batch they see (:class:`~lit_meta.backbones.BatchStatNorm`; under ``vmap`` that batch is one task). With
  ``joint_embedding=True`` (the default) a task's support and query examples go through the backbone as *one* batch,
  as in Snell et al.'s reference code (``torch.cat([xs, xq])`` before the encoder), so every example of the episode
  is normalised with the same statistics; ``joint_embedding=False`` embeds support and query as two batches. At
  evaluation the ``normalization`` protocol decides (:mod:`lit_meta.normalization`): ``"transductive"`` keeps the
  training passes (the query set's statistics shape the embeddings), ``"running"`` uses the running statistics
  recorded in training (Snell et al. evaluate in ``model.eval()`` mode), ``"support"`` the support set's.
* **The number of ways inside** ``vmap``. ``N`` cannot be read from the labels inside ``vmap`` (``.item()`` is
  data-dependent), so :meth:`task_outputs` reads it once per meta-batch, outside ``vmap``, and :meth:`ways_of`
  returns it to the per-task code.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from datamodules.errors import ConfigError, LitMetaError
from datamodules.task_batch import TaskBatch
from lit_meta.algorithms.base import MetaLearner
from lit_meta.normalization import episode_outputs


def one_hot(labels: Tensor, ways: int, dtype: torch.dtype) -> Tensor:
    """``[n, ways]`` one-hot rows of integer ``labels``; a comparison, so it is safe under ``vmap``."""
    return (labels.unsqueeze(-1) == torch.arange(ways, device=labels.device)).to(dtype)


def class_means(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """``[ways, D]``: the mean embedding of each class (the prototypes of Snell et al.)."""
    onehot = one_hot(labels, ways, embeddings.dtype)
    return onehot.transpose(0, 1) @ embeddings / onehot.sum(0).unsqueeze(-1)


class EmbeddingMetaLearner(MetaLearner):
    """Base class of the algorithms that work on backbone embeddings.

    Args:
        backbone: a network that maps inputs to embeddings (e.g. ``Conv4(out_features=None)``); a backbone with a
            classifier ``head`` is rejected.
        joint_embedding: embed a task's support and query examples as one batch (see the module docstring).
        **kwargs: see :class:`~lit_meta.algorithms.base.MetaLearner` (optimizer, scheduler, vectorize, chunk_size).
    """

    def __init__(self, backbone: nn.Module, joint_embedding: bool = True, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        if getattr(self.backbone, "head", None) is not None:
            raise ConfigError(
                f"{type(self).__name__} needs a backbone that returns embeddings, but this one ends in a classifier "
                "head whose parameters would never be trained: build it with out_features: null"
            )
        self.joint_embedding = joint_embedding
        self._ways: int | None = None

    # ------------------------------------------------------------------------------------------------ episodes
    @contextmanager
    def episode_ways(self, batch: TaskBatch) -> Iterator[int]:
        """Make :meth:`ways_of` return ``batch``'s number of ways while the block runs (also inside ``vmap``)."""
        if not batch.is_classification:
            raise ConfigError(f"{type(self).__name__} is a classification method; this datamodule gives regression tasks")
        previous, self._ways = self._ways, batch.ways
        try:
            yield self._ways
        finally:
            self._ways = previous

    def task_outputs(self, batch: TaskBatch, training: bool) -> tuple[Tensor, Tensor]:
        with self.episode_ways(batch):
            return super().task_outputs(batch, training)

    def ways_of(self, support_y: Tensor) -> int:
        """``N`` of the episode being processed (read once per meta-batch by :meth:`task_outputs`)."""
        if self._ways is not None:
            return self._ways
        try:
            return int(support_y.max().item()) + 1
        except RuntimeError as err:  # inside vmap without task_outputs having set the number of ways
            raise LitMetaError(
                f"{type(self).__name__}.task_step needs the number of ways; call it through task_outputs(batch, ...)"
            ) from err

    def embed(self, x: Tensor) -> Tensor:
        """Backbone embeddings ``[n, D]`` of a batch of inputs."""
        return self.backbone(x).flatten(1)

    def embed_task(self, support_x: Tensor, query_x: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        """Embeddings of one task's support and query examples: in training (and under the transductive protocol)
        jointly or separately (``joint_embedding``); at evaluation as the ``normalization`` protocol says."""
        return episode_outputs(self.embed, support_x, query_x, self.protocol(training), self.joint_embedding, self.vectorize)

    def embedding_dim(self, given: int | None = None) -> int:
        """The backbone's embedding size: ``given``, else its ``embedding_dim`` attribute."""
        dim = given if given is not None else getattr(self.backbone, "embedding_dim", None)
        if not isinstance(dim, int) or dim <= 0:
            raise ConfigError(
                f"{type(self).__name__} needs the backbone's embedding size: the backbone has no embedding_dim "
                "attribute, so pass embedding_dim"
            )
        return dim
