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
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from datamodules.errors import DataError
from datamodules.predict_folder import read_query_folder, read_support_folder
from lit_meta.adapted import AdaptedModel, predict_batch
from lit_meta.algorithms.base import MetaLearner
# Re-exported: these lived here before lit_meta.checkpoints, and user code imports them from here.
from lit_meta.checkpoints import CHECKPOINT_KEY, check_algorithm, checkpoint_algorithm, checkpoint_input_format, read_checkpoint  # noqa: F401

__all__ = [
    "AdaptedModel",
    "PredictionWriter",
    "checkpoint_algorithm",
    "load_model",
    "predict_batch",
    "read_checkpoint",
    "read_query_folder",
    "read_support_folder",
]


def load_model(checkpoint_path: str | os.PathLike, map_location: Any = None, **kwargs: Any) -> MetaLearner:
    """Load a checkpoint as the algorithm that wrote it (``MetaLearner.load_from_checkpoint``).

    Args:
        checkpoint_path: a ``.ckpt`` written by Lightning from any lit_meta algorithm.
        map_location: as :func:`torch.load` (e.g. ``"cpu"``).
        **kwargs: hyper-parameters to override (e.g. ``eval_inner_steps=20``).
    """
    return MetaLearner.load_from_checkpoint(checkpoint_path, map_location=map_location, **kwargs)


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
