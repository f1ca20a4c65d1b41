"""Few-shot prediction on a user's own images: a labelled support folder and an unlabelled query folder.

::

    support/<class>/<image>     K (any number of) labelled examples per class; the folder name is the class name
    query/<image>               the images to classify (subfolders are read too; their path is the file name)

Images of any size and mode (``.png``, ``.jpg``, ...) are converted to what the model was trained on, its
:class:`InputFormat`: channels (``L`` or ``RGB``), size (LANCZOS resize, as the training datamodules do), the
inversion convention (Omniglot is trained with strokes bright on dark: ``255 - pixel`` of its dark-on-white files) and
the value range (``uint8 / 255``, i.e. ``[0, 1]``). Every :class:`~lit_meta.algorithms.base.MetaLearner` records the
format of its training datamodule in its checkpoints (see :func:`input_format_of`), so
``python -m lit_meta predict --ckpt_path model.ckpt --data datamodules.PredictFolderDataModule --data.support_dir
support --data.query_dir query`` needs nothing else.

The whole query set is one task; ``query_batch_size`` splits a large query folder into tasks of that many images
(each with the whole support set). Prediction follows the model's ``prediction_protocol``, which is not transductive
unless asked, so an image's prediction does not depend on the other query images.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from datamodules.base import EpisodicDataModule
from datamodules.errors import ConfigError, DataError, LitMetaError
from datamodules.files import IMAGE_EXTENSIONS, FileTree, decode_images
from datamodules.task_batch import TaskBatch


@dataclass(frozen=True)
class InputFormat:
    """What a model's inputs look like: ``float [C, H, W]`` made from ``uint8`` pixels.

    Attributes:
        channels: 1 (grayscale, PIL mode ``L``) or 3 (``RGB``).
        height, width: the image size the backbone was trained on.
        invert: pixels were stored as ``255 - pixel`` (Omniglot's strokes-bright-on-dark convention).
        value_range: ``uint8`` 0..255 maps linearly onto ``[low, high]`` (``[0, 1]``: the datamodules divide by 255).
    """

    channels: int
    height: int
    width: int
    invert: bool = False
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"input format: channels must be 1 or 3, got {self.channels!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"input format: {name} must be a positive integer, got {value!r}")

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.height, self.width

    def describe(self) -> str:
        """E.g. ``"1x28x28 (inverted)"``, for messages."""
        return f"{self.channels}x{self.height}x{self.width}" + (" (inverted)" if self.invert else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (a checkpoint must load with ``torch.load(weights_only=True)``)."""
        record = asdict(self)
        record["value_range"] = [float(v) for v in self.value_range]
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> InputFormat:
        """The format of :meth:`to_dict` (unknown keys, e.g. from a newer version, are ignored)."""
        try:
            low, high = record.get("value_range", (0.0, 1.0))
            return cls(
                channels=int(record["channels"]),
                height=int(record["height"]),
                width=int(record["width"]),
                invert=bool(record.get("invert", False)),
                value_range=(float(low), float(high)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"unreadable input format record {dict(record)!r} ({err})") from None

    def convert(self, images: Tensor) -> Tensor:
        """``uint8 [..., C, H, W]`` pixels (already inverted where the format says so) as model inputs."""
        low, high = self.value_range
        out = images.float().div_(255.0)
        return out if (low, high) == (0.0, 1.0) else out.mul_(high - low).add_(low)


def input_format_of(datamodule: Any, split: str = "train") -> InputFormat | None:
    """The input format of a training datamodule, or ``None`` when it does not give images.

    A datamodule may say it itself with an ``input_format()`` method returning an :class:`InputFormat` (or its
    dict). Otherwise an image datamodule (one with ``store(split)``, see
    :class:`~datamodules.images.ClassImageDataModule`) is described by its store's image shape and its ``invert``
    attribute; the value range is ``[0, 1]``, what :meth:`EpisodicDataModule.prepare_batch` makes of ``uint8``.
    """
    describe = getattr(datamodule, "input_format", None)
    if callable(describe):
        described = describe()
        if described is None or isinstance(described, InputFormat):
            return described
        return InputFormat.from_dict(described)
    store = getattr(datamodule, "store", None)
    if not callable(store):
        return None
    try:
        channels, height, width = store(split).image_shape
    except (LitMetaError, KeyError, AttributeError, NotImplementedError):
        return None
    return InputFormat(int(channels), int(height), int(width), invert=bool(getattr(datamodule, "invert", False)))


# ------------------------------------------------------------------------------------------------------ reading
def _folder(path: str | os.PathLike, role: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(f"the {role} folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"the {role} folder {folder} is not a folder")
    return folder


def _decode(tree: FileTree, paths: list[str], fmt: InputFormat) -> Tensor:
    # The one decoder of the training datamodules (PIL, L/RGB, LANCZOS), so predictions see what training saw.
    return decode_images(tree, paths, fmt.image_size, channels=fmt.channels, invert=fmt.invert)


def list_support(support_dir: str | os.PathLike) -> dict[str, list[str]]:
    """``{class name: [image paths relative to support_dir]}``, classes sorted by name.

    Raises:
        DataError: the folder is missing, holds no class folder, holds images outside class folders, or a class
            folder holds no image.
    """
    folder = _folder(support_dir, "support")
    tree = FileTree(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))
    loose = [f for f in tree.images() if "/" not in f]
    if loose:
        raise DataError(
            f"{folder / loose[0]} is not in a class folder; put each support image in {folder}/<class name>/"
        )
    if not names:
        raise DataError(f"the support folder {folder} has no class folders; put the images of each class in {folder}/<class name>/")
    classes: dict[str, list[str]] = {name: tree.images(name) for name in names}
    for name, files in classes.items():
        if not files:
            raise DataError(
                f"class '{name}' ({folder / name}) has no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...); add some or remove the folder"
            )
    if len(classes) < 2:
        raise DataError(f"the support folder {folder} has one class ('{names[0]}'); few-shot classification needs at least two")
    return classes


def list_query(query_dir: str | os.PathLike) -> list[str]:
    """Sorted image paths relative to ``query_dir`` (subfolders included)."""
    folder = _folder(query_dir, "query")
    files = FileTree(folder).images()
    if not files:
        raise DataError(f"the query folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
    return files


def read_support_folder(support_dir: str | os.PathLike, fmt: InputFormat) -> tuple[Tensor, Tensor, list[str]]:
    """A support folder as ``(images float [n, C, H, W], labels long [n], class names)``, in ``fmt``.

    Labels index the class names (sorted folder names); images are ordered by class.
    """
    classes = list_support(support_dir)
    tree = FileTree(Path(support_dir).expanduser())
    paths = [p for files in classes.values() for p in files]
    labels = torch.cat([torch.full((len(files),), i, dtype=torch.long) for i, files in enumerate(classes.values())])
    return fmt.convert(_decode(tree, paths, fmt)), labels, list(classes)


def read_query_folder(query_dir: str | os.PathLike, fmt: InputFormat) -> tuple[Tensor, list[str]]:
    """A query folder as ``(images float [m, C, H, W], file names relative to the folder)``, in ``fmt``."""
    files = list_query(query_dir)
    tree = FileTree(Path(query_dir).expanduser())
    return fmt.convert(_decode(tree, files, fmt)), files


# ---------------------------------------------------------------------------------------------------- datamodule
class _Batches:
    """A sized iterable of ready-made batches (a list would be read by Lightning as several dataloaders)."""

    def __init__(self, batches: list[TaskBatch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[TaskBatch]:
        return iter(self.batches)


class PredictFolderDataModule(EpisodicDataModule):
    """One prediction task (or a few, see ``query_batch_size``) from a support folder and a query folder.

    Use with ``python -m lit_meta predict --ckpt_path model.ckpt --data datamodules.PredictFolderDataModule
    --data.support_dir support --data.query_dir query``: the CLI's prediction writer
    (:class:`~lit_meta.prediction.PredictionWriter`) then writes ``output``, one row per query image with the
    predicted class name and its probability. Batches hold ``uint8`` images, turned into model inputs after they
    reached the device, as in training.

    The input format comes from the model (its checkpoint records its training datamodule's); ``image_size``,
    ``channels`` and ``invert`` are for checkpoints that do not record one (they must agree with it when it does,
    except ``invert``, which describes the files: pass it when your images use the other convention).

    Args:
        support_dir: ``<class>/<image>`` folders: the labelled examples (any number per class, at least two classes).
        query_dir: the images to classify.
        output: the CSV the prediction writer writes.
        image_size: height and width of the model's inputs (only needed when the checkpoint does not record it).
        channels: 1 or 3 (idem).
        invert: store ``255 - pixel``; ``None``: as the model was trained.
        query_batch_size: classify the query images in tasks of at most this many (``None``: all at once, as
            evaluated in training; see the module docstring).
    """

    def __init__(
        self,
        support_dir: str | os.PathLike,
        query_dir: str | os.PathLike,
        output: str | os.PathLike = "predictions.csv",
        image_size: int | None = None,
        channels: int | None = None,
        invert: bool | None = None,
        query_batch_size: int | None = None,
    ) -> None:
        # The episode settings of the base class do not apply: the folders define the one task.
        super().__init__(ways=1, shots=1, queries=1, meta_batch_size=1, eval_meta_batch_size=1)
        if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0):
            raise ConfigError(f"PredictFolderDataModule: image_size must be a positive integer, got {image_size!r}")
        if channels is not None and channels not in (1, 3):
            raise ConfigError(f"PredictFolderDataModule: channels must be 1 or 3, got {channels!r}")
        if query_batch_size is not None and (not isinstance(query_batch_size, int) or query_batch_size <= 0):
            raise ConfigError(f"PredictFolderDataModule: query_batch_size must be a positive integer or null, got {query_batch_size!r}")
        self.support_dir = Path(support_dir).expanduser()
        self.query_dir = Path(query_dir).expanduser()
        self.output = Path(output).expanduser()
        self.image_size = image_size
        self.channels = channels
        self.invert = invert
        self.query_batch_size = query_batch_size
        self.class_names: list[str] = []
        self.query_files: list[str] = []
        self.format: InputFormat | None = None
        self._classes: dict[str, list[str]] | None = None

    # ---------------------------------------------------------------------------------------------- the format
    def resolve_format(self, recorded: InputFormat | Mapping[str, Any] | None, backbone: Mapping[str, Any] | None = None) -> InputFormat:
        """The input format to read the folders in.

        Args:
            recorded: the model's recorded format (``None`` when its checkpoint has none).
            backbone: the model's backbone record ``{"class_path", "init_args"}``, a fallback for ``channels``
                (``in_channels``) and ``image_size`` when nothing is recorded or given.

        Raises:
            ConfigError: ``image_size``/``channels`` disagree with the recorded format, or nothing says what they are.
        """
        if isinstance(recorded, Mapping):
            recorded = InputFormat.from_dict(recorded)
        if recorded is not None:
            wrong = []
            if self.image_size is not None and (self.image_size, self.image_size) != recorded.image_size:
                wrong.append(f"image_size={self.image_size}")
            if self.channels is not None and self.channels != recorded.channels:
                wrong.append(f"channels={self.channels}")
            if wrong:
                raise ConfigError(
                    f"the checkpoint's model was trained on {recorded.describe()} images, not {', '.join(wrong)}: leave "
                    "image_size/channels out (images of any size and mode are converted), or use a checkpoint trained "
                    "at that size"
                )
            invert = recorded.invert if self.invert is None else bool(self.invert)
            return InputFormat(recorded.channels, recorded.height, recorded.width, invert, recorded.value_range)
        init_args = dict((backbone or {}).get("init_args") or {})
        channels = self.channels if self.channels is not None else init_args.get("in_channels")
        size = self.image_size if self.image_size is not None else init_args.get("image_size")
        if channels is None or size is None:
            raise ConfigError(
                "the checkpoint does not record its input format and its backbone does not say it: pass "
                "--data.image_size and --data.channels (and --data.invert if training inverted the images)"
            )
        if self.image_size is None or self.channels is None:
            warnings.warn(
                f"the checkpoint does not record its input format: reading images as {channels}x{size}x{size} from the "
                f"backbone's arguments{'' if self.invert is not None else ', not inverted'}",
                stacklevel=2,
            )
        return InputFormat(int(channels), int(size), int(size), bool(self.invert))

    def _model_format(self) -> InputFormat:
        model = getattr(getattr(self, "trainer", None), "lightning_module", None)
        recorded = getattr(model, "input_format", None)
        hparams = getattr(model, "hparams", None) or {}
        return self.resolve_format(recorded, hparams.get("backbone"))

    # ------------------------------------------------------------------------------------------------ Lightning
    def setup(self, stage: str | None = None) -> None:
        # Listing is cheap and fails early on bad folders; decoding waits for the model's input format, which a
        # checkpoint given to ``trainer.predict(ckpt_path=...)`` only restores after setup.
        self._classes = list_support(self.support_dir)
        self.class_names = list(self._classes)
        self.query_files = list_query(self.query_dir)

    def predict_dataloader(self) -> _Batches:
        if self._classes is None:
            self.setup("predict")
        self.format = fmt = self._model_format()
        paths = [p for files in self._classes.values() for p in files]
        support = _decode(FileTree(self.support_dir), paths, fmt)
        labels = torch.cat([torch.full((len(files),), i, dtype=torch.long) for i, files in enumerate(self._classes.values())])
        query = _decode(FileTree(self.query_dir), self.query_files, fmt)
        size = self.query_batch_size or len(query)
        batches = []
        for start in range(0, len(query), size):
            part = query[start : start + size]
            # Query labels are unknown; the algorithms' losses need some: zeros (only the predictions are used).
            batches.append(TaskBatch(support[None], labels[None], part[None], torch.zeros(1, len(part), dtype=torch.long)))
        return _Batches(batches)

    def prepare_batch(self, batch: TaskBatch) -> TaskBatch:
        fmt = self.format
        if fmt is None or batch.support_x.dtype != torch.uint8:
            return super().prepare_batch(batch)
        return TaskBatch(fmt.convert(batch.support_x), batch.support_y, fmt.convert(batch.query_x), batch.query_y)

    # The training/evaluation loaders do not apply.
    def train_dataloader(self) -> Any:
        raise ConfigError("PredictFolderDataModule is for `predict` only; train with a dataset's datamodule")

    val_dataloader = test_dataloader = train_dataloader
