"""Using a trained meta-learner: adapt it to a few labelled examples, classify new ones, write predictions.

From Python, in a few lines (every algorithm, through its own ``task_step``)::

    model = lit_meta.load_model("model.ckpt")                 # the algorithm is read from the checkpoint
    support_x, support_y, classes = read_support_folder("support", model.input_format)
    query_x, files = read_query_folder("query", model.input_format)
    adapted = model.adapt(support_x, support_y, class_names=classes)
    adapted(query_x)             # probabilities [Q, N]
    adapted.predict(query_x)     # class indices [Q]; adapted.predict_names(query_x): class names

From the command line, ``python -m lit_meta predict --ckpt_path model.ckpt --data datamodules.PredictFolderDataModule
--data.support_dir support --data.query_dir query`` does the same and :class:`PredictionWriter` writes the CSV.

Adaptation runs the algorithm's evaluation path (``task_step(..., training=False)``) on one task whose query targets
are placeholders: only the predictions are used. It is not transductive unless asked (``normalization=
"transductive"``): the prediction for an image is the same whatever other images are in the call.
"""

from __future__ import annotations

import csv
import importlib
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from datamodules.errors import ConfigError, DataError
from datamodules.predict_folder import InputFormat, read_query_folder, read_support_folder
from datamodules.task_batch import TaskBatch
from lit_meta.normalization import check_protocol

if TYPE_CHECKING:  # the base class imports this module
    from lit_meta.algorithms.base import MetaLearner

__all__ = [
    "AdaptedModel",
    "PredictionWriter",
    "checkpoint_algorithm",
    "load_model",
    "predict_batch",
    "read_query_folder",
    "read_support_folder",
]

#: Where a checkpoint keeps what lit_meta adds to it (see ``MetaLearner.on_save_checkpoint``).
CHECKPOINT_KEY = "lit_meta"


# ------------------------------------------------------------------------------------------------- checkpoints
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's dict on the CPU (weights only), with a one-line error for a missing or unreadable file."""
    from lightning.fabric.utilities.cloud_io import _load as pl_load

    if isinstance(path, (str, os.PathLike)) and "://" not in str(path) and not Path(path).is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        checkpoint = pl_load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling/zip failure means the same to the user
        raise DataError(f"cannot read checkpoint {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); is it a Lightning checkpoint?") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DataError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def checkpoint_algorithm(checkpoint: Mapping[str, Any]) -> str | None:
    """The class path of the algorithm that wrote ``checkpoint`` (``None`` when it does not say)."""
    record = checkpoint.get(CHECKPOINT_KEY) or {}
    hparams = checkpoint.get("hyper_parameters") or {}
    return record.get("algorithm") or hparams.get("_class_path")


def checkpoint_input_format(checkpoint: Mapping[str, Any]) -> InputFormat | None:
    """The input format recorded in ``checkpoint`` (``None`` when it has none, e.g. regression)."""
    record = (checkpoint.get(CHECKPOINT_KEY) or {}).get("input_format")
    return InputFormat.from_dict(record) if record else None


def resolve_algorithm(class_path: str) -> type:
    """The :class:`MetaLearner` subclass named ``class_path`` (``lit_meta.MAML`` or a full module path).

    Only lit_meta's own modules are imported on the checkpoint's word; another module must already be imported (a
    checkpoint must not be able to run arbitrary imports), as Lightning requires too.
    """
    from lit_meta.algorithms.base import MetaLearner

    module_name, _, name = class_path.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None and (module_name == "lit_meta" or module_name.startswith("lit_meta.")):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
    cls = getattr(module, name, None) if module is not None else None
    if not (isinstance(cls, type) and issubclass(cls, MetaLearner)):
        raise ConfigError(
            f"the checkpoint was written by {class_path}, which is not an imported lit_meta algorithm; import the "
            "module that defines it first"
        )
    return cls


RELATIONS = ("subclass", "exact", "related")


def check_algorithm(recorded: str | None, requested: type, where: str = "the checkpoint", relation: str = "subclass") -> type | None:
    """The recorded algorithm's class, after checking it can be loaded as ``requested``.

    Args:
        recorded: the checkpoint's algorithm (:func:`checkpoint_algorithm`); ``None`` skips the check.
        requested: the class asked for.
        where: names the checkpoint in the message.
        relation: what the recorded class must be to ``requested``: ``"subclass"`` (or the class itself:
            ``MetaLearner.load_from_checkpoint`` then builds the recorded class), ``"exact"`` (the CLI builds
            ``requested`` itself, and a subclass or superclass has other parameters, e.g. Meta-SGD's learned rates),
            or ``"related"`` (either a subclass of the other: weights restored into an existing model, where a
            user's own subclass of an algorithm may load that algorithm's checkpoints; Lightning's strict
            ``load_state_dict`` then catches other parameters).

    Raises:
        ConfigError: the checkpoint was written by another algorithm.
    """
    if recorded is None:
        return None
    cls = resolve_algorithm(recorded)
    fits = {
        "subclass": issubclass(cls, requested),
        "exact": cls is requested,
        "related": issubclass(cls, requested) or issubclass(requested, cls),
    }[relation]
    if not fits:
        raise ConfigError(
            f"{where} was written by {cls.__name__}, not {requested.__name__}: load it with "
            f"{cls.__name__}.load_from_checkpoint (or lit_meta.load_model); on the command line leave --model (and a "
            f"config's model) out: it is read from the checkpoint"
        )
    return cls


