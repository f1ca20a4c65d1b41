"""A meta-learner adapted to one support set, and the evaluation pass behind it (:func:`predict_batch`).

The functions here take any :class:`~lit_meta.algorithms.base.MetaLearner` but do not import it: the base class builds
:meth:`~lit_meta.algorithms.base.MetaLearner.adapt` and ``predict_step`` on them, so they sit below it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor

from datamodules.errors import ConfigError
from datamodules.predict_folder import InputFormat
from datamodules.task_batch import TaskBatch
from lit_meta.normalization import check_protocol

__all__ = ["AdaptedModel", "check_steps", "inner_steps", "normalization_protocol", "predict_batch"]


def check_steps(model: LightningModule, steps: int | None) -> None:
    """Raise :class:`ConfigError` unless ``steps`` is ``None`` or a valid inner-step count for ``model``."""
    if steps is None:
        return
    if not hasattr(model, "eval_inner_steps"):
        raise ConfigError(f"{type(model).__name__} has no inner loop: steps does not apply")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"steps must be a non-negative integer, got {steps!r}")


@contextmanager
def inner_steps(model: LightningModule, steps: int | None) -> Iterator[None]:
    """Temporarily evaluate with ``steps`` inner steps (optimization-based algorithms only)."""
    check_steps(model, steps)
    if steps is None:
        yield
        return
    previous = model.eval_inner_steps
    model.eval_inner_steps = steps
    try:
        yield
    finally:
        model.eval_inner_steps = previous


@contextmanager
def normalization_protocol(model: LightningModule, protocol: str | None) -> Iterator[None]:
    """Temporarily evaluate ``model`` under ``protocol`` (``None``: its :attr:`prediction_protocol`)."""
    previous = model.normalization
    model.normalization = check_protocol(model.prediction_protocol if protocol is None else protocol)
    try:
        yield
    finally:
        model.normalization = previous


def predict_batch(model: LightningModule, batch: TaskBatch, steps: int | None = None, normalization: str | None = None) -> Tensor:
    """The algorithm's query predictions ``[T, Q, ...]`` for every task of ``batch`` (no graph kept).

    The query targets of ``batch`` are only placeholders for the losses that ``task_step`` also computes.
    ``normalization`` is the protocol (default: the model's :attr:`prediction_protocol`).
    """
    model._require_grad_mode()
    was_training = model.training
    model.eval()
    try:
        # Optimization-based methods adapt with gradients even at prediction time (Lightning's predict loop runs
        # under no_grad).
        with inner_steps(model, steps), normalization_protocol(model, normalization), torch.enable_grad():
            _, predictions = model.task_outputs(batch, training=False)
    finally:
        model.train(was_training)
    return predictions.detach()


def _as_inputs(x: Tensor | Any, fmt: InputFormat | None, device: torch.device) -> Tensor:
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        # Raw pixels: the same conversion the datamodules apply (uint8 / 255, or the recorded range).
        x = fmt.convert(x) if fmt is not None else x.float().div(255.0)
    if fmt is not None and x.dim() in (3, 4) and tuple(x.shape[-3:]) != (fmt.channels, fmt.height, fmt.width):
        raise ConfigError(
            f"the model takes {fmt.channels}x{fmt.height}x{fmt.width} images, got {'x'.join(map(str, x.shape[-3:]))}: read "
            "image files with lit_meta.prediction.read_support_folder/read_query_folder(folder, model.input_format)"
        )
    return x.to(device)


class AdaptedModel:
    """A meta-learner adapted to one support set; classifies (or regresses) new inputs.

    Create with :meth:`MetaLearner.adapt <lit_meta.algorithms.base.MetaLearner.adapt>`. Every call re-runs the
    algorithm's evaluation on ``(support, query)``, so it is deterministic.

    Args:
        model: the trained algorithm.
        support_x: ``[n, ...]`` support inputs (float, or ``uint8`` pixels, converted as in training).
        support_y: ``[n]`` class labels ``0..N-1`` (every label present), or float regression targets.
        class_names: optional names of the ``N`` classes.
        steps: inner steps for optimization-based methods (default: the model's ``eval_inner_steps``).
        normalization: the normalization protocol (default: the model's ``prediction_protocol``, never transductive
            unless the model asks for it).
    """

    def __init__(
        self,
        model: LightningModule,
        support_x: Tensor,
        support_y: Tensor,
        class_names: Sequence[str] | None = None,
        steps: int | None = None,
        normalization: str | None = None,
    ) -> None:
        check_steps(model, steps)
        self.normalization = None if normalization is None else check_protocol(normalization)
        fmt = getattr(model, "input_format", None)
        self.model = model
        self.support_x = _as_inputs(support_x, fmt, model.device)
        self.support_y = torch.as_tensor(support_y).to(model.device)
        self.steps = steps
        if len(self.support_x) != len(self.support_y):
            raise ConfigError(f"support_x has {len(self.support_x)} examples but support_y has {len(self.support_y)} labels")
        if self.is_classification:
            if self.support_y.dim() != 1:
                raise ConfigError(f"support_y must be a vector of class labels, got shape {list(self.support_y.shape)}")
            present = torch.unique(self.support_y).tolist()
            self.num_classes = int(max(present)) + 1
            if present != list(range(self.num_classes)):
                raise ConfigError(f"support labels must be 0..N-1 with every class present, got {present}")
            if class_names is not None and len(class_names) != self.num_classes:
                raise ConfigError(f"{len(class_names)} class names for {self.num_classes} classes")
        else:
            self.num_classes = 0
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def is_classification(self) -> bool:
        return not torch.is_floating_point(self.support_y)

    def outputs(self, query_x: Tensor) -> Tensor:
        """The algorithm's raw query predictions (logits, log-probabilities or regression outputs)."""
        fmt = getattr(self.model, "input_format", None)
        query_x = _as_inputs(query_x, fmt, self.model.device)
        if query_x.dim() == self.support_x.dim() - 1:  # one example
            query_x = query_x.unsqueeze(0)
        if self.is_classification:
            placeholder = torch.zeros(len(query_x), dtype=torch.long, device=query_x.device)
        else:
            placeholder = torch.zeros(len(query_x), *self.support_y.shape[1:], dtype=self.support_y.dtype, device=query_x.device)
        batch = TaskBatch(self.support_x[None], self.support_y[None], query_x[None], placeholder[None])
        return predict_batch(self.model, batch, self.steps, self.normalization)[0]

    def __call__(self, query_x: Tensor) -> Tensor:
        """Class probabilities ``[Q, N]`` (regression: the predicted targets)."""
        out = self.outputs(query_x)
        # softmax of log-probabilities (MatchingNet) is the probabilities too.
        return F.softmax(out, dim=-1) if self.is_classification else out

    def predict(self, query_x: Tensor) -> Tensor:
        """Predicted class indices ``[Q]`` (regression: the predicted targets)."""
        out = self.outputs(query_x)
        return out.argmax(dim=-1) if self.is_classification else out

    def predict_names(self, query_x: Tensor) -> list[str]:
        """Predicted class names (needs ``class_names``)."""
        if self.class_names is None:
            raise ConfigError("predict_names needs class_names: pass them to model.adapt(..., class_names=...)")
        return [self.class_names[i] for i in self.predict(query_x).tolist()]
