"""Few-shot episodes from the user's own images: ``root/<class>/*`` or ``root/{train,val,test}/<class>/*``."""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import torch

from datamodules.errors import ConfigError, DataError
from datamodules.files import FileTree
from datamodules.images import SPLITS, ClassImageDataModule
from datamodules.store import ClassStore


class ImageFolderDataModule(ClassImageDataModule):
    """Episodes from a folder tree with one subfolder of images per class.

    Two layouts: ``root/{train,val,test}/<class>/<image>`` (the split is given by the folders), or
    ``root/<class>/<image>``, whose classes are split by ``split_fractions`` (a fixed random split by class, seeded
    by ``split_seed``). Images in nested folders count for the class folder above them. ``root`` (or a split
    folder) may be a ``.zip`` holding the same tree. Classes may have different numbers of images.

    Args:
        root: the folder (or ``.zip``).
        image_size: images are resized (LANCZOS, no cropping) to ``image_size x image_size``.
        channels: 1 (grayscale) or 3 (RGB).
        split_fractions: fractions of the classes in train, val and test when there are no split folders.
        split_seed: seeds that class split (not the episodes: those follow ``seed``).
        invert: store ``255 - pixel`` (e.g. for dark-on-white drawings).
        cache_dir, device, **kwargs: see :class:`~datamodules.images.ClassImageDataModule`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 84,
        channels: int = 3,
        split_fractions: Sequence[float] = (0.64, 0.16, 0.20),
        split_seed: int = 0,
        invert: bool = False,
        cache_dir: str | os.PathLike | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, image_size, cache_dir=cache_dir, device=device, **kwargs)
        if channels not in (1, 3):
            raise ConfigError(f"ImageFolderDataModule: channels must be 1 or 3, got {channels!r}")
        fractions = tuple(float(f) for f in split_fractions)
        if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise ConfigError(f"ImageFolderDataModule: split_fractions must be 3 non-negative numbers summing to 1 (train, val, test), got {list(split_fractions)}")
        self.channels = channels
        self.split_fractions = fractions
        self.split_seed = split_seed
        self.invert = invert
        self._all: ClassStore | None = None

    # ------------------------------------------------------------------------------------------------- files
    def _tree(self, split: str | None = None) -> FileTree | None:
        if split is None:
            return FileTree(self.root, prefix=None) if self.root.exists() else None
        return FileTree.find(self.root, split)

    def has_split_folders(self) -> bool:
        """Whether ``root`` holds ``train``/``val``/``test`` folders (else its subfolders are the classes)."""
        return self.root.is_dir() and any(FileTree.find(self.root, split) is not None for split in SPLITS)

    def prepare_files(self) -> None:
        if not self.root.exists():
            raise DataError(f"ImageFolderDataModule: root {self.root} does not exist; point root at a folder of <class>/<image> subfolders")

    def _decode(self, tree: FileTree) -> ClassStore:
        classes: dict[str, list[str]] = {}
        for path in tree.images():
            if "/" in path:  # files right under the tree belong to no class
                classes.setdefault(path.split("/")[0], []).append(path)
        if not classes:
            raise DataError(f"ImageFolderDataModule: {tree.path} holds no <class>/<image> files; put one folder of images per class there")
        return self.decode_classes(tree, classes, channels=self.channels, invert=self.invert)

    def _cached(self, tree: FileTree, part: str) -> ClassStore:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.root.name) or "root"
        return self.cached(
            f"imagefolder-{name}-{part}",
            self.root if self.root.is_dir() else self.root.parent,
            [tree.fingerprint()],
            lambda: self._decode(tree),
            channels=self.channels,
            invert=self.invert,
        )

    # ------------------------------------------------------------------------------------------------ splits
    def split_classes(self, names: Sequence[str]) -> dict[str, list[str]]:
        """Classes of each split when they come from one folder: a seeded permutation cut by the fractions."""
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        shuffled = [sorted(names)[i] for i in order]
        n_val = round(self.split_fractions[1] * len(names))
        n_test = round(self.split_fractions[2] * len(names))
        n_train = len(names) - n_val - n_test
        return {
            "train": sorted(shuffled[:n_train]),
            "val": sorted(shuffled[n_train : n_train + n_val]),
            "test": sorted(shuffled[n_train + n_val :]),
        }

    def load_split(self, split: str) -> ClassStore:
        if self.has_split_folders():
            tree = self._tree(split)
            if tree is None:
                raise DataError(f"ImageFolderDataModule: {self.root} has split folders but no {split}/; add {self.root / split}/<class>/<image>")
            return self._cached(tree, split)
        if self._all is None:
            self._all = self._cached(self._tree(), "all")
        names = self.split_classes(self._all.names)[split]
        if not names:
            raise ConfigError(
                f"ImageFolderDataModule: the {split} split has no class ({len(self._all.names)} classes, split_fractions "
                f"{list(self.split_fractions)}); add classes or raise its fraction"
            )
        return self._all.select(names)