def load_model(checkpoint_path: str | os.PathLike, map_location: Any = None, **kwargs: Any) -> MetaLearner:
    """Load a checkpoint as the algorithm that wrote it (``MetaLearner.load_from_checkpoint``).

    Args:
        checkpoint_path: a ``.ckpt`` written by Lightning from any lit_meta algorithm.
        map_location: as :func:`torch.load` (e.g. ``"cpu"``).
        **kwargs: hyper-parameters to override (e.g. ``eval_inner_steps=20``).
    """
    from lit_meta.algorithms.base import MetaLearner

    return MetaLearner.load_from_checkpoint(checkpoint_path, map_location=map_location, **kwargs)


# ------------------------------------------------------------------------------------------------- adaptation
def check_steps(model: MetaLearner, steps: int | None) -> None:
    """Raise :class:`ConfigError` unless ``steps`` is ``None`` or a valid inner-step count for ``model``."""
    if steps is None:
        return
    if not hasattr(model, "eval_inner_steps"):
        raise ConfigError(f"{type(model).__name__} has no inner loop: steps does not apply")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"steps must be a non-negative integer, got {steps!r}")


@contextmanager
def inner_steps(model: MetaLearner, steps: int | None) -> Iterator[None]:
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
def normalization_protocol(model: MetaLearner, protocol: str | None) -> Iterator[None]:
    """Temporarily evaluate ``model`` under ``protocol`` (``None``: its :attr:`prediction_protocol`)."""
    previous = model.normalization
    model.normalization = check_protocol(model.prediction_protocol if protocol is None else protocol)
    try:
        yield
    finally:
        model.normalization = previous


def predict_batch(model: MetaLearner, batch: TaskBatch, steps: int | None = None, normalization: str | None = None) -> Tensor:
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
        model: MetaLearner,
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


# ---------------------------------------------------------------------------------------------------- writer
def write_csv_atomically(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV through a temporary file and a rename: an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PredictionWriter(Callback):
    """Writes ``predict`` results of a datamodule that names its query files and classes to CSV.

    One row per query image: ``file`` (relative to the query folder), ``prediction`` (class name), ``probability``
    (of that class), then ``p(<class>)`` for every class. The datamodule supplies ``query_files``, ``class_names``
    and ``output`` (see :class:`~datamodules.predict_folder.PredictFolderDataModule`); with another datamodule the
    writer does nothing. The CLI adds it to ``predict``. (A plain callback rather than Lightning's
    ``BasePredictionWriter``: it needs no per-sample batch indices, which Lightning can only infer from a
    ``DataLoader``.)

    Args:
        output: the CSV path; ``None`` takes the datamodule's ``output``.
    """

    def __init__(self, output: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.output = output
        self._probabilities: list[Tensor] = []

    def on_predict_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._probabilities = []

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(outputs, Mapping) and "probabilities" in outputs:
            self._probabilities.append(outputs["probabilities"].detach().cpu())

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        dm = trainer.datamodule
        files = getattr(dm, "query_files", None)
        names = getattr(dm, "class_names", None)
        output = self.output or getattr(dm, "output", None)
        if not (files and names and output and self._probabilities) or not trainer.is_global_zero:
            return
        # Every task of every batch holds the next query files in order (T tasks of Q_t images each).
        probabilities = torch.cat([p.reshape(-1, p.shape[-1]) for p in self._probabilities])
        if len(probabilities) != len(files):
            raise DataError(f"{len(probabilities)} predictions for {len(files)} query images; the datamodule and the predictions disagree")
        best, index = probabilities.max(dim=-1)
        rows = [
            [file, names[i], f"{p:.6f}", *(f"{q:.6f}" for q in row)]
            for file, i, p, row in zip(files, index.tolist(), best.tolist(), probabilities.tolist())
        ]
        path = Path(output)
        write_csv_atomically(path, ["file", "prediction", "probability", *(f"p({name})" for name in names)], rows)
        rank_zero_info(f"wrote {len(rows)} predictions ({len(names)} classes) to {path}")
