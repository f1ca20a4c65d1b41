"""The class-indexed tensor store every image dataset decodes into once, and the episodes gathered from it.

A :class:`ClassStore` is one ``uint8 [num_images, C, H, W]`` tensor with the images of each class contiguous, plus
each class's offset, count and name. :func:`load_or_build` caches it on disk (see :func:`cache_dir` for where) under a
name that holds the dataset, split and image size, and a key that changes with the decoding options and the source
files' sizes and mtimes, so a changed source is decoded again. Caches are written atomically (temp file +
``os.replace``): an interrupted run leaves no file a later run would trust.

Episodes are drawn by :meth:`ClassStore.sample`: per task only a few small random draws from the task's own generator
(classes, then images within each class); the gathers and the label tensors are then one vectorized op each for the
whole meta-batch. Class-defining augmentations (Omniglot's rotations) are classes of their own
(:meth:`ClassStore.rotated`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from datamodules.task_batch import TaskBatch

# mkstemp creates files readable by the owner only; a cache should get the permissions any new file gets.
_UMASK = os.umask(0)
os.umask(_UMASK)

#: Bump when the stored format or the decoding changes: old caches are then ignored.
FORMAT_VERSION = 1


class ClassStore:
    """Images grouped by class in one ``uint8`` tensor.

    Args:
        images: ``uint8 [num_images, C, H, W]``, the images of each class contiguous.
        counts: images per class.
        names: one name per class.
        offsets: index of each class's first image; by default the classes follow each other in order.
    """

    def __init__(
        self,
        images: Tensor,
        counts: Sequence[int] | Tensor,
        names: Sequence[str],
        offsets: Sequence[int] | Tensor | None = None,
    ) -> None:
        counts = torch.as_tensor(counts, dtype=torch.long)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if len(names) != len(counts):
            raise ValueError(f"{len(names)} names for {len(counts)} classes")
        if offsets is None:
            if int(counts.sum()) != len(images):
                raise ValueError(f"class counts sum to {int(counts.sum())}, but there are {len(images)} images")
            offsets = torch.cumsum(counts, 0) - counts
        self.images = images
        self.counts = counts
        self.offsets = torch.as_tensor(offsets, dtype=torch.long)
        self.names = list(names)
        self._max_count = int(counts.max()) if len(counts) else 0
        self._min_count = int(counts.min()) if len(counts) else 0
        self._equal_counts = self._min_count == self._max_count

    # ------------------------------------------------------------------------------------------------ structure
    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def class_sizes(self) -> dict[str, int]:
        """Images per class name."""
        return dict(zip(self.names, self.counts.tolist()))

    def class_images(self, index: int) -> Tensor:
        """The images of class ``index``: ``uint8 [count, C, H, W]``."""
        start = int(self.offsets[index])
        return self.images[start : start + int(self.counts[index])]

    def select(self, classes: Sequence[int] | Sequence[str]) -> ClassStore:
        """The store of some classes (by index or name, in the order given), sharing this store's images."""
        if classes and isinstance(classes[0], str):
            position = {name: i for i, name in enumerate(self.names)}
            missing = [c for c in classes if c not in position]
            if missing:
                raise KeyError(f"{len(missing)} classes are not in the store, e.g. {missing[0]!r}")
            classes = [position[c] for c in classes]
        index = torch.as_tensor(list(classes), dtype=torch.long)
        return ClassStore(self.images, self.counts[index], [self.names[i] for i in index.tolist()], self.offsets[index])

    @staticmethod
    def concat(stores: Sequence[ClassStore]) -> ClassStore:
        """One store holding the classes of ``stores`` in order, their images copied into one compact tensor."""
        images = torch.cat([store.images.index_select(0, store._rows()) for store in stores])
        counts = torch.cat([store.counts for store in stores])
        return ClassStore(images, counts, [name for store in stores for name in store.names])

    def _rows(self) -> Tensor:
        """The rows of :attr:`images` holding this store's classes, in class order."""
        starts = torch.cumsum(self.counts, 0) - self.counts
        return torch.arange(int(self.counts.sum())) + torch.repeat_interleave(self.offsets - starts, self.counts)

    def to(self, device: str | torch.device) -> ClassStore:
        """This store with its images on ``device`` (indices stay on the CPU, where the sampling happens)."""
        if torch.device(device) == self.images.device:
            return self
        return ClassStore(self.images.to(device), self.counts, self.names, self.offsets)

    # --------------------------------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temp file in the same folder, then ``os.replace``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A store made by select() shares a larger tensor: save only its own classes.
        compact = self if self._is_compact() else ClassStore.concat([self])
        payload = {
            "version": FORMAT_VERSION,
            "images": compact.images.cpu(),
            "counts": compact.counts,
            "names": compact.names,
        }
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(payload, file)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temp, 0o666 & ~_UMASK)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassStore:
        """Read a store written by :meth:`save` (memory-mapped: instant, and shared by processes on one host)."""
        payload = torch.load(path, mmap=True, weights_only=True)
        if payload.get("version") != FORMAT_VERSION:
            raise ValueError(f"cache format {payload.get('version')}, expected {FORMAT_VERSION}")
        return cls(payload["images"], payload["counts"], payload["names"])

    def _is_compact(self) -> bool:
        expected = torch.cumsum(self.counts, 0) - self.counts
        return int(self.counts.sum()) == len(self.images) and torch.equal(self.offsets, expected)

    # ------------------------------------------------------------------------------------------------ episodes
    def rotated(self, turns: int = 4) -> ClassStore:
        """A store in which each class turned by ``k * 90`` degrees, ``k < turns``, is a class of its own.

        This is how Omniglot's rotations define new classes (Vinyals et al. 2016). The turned copies are made once
        here with ``torch.rot90`` rather than on every gathered batch: on CPU a masked rotation of a gathered uint8
        batch costs ~5x the rest of the sampling, while the copies cost ``turns - 1`` times the store's memory
        (Omniglot at 28x28: 75 MB more). Class ``k * num_classes + c`` is class ``c`` turned ``k`` times, named
        ``<name>/rot<90k>``.
        """
        if turns == 1:
            return self
        if self.images.shape[-1] != self.images.shape[-2]:
            raise ValueError(f"rotations need square images, got {self.images.shape[-2]}x{self.images.shape[-1]}")
        base = self if self._is_compact() else ClassStore.concat([self])  # turn only this store's classes
        images = torch.cat([torch.rot90(base.images, k, dims=(-2, -1)) for k in range(turns)])
        names = [f"{name}/rot{90 * k}" for k in range(turns) for name in base.names]
        return ClassStore(images, base.counts.repeat(turns), names)

    @property
    def num_images(self) -> int:
        """Images in this store's classes."""
        return int(self.counts.sum())

    def examples(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(images uint8 [B, C, H, W], labels long [B])`` of examples ``index`` (``long [B]``).

        Example ``i`` is the ``i``-th image when the classes are laid end to end in order (``range(num_images)``);
        its label is its class's index in this store.
        """
        if not hasattr(self, "_example_rows"):
            # Built once: a select()ed store's classes need not be contiguous in the shared tensor.
            self._example_rows = self._rows()
            self._example_labels = torch.repeat_interleave(torch.arange(self.num_classes), self.counts)
        index = torch.as_tensor(index, dtype=torch.long)
        rows = self._example_rows[index].to(self.images.device, non_blocking=True)
        return self.images.index_select(0, rows), self._example_labels[index].to(self.images.device)

    def take(self, index: Tensor) -> Tensor:
        """Images at ``index`` (``long [T, ...]``, rows of :attr:`images`) as ``uint8 [T, prod(...), C, H, W]``."""
        flat = index.reshape(-1).to(self.images.device, non_blocking=True)
        # index_select is ~10x faster than advanced indexing for a gather of a few dozen images.
        return self.images.index_select(0, flat).view(index.shape[0], -1, *self.images.shape[1:])

    def sample(self, generators: Sequence[torch.Generator], ways: int, shots: int, queries: int) -> TaskBatch:
        """One ``ways``-way ``shots``-shot task with ``queries`` queries per class from each generator.

        Task ``t`` uses only ``generators[t]``: it picks ``ways`` distinct classes in random order, class ``i`` of
        the order getting label ``i``, then ``shots + queries`` distinct images of each (one ``rand(ways, size)
        .argsort()`` for all its classes). Support and query are ordered by label. Images are
        ``uint8 [T, N*K, C, H, W]`` (and ``[T, N*Q, ...]``) on the store's device, labels ``long [T, N*K]``.
        """
        if ways > self.num_classes or shots + queries > self._min_count:
            raise ValueError(
                f"{ways}-way tasks of {shots}+{queries} images per class need {ways} classes of {shots + queries} images; "
                f"the store has {self.num_classes} classes of at least {self._min_count}"
            )
        classes = torch.tensor([_choose(self.num_classes, ways, g) for g in generators], dtype=torch.long)
        keys = torch.stack([torch.rand(ways, self._max_count, generator=g) for g in generators])
        if not self._equal_counts:
            # Positions past a class's end sort last, so the first shots + queries are a random subset of its images.
            keys.masked_fill_(torch.arange(self._max_count) >= self.counts[classes].unsqueeze(-1), 2.0)
        index = self.offsets[classes].unsqueeze(-1) + keys.argsort(-1)[..., : shots + queries]
        tasks = len(generators)
        labels = torch.arange(ways, device=self.images.device)
        return TaskBatch(
            self.take(index[..., :shots]),
            labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
            self.take(index[..., shots:]),
            labels.repeat_interleave(queries).expand(tasks, -1).contiguous(),
        )


def _choose(num: int, k: int, generator: torch.Generator) -> list[int]:
    """``k`` distinct integers of ``range(num)`` in uniformly random order, drawn from ``generator`` only."""
    if 4 * k <= num:
        # The first k distinct values of an i.i.d. uniform sequence are a uniform ordered sample without
        # replacement; for k << num this costs a few microseconds instead of a randperm of num.
        chosen = dict.fromkeys(torch.randint(num, (2 * k,), generator=generator).tolist())
        while len(chosen) < k:
            chosen.update(dict.fromkeys(torch.randint(num, (k,), generator=generator).tolist()))
        return list(chosen)[:k]
    return torch.randperm(num, generator=generator)[:k].tolist()


# ------------------------------------------------------------------------------------------------------ caching
def user_cache_dir() -> Path:
    """The platform's user cache folder for lit_meta (``~/.cache/lit_meta`` on Linux)."""
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("lit_meta"))
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lit_meta"


