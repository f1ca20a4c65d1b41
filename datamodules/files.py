"""One reader for image files in a folder or a zip archive, and the one way images are decoded.

Every dataset reads its files through :class:`FileTree`, so an official zip and the folder it extracts to are
interchangeable, and decodes them with :func:`decode_images`: PIL, converted to ``L`` (1 channel) or ``RGB``
(3 channels), resized with ``Image.LANCZOS`` (antialiased when shrinking, e.g. Omniglot's 105x105 strokes to 28x28,
instead of the aliasing nearest/bilinear-without-antialias give), returned as ``uint8 [N, C, H, W]``.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from datamodules.errors import DataError

#: Extensions PIL reads that datasets of images use.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: The resampling filter of every resize (see the module docstring).
RESAMPLE = Image.LANCZOS

# Files read ahead of the decoding threads.
_CHUNK = 512


class FileTree:
    """Files under a folder or inside a zip archive, addressed by ``/``-separated relative paths.

    Args:
        path: a folder, or a ``.zip`` file.
        prefix: inside a zip, the folder the tree starts at (e.g. ``"images_background/"`` for the official zip,
            whose members all start with it); ignored for folders.
    """

    def __init__(self, path: str | os.PathLike, prefix: str | None = "") -> None:
        self.path = Path(path)
        self.is_zip = self.path.is_file()
        self._prefix = prefix if self.is_zip else ""
        self._zip: zipfile.ZipFile | None = None
        self._files: list[str] | None = None

    @classmethod
    def find(cls, root: str | os.PathLike, name: str) -> FileTree | None:
        """The tree ``root/name/`` (an extracted folder) or else ``root/name.zip``; ``None`` when neither exists.

        Inside the zip the tree starts at ``name/`` when every member lies under it (the official archives' layout);
        that is looked up only when a file is read, so finding a cached dataset never opens its archive.
        """
        root = Path(root)
        if (root / name).is_dir():
            return cls(root / name)
        archive = root / f"{name}.zip"
        return cls(archive, prefix=None) if archive.is_file() else None

    @property
    def prefix(self) -> str:
        if self._prefix is None:
            names = self._archive().namelist()
            top = f"{self.path.stem}/"
            self._prefix = top if names and all(member.startswith(top) for member in names) else ""
        return self._prefix

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as error:
                raise DataError(f"cannot read the zip archive {self.path} ({error}); delete it and download it again") from None
        return self._zip

    def files(self) -> list[str]:
        """Sorted relative paths of the regular files (hidden files and ``__MACOSX`` left out)."""
        if self._files is None:
            if self.is_zip:
                found = [
                    member[len(self.prefix) :]
                    for member in self._archive().namelist()
                    if member.startswith(self.prefix) and not member.endswith("/")
                ]
            else:
                found = [
                    str(Path(folder, name).relative_to(self.path).as_posix())
                    for folder, _, names in os.walk(self.path)
                    for name in names
                ]
            self._files = sorted(f for f in found if not any(part.startswith((".", "__MACOSX")) for part in f.split("/")))
        return self._files

    def images(self, under: str = "") -> list[str]:
        """Sorted relative paths of the image files below the folder ``under``."""
        start = f"{under.rstrip('/')}/" if under else ""
        return [f for f in self.files() if f.startswith(start) and f.lower().endswith(IMAGE_EXTENSIONS)]

    def read(self, relative: str) -> bytes:
        if self.is_zip:
            return self._archive().read(self.prefix + relative)
        return (self.path / relative).read_bytes()

    def where(self, relative: str) -> str:
        """Where a file lives, for messages: ``folder/file`` or ``archive.zip:member``."""
        return f"{self.path}:{self.prefix}{relative}" if self.is_zip else str(self.path / relative)

    def fingerprint(self) -> str:
        """Changes when the files change (see :func:`fingerprint`)."""
        return fingerprint(self.path)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def fingerprint(path: str | os.PathLike) -> str:
    """A digest of a file's or a folder's files' paths, sizes and mtimes: cheap, and changes when they change."""
    path = Path(path)
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=16)
    if path.is_file():
        stat = path.stat()
        digest.update(f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
    else:
        for folder, _, names in sorted(os.walk(path)):
            for name in sorted(names):
                stat = os.stat(os.path.join(folder, name))
                digest.update(f"|{os.path.relpath(os.path.join(folder, name), path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from an int (square) or a pair."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def to_chw(image: Image.Image, image_size: int | Sequence[int], channels: int) -> np.ndarray:
    """A PIL image as ``uint8 [C, H, W]``: converted to ``L``/``RGB`` and resized with :data:`RESAMPLE`."""
    height, width = _size(image_size)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), RESAMPLE)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _decode(data: bytes, where: str, image_size: int | Sequence[int], channels: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            # A JPEG decodes straight to the smallest DCT scale still at least the target size (much faster for
            # full-size photos); other formats ignore this.
            image.draft("L" if channels == 1 else "RGB", tuple(reversed(_size(image_size))))
            return to_chw(image, image_size, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image {where} ({error}); replace or delete that file") from None


def decode_images(
    tree: FileTree,
    paths: Sequence[str],
    image_size: int | Sequence[int],
    channels: int = 1,
    invert: bool = False,
) -> torch.Tensor:
    """Decode ``paths`` of ``tree`` into ``uint8 [len(paths), C, H, W]``.

    Files are read in order in this thread (a zip has one file pointer); decoding and resizing run in a small
    thread pool, since PIL releases the GIL while it decodes and resamples.

    Raises:
        DataError: naming the first file that cannot be decoded.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    height, width = _size(image_size)
    out = np.empty((len(paths), channels, height, width), dtype=np.uint8)

    def work(item: tuple[int, bytes]) -> None:
        i, data = item
        out[i] = _decode(data, tree.where(paths[i]), (height, width), channels)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), _CHUNK):  # bounded: full-size JPEGs would not all fit in memory
            chunk = [(i, tree.read(paths[i])) for i in range(start, min(start + _CHUNK, len(paths)))]
            for _ in pool.map(work, chunk):
                pass
    images = torch.from_numpy(out)
    return 255 - images if invert else images


def resize_arrays(images: np.ndarray, image_size: int | Sequence[int]) -> torch.Tensor:
    """Already-decoded ``uint8 [N, H, W, C]`` images as ``uint8 [N, C, H', W']`` (resized only where needed)."""
    height, width = _size(image_size)
    channels = images.shape[-1]
    if images.shape[1:3] == (height, width):
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    out = np.empty((len(images), channels, height, width), dtype=np.uint8)
    for i, array in enumerate(images):
        out[i] = to_chw(Image.fromarray(array.squeeze(-1) if channels == 1 else array), (height, width), channels)
    return torch.from_numpy(out)
