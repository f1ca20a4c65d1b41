"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): few-shot class splits of CIFAR-100.

Both read CIFAR-100 in torchvision's python format, ``root/cifar-100-python/{train,test,meta}`` (pickles of
``data [N, 3072]``, ``fine_labels``, ``coarse_labels`` and the label names), and pool its train and test images:
600 per class. ``download=True`` fetches it with ``torchvision.datasets.CIFAR100``. Classes are named
``<superclass>/<class>`` with CIFAR-100's names; the splits are torchmeta's JSON files shipped in
``datamodules/resources/splits/cifar100``.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.errors import ConfigError, DataError
from datamodules.files import fingerprint, resize_arrays
from datamodules.images import ClassImageDataModule
from datamodules.store import ClassStore

SPLITS_DIR = Path(__file__).parent / "resources" / "splits" / "cifar100"


def _field(entry: dict, key: str) -> Any:
    """A field of a CIFAR pickle, whose keys are ``str`` or ``bytes`` depending on who wrote it."""
    return entry[key] if key in entry else entry[key.encode()]


class _CIFAR100Split(ClassImageDataModule):
    """Episodes from a class split of CIFAR-100 (the subclass names the classes of each split).

    Args:
        root: the folder holding ``cifar-100-python/`` (or that folder itself).
        splits: a folder with ``train.json``, ``val.json`` and ``test.json`` in the shipped format, to use another
            split; ``None`` is the benchmark's.
        image_size: side of the images (32 is CIFAR's; other sizes are resized with LANCZOS).
        download: fetch CIFAR-100 into ``root`` with torchvision when it is missing.
        cache_dir, device, **kwargs: see :class:`~datamodules.images.ClassImageDataModule`.
    """

    #: The shipped split folder of the benchmark.
    default_splits: Path

    def __init__(
        self,
        root: str | os.PathLike,
        splits: str | os.PathLike | None = None,
        image_size: int = 32,
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, image_size, download=download, cache_dir=cache_dir, device=device, **kwargs)
        self.splits = Path(splits) if splits is not None else self.default_splits
        self._all: ClassStore | None = None

    def _folder(self) -> Path | None:
        for folder in (self.root / "cifar-100-python", self.root):
            if all((folder / name).is_file() for name in ("train", "test", "meta")):
                return folder
        return None

    def prepare_files(self) -> None:
        if self._folder() is not None:
            return
        if self.download:
            from torchvision.datasets import CIFAR100  # only here: torchvision is slow to import

            try:
                CIFAR100(str(self.root), train=True, download=True)
            except Exception as error:  # network errors come in many types
                raise DataError(
                    f"{type(self).__name__}: cannot download CIFAR-100 into {self.root} ({error}); put "
                    "cifar-100-python/ (from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) there by hand"
                ) from None
            return
        raise DataError(
            f"{type(self).__name__}: no cifar-100-python/{{train,test,meta}} in {self.root}; pass download=True, or "
            "extract https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz there"
        )

    def all_classes(self) -> ClassStore:
        """All 100 classes, train and test images pooled, named ``<superclass>/<class>``."""
        if self._all is None:
            folder = self._folder()
            sources = [fingerprint(folder / name) for name in ("train", "test", "meta")]
            self._all = self.cached("cifar100-all", folder, sources, lambda: self._decode(folder))
        return self._all

    def _decode(self, folder: Path) -> ClassStore:
        parts = {}
        for name in ("meta", "train", "test"):
            try:
                with open(folder / name, "rb") as file:
                    parts[name] = pickle.load(file, encoding="latin1")
            except Exception as error:  # any unpickling failure means the same thing to the user
                raise DataError(f"cannot read {folder / name} ({type(error).__name__}: {error}); get CIFAR-100 again") from None
        fine_names = list(_field(parts["meta"], "fine_label_names"))
        coarse_names = list(_field(parts["meta"], "coarse_label_names"))
        data = np.concatenate([np.asarray(_field(parts[s], "data"), dtype=np.uint8) for s in ("train", "test")])
        fine = np.concatenate([np.asarray(_field(parts[s], "fine_labels")) for s in ("train", "test")])
        coarse = np.concatenate([np.asarray(_field(parts[s], "coarse_labels")) for s in ("train", "test")])
        order = np.argsort(fine, kind="stable")  # by class, train images before test images
        classes = np.unique(fine)
        superclass = {c: coarse_names[int(coarse[fine == c][0])] for c in classes}
        images = data[order].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are R, G, B planes of 32x32
        names = [f"{superclass[c]}/{fine_names[c]}" for c in classes]
        return ClassStore(resize_arrays(images, self.image_size), np.bincount(fine)[classes].tolist(), names)

    def split_entries(self, split: str) -> list:
        """The entries of ``<splits>/<split>.json``."""
        path = self.splits / f"{split}.json"
        if not path.is_file():
            raise ConfigError(f"{type(self).__name__}: split file {path} does not exist; splits must hold train/val/test.json")
        return json.loads(path.read_text())

    def class_names(self, split: str) -> list[str]:
        """The names (``<superclass>/<class>``) of the classes of ``split``."""
        raise NotImplementedError

    def load_split(self, split: str) -> ClassStore:
        names = self.class_names(split)
        missing = sorted(set(names) - set(self.all_classes().names))
        if missing:
            raise ConfigError(
                f"{type(self).__name__}: {len(missing)} classes of the {split} split are not in CIFAR-100 "
                f"(e.g. {missing[0]}); fix the split file in {self.splits}"
            )
        return self.all_classes().select(names)


class CIFARFSDataModule(_CIFAR100Split):
    """CIFAR-FS: 64 / 16 / 20 classes of CIFAR-100, 600 images each (see :class:`_CIFAR100Split` for arguments)."""

    default_splits = SPLITS_DIR / "cifar-fs"

    def class_names(self, split: str) -> list[str]:
        return [f"{superclass}/{name}" for superclass, name in self.split_entries(split)]


class FC100DataModule(_CIFAR100Split):
    """FC100: 12 / 4 / 4 superclasses (60 / 20 / 20 classes) of CIFAR-100, so that test classes are far from the
    training ones (see :class:`_CIFAR100Split` for arguments)."""

    default_splits = SPLITS_DIR / "fc100"

    def class_names(self, split: str) -> list[str]:
        superclasses = self.split_entries(split)
        known = {name.split("/")[0] for name in self.all_classes().names}
        unknown = [s for s in superclasses if s not in known]
        if unknown:
            raise ConfigError(f"FC100DataModule: superclass {unknown[0]!r} of the {split} split is not in CIFAR-100; fix {self.splits}")
        return [name for name in self.all_classes().names if name.split("/")[0] in superclasses]
