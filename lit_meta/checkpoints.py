"""Reading lit_meta checkpoints: the file itself, the algorithm that wrote it, and whether a class may load it.

This module imports no algorithm: :mod:`lit_meta.algorithms.base` (saving and loading checkpoints),
:mod:`lit_meta.prediction` (``load_model``) and the command line all build on it.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem

from datamodules.errors import ConfigError, DataError
from datamodules.predict_folder import InputFormat

__all__ = [
    "CHECKPOINT_KEY",
    "RELATIONS",
    "check_algorithm",
    "checkpoint_algorithm",
    "checkpoint_input_format",
    "read_checkpoint",
    "resolve_algorithm",
]

#: Where a checkpoint keeps what lit_meta adds to it (see ``MetaLearner.on_save_checkpoint``).
CHECKPOINT_KEY = "lit_meta"

#: The class every algorithm derives from, by name: importing it here would make the base class and this module
#: import each other.
_META_LEARNER = "lit_meta.algorithms.base.MetaLearner"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _load(path: str | os.PathLike) -> Any:
    """``torch.load`` (weights only, on the CPU) of a local file, an ``http(s)`` URL or an fsspec path."""
    text = str(path)
    if text.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(text, map_location="cpu", weights_only=True)
    if "://" in text:
        with get_filesystem(text).open(text, "rb") as file:
            return torch.load(file, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's dict on the CPU (weights only), with a one-line error for a missing or unreadable file.

    Raises:
        DataError: the file is missing, a folder, truncated, not a ``torch.save`` file, or holds no ``state_dict``.
    """
    if isinstance(path, (str, os.PathLike)) and "://" not in str(path):
        if Path(path).is_dir():
            raise DataError(f"checkpoint {path} is a folder; give the .ckpt file inside it")
        if not Path(path).is_file():
            raise DataError(f"checkpoint {path} does not exist")
    try:
        checkpoint = _load(path)
    except Exception as err:  # any unpickling, zip or transfer failure means the same to the user
        raise DataError(
            f"cannot read checkpoint {path} ({_first_line(err)}); is it a complete Lightning checkpoint?"
        ) from None
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


def is_algorithm(cls: Any) -> bool:
    """Whether ``cls`` is :class:`~lit_meta.algorithms.base.MetaLearner` or a subclass of it."""
    return isinstance(cls, type) and any(f"{c.__module__}.{c.__qualname__}" == _META_LEARNER for c in cls.__mro__)


def resolve_algorithm(class_path: str) -> type:
    """The :class:`~lit_meta.algorithms.base.MetaLearner` subclass named ``class_path`` (``lit_meta.MAML`` or a
    full module path).

    Only lit_meta's own modules are imported on the checkpoint's word; another module must already be imported (a
    checkpoint must not be able to run arbitrary imports), as Lightning requires too.

    Raises:
        ConfigError: ``class_path`` names no imported lit_meta algorithm.
    """
    module_name, _, name = class_path.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None and (module_name == "lit_meta" or module_name.startswith("lit_meta.")):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
    cls = getattr(module, name, None) if module is not None else None
    if not is_algorithm(cls):
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