def _writable(data_dir: Path) -> bool:
    """Whether a cache may be written in ``data_dir/.lit_meta_cache``.

    A data folder without any write permission bit is read-only by intent, and left alone even by root (for whom
    ``os.access`` says yes to everything); otherwise creating a file there is tried.
    """
    try:
        if not data_dir.stat().st_mode & 0o222:
            return False
        folder = data_dir / ".lit_meta_cache"
        folder.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cache_dir(data_dir: str | os.PathLike | None, explicit: str | os.PathLike | None = None) -> Path:
    """Where decoded stores of the data in ``data_dir`` are cached, first match wins:

    1. ``explicit`` (a datamodule's ``cache_dir`` argument);
    2. ``$LIT_META_CACHE``, when set: an explicit choice, so it also wins over a writable data folder (CI points it
       at a temp folder so that shared data is never written, even by root);
    3. ``<data_dir>/.lit_meta_cache``, beside the data, when the data folder is writable (and has a write permission
       bit: a folder marked read-only is not written even by root);
    4. the platform's user cache dir (:func:`user_cache_dir`, ``~/.cache/lit_meta``).
    """
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get("LIT_META_CACHE"):
        return Path(os.environ["LIT_META_CACHE"]).expanduser()
    if data_dir is not None and _writable(Path(data_dir)):
        return Path(data_dir) / ".lit_meta_cache"
    return user_cache_dir()


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def load_or_build(
    name: str,
    image_size: int | Sequence[int],
    options: Mapping[str, Any],
    fingerprints: Sequence[str],
    build: Callable[[], ClassStore],
    folder: Path,
) -> ClassStore:
    """The cached store ``name`` at ``image_size``, decoding it with ``build`` when no valid cache exists.

    The file is ``<folder>/<name>-<H>x<W>-<options key>-<source key>.pt``. A cache of the same name, size and
    options but an older source is removed when the new one is written. A cache that cannot be read is rebuilt; one
    that cannot be written only costs a warning (the run goes on with the store in memory).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    stem = f"{name}-{height}x{width}-{_digest([FORMAT_VERSION, dict(options)])}"
    path = folder / f"{stem}-{_digest(list(fingerprints))}.pt"
    if path.is_file():
        try:
            return ClassStore.load(path)
        except Exception as error:  # a damaged or foreign file: decode again and replace it
            warnings.warn(f"ignoring the unreadable cache {path} ({_one_line(error)}); decoding the images again", stacklevel=2)
    store = build()
    try:
        store.save(path)
        for stale in folder.glob(f"{stem}-*.pt"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as error:
        warnings.warn(
            f"could not write the cache {path} ({_one_line(error)}); delete it if it is left over, or set "
            "LIT_META_CACHE to a writable folder",
            stacklevel=2,
        )
    return store


def _one_line(error: BaseException) -> str:
    """``error`` as ``Type: first line`` (torch's and zipfile's messages run over several lines)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
