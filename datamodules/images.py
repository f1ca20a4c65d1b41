"""The base class of the image datamodules: one :class:`ClassStore` per split, episodes gathered from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from datamodules.augmentation import Augmentation
from datamodules.base import EpisodicDataModule
from datamodules.errors import ConfigError
from datamodules.files import FileTree, decode_images
from datamodules.sampler import BatchLoader, EpisodeLoader, Task
from datamodules.store import ClassStore, cache_dir, load_or_build
from datamodules.task_batch import ExampleBatch, TaskBatch

SPLITS = ("train", "val", "test")

#: The splits each Lightning stage reads.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class ClassImageDataModule(EpisodicDataModule):
    """N-way K-shot episodes of images, gathered from a class-indexed ``uint8`` store per split.

    A subclass implements :meth:`load_split` (the split's store, usually through :meth:`cached`) and, when files can
    be fetched, :meth:`prepare_files`. Batches hold ``uint8`` images ``[T, N*K, C, H, W]``; the base class turns them
    into float in ``[0, 1]`` after they reach the device.

    Args:
        root: the dataset's folder (its layout is the subclass's).
        image_size: images are resized to ``image_size x image_size``.
        download: fetch missing files (where the dataset has an official download).
        cache_dir: where decoded stores are cached; ``None`` picks one (see :func:`datamodules.store.cache_dir`).
        device: keep the stores on this device and gather episodes there (e.g. ``"cuda"``; ``"auto"`` is the
            trainer's device); ``None`` keeps them in CPU memory, memory-mapped from the cache.
        augment: per-image augmentation of the training images (support and query of training episodes, and the
            batches of ``train_mode: batches``), applied on the device; never at validation, test or prediction.
            ``None`` (the default): none. A mapping of ``crop`` (``{padding: p}`` or ``{scale: [a, b], ratio:
            [r, s]}``), ``flip`` (bool) and ``color_jitter`` (a strength, or ``{brightness, contrast, saturation}``),
            e.g. ``{crop: {padding: 8}, flip: true, color_jitter: 0.4}``, the RFS / MetaOptNet recipe; see
            :class:`~datamodules.augmentation.Augmentation`. 1-channel images take no saturation jitter.
        **kwargs: the episode settings of :class:`~datamodules.base.EpisodicDataModule` (ways, shots, queries,
            meta_batch_size, train_batches, val_episodes, test_episodes, eval_meta_batch_size, train_ways,
            train_shots, train_queries, seed, train_mode, batch_size).
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        image_size: int,
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
        device: str | None = None,
        augment: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
            raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
        self.root = Path(root).expanduser() if root is not None else None
        self.image_size = image_size
        self.download = download
        self.cache_dir = cache_dir
        if device not in (None, "auto"):
            try:
                torch.device(device)
            except (RuntimeError, TypeError) as error:  # torch's message lists every device type it knows
                raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda:0', 'auto' or null, got {device!r}") from error
        self.device = device
        self.augmentation = Augmentation.from_spec(augment)
        self._stores: dict[str, ClassStore] = {}
        self._placed: dict[str, ClassStore] = {}
        self._checked: set[tuple[str, Any]] = set()
        self._files_ready = False

    # ----------------------------------------------------------------------------------------------- subclass API
    def load_split(self, split: str) -> ClassStore:
        """The store of ``split`` (one of :data:`SPLITS`), with its class-defining augmentations applied."""
        raise NotImplementedError

    def prepare_files(self) -> None:
        """Make sure the files are there: download them when ``download`` is set, else raise a one-line error."""

    # ------------------------------------------------------------------------------------------------- stores
    def cached(
        self,
        name: str,
        data_dir: Path | None,
        fingerprints: Sequence[str],
        build: Callable[[], ClassStore],
        **options: Any,
    ) -> ClassStore:
        """The store ``name`` at this datamodule's image size, from the cache or built (and cached) by ``build``.

        Args:
            name: dataset and split, e.g. ``"omniglot-images_background"``.
            data_dir: the folder the data was read from (the cache goes beside it when writable); ``None`` for data
                shipped inside the package, which is never written to.
            fingerprints: change when the source files change (see :func:`datamodules.files.fingerprint`).
            build: decodes the store.
            **options: anything else that changes the decoded images (e.g. ``invert``).
        """
        folder = cache_dir(data_dir, self.cache_dir)
        # The data's location is part of the options: caches of two copies of a dataset (in one shared cache
        # folder) are two caches, rather than each other's stale version.
        options = {**options, "location": str(data_dir.resolve()) if data_dir is not None else "shipped"}
        return load_or_build(name, self.image_size, options, fingerprints, build, folder)

    def decode_classes(
        self, tree: FileTree, classes: Mapping[str, Sequence[str]], channels: int, invert: bool = False
    ) -> ClassStore:
        """Decode ``{class name: [paths in tree]}`` into a store (classes in the mapping's order)."""
        paths = [path for files in classes.values() for path in files]
        images = decode_images(tree, paths, self.image_size, channels=channels, invert=invert)
        return ClassStore(images, [len(files) for files in classes.values()], list(classes))

    def store(self, split: str) -> ClassStore:
        """The store of ``split`` on the datamodule's device (loaded on first use)."""
        if split not in SPLITS:
            raise ConfigError(f"{type(self).__name__}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if split not in self._stores:
            if not self._files_ready:
                self.prepare_files()
                self._files_ready = True
            self._stores[split] = self.load_split(split)
        device = self._device()
        placed = self._placed.get(split)
        if placed is None or placed.device != device:
            placed = self._placed[split] = self._stores[split].to(device)
        return placed

    def _device(self) -> torch.device:
        if self.device == "auto":
            trainer = getattr(self, "trainer", None)
            return trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return torch.device(self.device or "cpu")

    # ---------------------------------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        # Runs once per node before the other processes start: download, and decode into the caches, so the
        # other ranks only load them.
        self.prepare_files()
        for split in SPLITS:
            self.store(split)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for split in STAGE_SPLITS.get(stage, SPLITS) if stage else SPLITS:
            self.store(split)
        if stage in (None, "fit"):
            self.check_augmentation()

    def check_augmentation(self) -> None:
        """Raise a one-line :class:`ConfigError` where the training images cannot take ``augment``."""
        if self.augmentation is not None:
            self.augmentation.check_images(*self.store("train").image_shape, owner=type(self).__name__)

    def train_dataloader(self) -> EpisodeLoader | BatchLoader:
        self.check_augmentation()
        return super().train_dataloader()

    # ------------------------------------------------------------------------------------------------ episodes
    def num_classes(self, split: str) -> int | None:
        return self.store(split).num_classes

    def class_sizes(self, split: str) -> dict[str, int] | None:
        return self.store(split).class_sizes()

    def num_examples(self, split: str) -> int | None:
        return self.store(split).num_images

    def examples(self, split: str, index: torch.Tensor) -> ExampleBatch:
        return ExampleBatch(*self.store(split).examples(index))

    def sample_tasks(self, split: str, generators: list[torch.Generator]) -> TaskBatch:
        shape = self.shape(split)
        if (split, shape) not in self._checked:
            self.check_split(split)
            self._checked.add((split, shape))
        return self.store(split).sample(generators, shape.ways, shape.shots, shape.queries)

    def sample_task(self, split: str, generator: torch.Generator) -> Task:
        batch = self.sample_tasks(split, [generator])
        return batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0]
