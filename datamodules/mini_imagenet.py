"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) split: 64 / 16 / 20 classes x 600 images.

Any of the three layouts it is distributed in is read from ``root``, per split (first found wins):

1. ``mini-imagenet-cache-{train,val,test}.pkl``: pickled dicts with ``image_data`` (``uint8 [N, 84, 84, 3]``) and
   ``class_dict`` (``{wnid: [indices into image_data]}``);
2. ``{train,val,test}.csv`` (``filename,label`` with a header) and an ``images/`` folder (or ``images.zip``) of the
   files they name (Ravi & Larochelle's release);
3. ``{train,val,test}/<wnid>/*.jpg`` folders (or ``train.zip`` etc. holding them).
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.errors import DataError
from datamodules.files import FileTree, fingerprint, resize_arrays
from datamodules.images import ClassImageDataModule
from datamodules.store import ClassStore


class MiniImageNetDataModule(ClassImageDataModule):
    """mini-ImageNet episodes (5-way by default), RGB ``uint8 [T, N*K, 3, image_size, image_size]``.

    There is no official download: put one of the layouts of the module docstring in ``root``.

    Args:
        root: the folder holding the pickles, the CSVs and ``images/``, or the split folders.
        image_size: side of the images (84 is the benchmark's; other sizes are resized with LANCZOS).
        cache_dir, device, **kwargs: see :class:`~datamodules.images.ClassImageDataModule`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 84,
        cache_dir: str | os.PathLike | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, image_size, cache_dir=cache_dir, device=device, **kwargs)

    def _missing(self, what: str) -> DataError:
        return DataError(
            f"MiniImageNetDataModule: {what}; put mini-imagenet-cache-<split>.pkl, <split>.csv with images/, or "
            f"<split>/<wnid>/*.jpg folders (split = train, val, test) in {self.root}"
        )

    def prepare_files(self) -> None:
        if self.root is None or not self.root.is_dir():
            raise self._missing(f"root {self.root} does not exist")

    def load_split(self, split: str) -> ClassStore:
        pickled = self.root / f"mini-imagenet-cache-{split}.pkl"
        if pickled.is_file():
            return self.cached(f"mini_imagenet-pkl-{split}", self.root, [fingerprint(pickled)], lambda: self._from_pickle(pickled))
        table = self.root / f"{split}.csv"
        if table.is_file():
            return self._from_csv(split, table)
        tree = FileTree.find(self.root, split)
        if tree is not None:
            return self.cached(f"mini_imagenet-folders-{split}", self.root, [tree.fingerprint()], lambda: self._from_folders(tree))
        raise self._missing(f"no {split} split in {self.root}")

    def _from_pickle(self, path: Path) -> ClassStore:
        try:
            with open(path, "rb") as file:
                data = pickle.load(file, encoding="latin1")
            images, class_dict = np.asarray(data["image_data"]), data["class_dict"]
        except Exception as error:  # any unpickling failure means the same thing to the user
            raise DataError(f"cannot read {path} ({type(error).__name__}: {error}); get the file again") from None
        names = sorted(class_dict)
        order = np.concatenate([np.asarray(class_dict[name], dtype=np.int64) for name in names])
        return ClassStore(resize_arrays(images[order], self.image_size), [len(class_dict[n]) for n in names], names)

    def _from_csv(self, split: str, table: Path) -> ClassStore:
        with open(table, newline="") as file:
            rows = [row for row in csv.reader(file) if row]
        if rows and rows[0][:2] == ["filename", "label"]:
            rows = rows[1:]
        classes: dict[str, list[str]] = {}
        for filename, label, *_ in rows:
            classes.setdefault(label, []).append(filename)
        classes = {label: classes[label] for label in sorted(classes)}
        images = FileTree.find(self.root, "images")
        if images is None:
            raise self._missing(f"{table.name} is there but the images/ folder it refers to is not")
        present = set(images.files())
        missing = [f for files in classes.values() for f in files if f not in present]
        if missing:
            raise DataError(
                f"MiniImageNetDataModule: {table} names {len(missing)} files missing from {images.path} "
                f"(e.g. {missing[0]}); put those images there or remove their rows"
            )
        sources = [fingerprint(table), images.fingerprint()]
        return self.cached(f"mini_imagenet-csv-{split}", self.root, sources, lambda: self.decode_classes(images, classes, channels=3))

    def _from_folders(self, tree: FileTree) -> ClassStore:
        classes: dict[str, list[str]] = {}
        for path in tree.images():
            if "/" in path:
                classes.setdefault(path.split("/")[0], []).append(path)
        if not classes:
            raise DataError(f"MiniImageNetDataModule: {tree.path} holds no <wnid>/*.jpg class folders")
        return self.decode_classes(tree, classes, channels=3)
