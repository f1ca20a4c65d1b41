r"""Meta-Baseline (Chen, Liu, Xu, Darrell & Wang, "Meta-Baseline: Exploring Simple Meta-Learning for Few-Shot
Learning", ICCV 2021).

A network pre-trained as a classifier over all base classes (:class:`~lit_meta.algorithms.pretrain.Pretrain`,
Chen et al.'s *Classifier-Baseline*) is fine-tuned episodically: every class of a task is represented by the mean
embedding of its support examples, ``w_c = mean_{y_i = c} f(x_i)``, and a query is classified by a softmax over
scaled cosine similarities

    logits_c(x) = tau * cos(f(x), w_c),

with ``tau`` a learned temperature initialised at 10. This is :class:`~lit_meta.algorithms.protonet.ProtoNet` with
the cosine metric and a learnable temperature ``T = 1 / tau`` (ProtoNet divides by ``T``), started from a
pre-trained backbone with ``init_from``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from datamodules.errors import ConfigError
from lit_meta.algorithms.protonet import ProtoNet


class MetaBaseline(ProtoNet):
    """Meta-Baseline: ProtoNet with cosine logits scaled by a learned ``tau`` (initially 10), from a pre-trained backbone.

    Args:
        backbone: an embedding network (``out_features: null``).
        distance: must be ``"cosine"`` (the argument exists so checkpoints and configs read like ProtoNet's).
        temperature: ``1 / tau`` at initialisation: 0.1, i.e. ``tau = 10`` as in the paper.
        learn_temperature: learn ``tau`` (the paper does).
        joint_embedding: embed a task's support and query as one batch (the paper's code does).
        **kwargs: see :class:`~lit_meta.algorithms.base.MetaLearner`; ``init_from`` names the pre-trained checkpoint.
    """

    def __init__(
        self,
        backbone: nn.Module,
        distance: str = "cosine",
        temperature: float | None = 0.1,
        learn_temperature: bool = True,
        joint_embedding: bool = True,
        **kwargs: Any,
    ) -> None:
        if distance != "cosine":
            raise ConfigError(f"MetaBaseline classifies by cosine similarity: distance must be 'cosine', got {distance!r} (use ProtoNet for Euclidean)")
        super().__init__(
            backbone, distance=distance, temperature=temperature, learn_temperature=learn_temperature,
            joint_embedding=joint_embedding, **kwargs,
        )

    @property
    def tau(self) -> float:
        """The current scale ``tau = 1 / T`` of the cosine logits."""
        return 1.0 / self.temperature.value
