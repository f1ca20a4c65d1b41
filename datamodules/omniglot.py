"""Omniglot (Lake et al. 2015): 1623 handwritten characters of 50 alphabets, 20 drawings each.

Reads the official layout from ``root``: ``images_background`` and ``images_evaluation`` (and optionally
``images_background_small1``/``small2``, ``all_runs``), each as the official zip or the folder it extracts to,
``<Alphabet>/characterNN/<id>_<drawer>.png`` inside. Checksums are checked only on the download path, so a lossless
re-zip of the official archives is read as well.

Images are 1-bit 105x105 drawings, resized with LANCZOS (antialiased) to ``image_size`` and by default inverted:
strokes bright (255) on a dark (0) background, i.e. ``1 - x`` in ``[0, 1]``, the MAML/ProtoNet convention.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from datamodules.base import EpisodeShape
from datamodules.download import download as fetch
from datamodules.errors import ConfigError, DataError
from datamodules.files import FileTree
from datamodules.images import ClassImageDataModule
from datamodules.lake import NUM_RUNS, RUN_WAYS, LakeRunsLoader, run_classes, run_tasks
from datamodules.sampler import STREAMS, EpisodeLoader
from datamodules.store import ClassStore
from datamodules.task_batch import TaskBatch

RESOURCES = Path(__file__).parent / "resources"
#: The MIT-licensed small background sets and the one-shot runs, shipped with the package.
SHIPPED = RESOURCES / "omniglot"

_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
#: ``{archive: (url, md5)}`` of the files ``download=True`` fetches (torchvision's URLs and md5s).
DOWNLOADS = {
    "images_background": (f"{_URL}/images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": (f"{_URL}/images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"),
}



def download_omniglot(
    root: str | os.PathLike, mirror: str | None = None, timeout: float = 60.0, log: Callable[[str], None] | None = None
) -> list[Path]:
    """Fetch the official ``images_background.zip`` and ``images_evaluation.zip`` into ``root``.

    An archive already in ``root`` (as the zip or the folder it extracts to) is skipped. Each download is atomic and
    checked against its md5 (:func:`datamodules.download.download`). Lake's runs and the small background sets need
    no download: they ship with the package and the datamodule reads them from there.

    Args:
        root: the folder (created when missing); then ``OmniglotDataModule(root=root)``.
        mirror: a base URL serving the same file names, instead of the official one.
        timeout: seconds to wait for the server.
        log: called with one line per archive (fetched or skipped).

    Returns:
        The paths of the archives fetched now.

    Raises:
        DataError: a download failed (nothing is left of it).
    """
    root = Path(root).expanduser()
    fetched = []
    for name, (url, md5) in DOWNLOADS.items():
        found = FileTree.find(root, name) if root.is_dir() else None
        if found is not None:
            if log is not None:
                log(f"{name}: already in {root}, skipped")
            continue
        if mirror is not None:
            url = f"{mirror.rstrip('/')}/{name}.zip"
        if log is not None:
            log(f"{name}: fetching {url}")
        fetched.append(fetch(url, root / f"{name}.zip", md5=md5, timeout=timeout))
        if log is not None:
            log(f"{name}: saved {fetched[-1]}")
    return fetched


#: The archives of each choice of ``background``.
BACKGROUNDS = {
    "full": ("images_background",),
    "small1": ("images_background_small1",),
    "small2": ("images_background_small2",),
    "small1+small2": ("images_background_small1", "images_background_small2"),
}
CLASS_SPLITS = ("vinyals", "lake")
TEST_SETS = ("split", "lake_runs")


class OmniglotDataModule(ClassImageDataModule):
    """Omniglot episodes: the Vinyals or the Lake split, optionally tested on Lake's 20 one-shot runs.

    With ``root=None`` (the default) it needs no download: it meta-trains on the official small background sets
    shipped in the package (``small1+small2``: 8 alphabets, 242 characters), validates on whole alphabets carved out
    of them (by default Korean: 40 characters, leaving 202 for training), and tests on Lake's 20 runs (drawn from
    the evaluation alphabets, so never seen in training). Validation cannot use the runs' training images: they hold
    one drawing per class, too few for a support and a query.

    Args:
        root: folder with the official files (zips or extracted folders); ``None`` uses the shipped small sets.
        split: ``"vinyals"`` (Vinyals et al. 2016: 1028 / 172 / 423 characters mixing both halves; needs ``root``)
            or ``"lake"`` (train on background alphabets, validate on ``val_alphabets`` of them, test on the
            evaluation alphabets). Default: ``"vinyals"`` with a ``root``, ``"lake"`` without.
        background: the lake split's training archives: ``"full"`` (30 alphabets), ``"small1"``, ``"small2"`` or
            ``"small1+small2"`` (5 / 5 / 8 alphabets; Greek and Latin are in both). Default: ``"full"`` with a
            ``root``, ``"small1+small2"`` without. Missing small archives are taken from the shipped copies.
        rotations: 90/180/270-degree rotations of each character as classes of their own (x4 classes in every
            split). Default: on for ``vinyals``, off for ``lake``. Never applied to Lake's runs.
        val_alphabets: the lake split's validation alphabets: a number of them (drawn with a fixed seed, so the
            split never changes) or their names. Default: a sixth of the background alphabets (at least one).
        test_set: ``"split"`` (the split's test classes) or ``"lake_runs"`` (the 20 runs of 20-way 1-shot with 20
            queries: accuracy over 400 images; ``ways``/``shots``/``queries`` do not apply). Default: ``"split"``
            with a ``root``, ``"lake_runs"`` without.
        image_size: side of the resized images (28 by convention; 105 is the original).
        invert: strokes bright on dark (``True``, ``255 - pixel``) or the original dark on white.
        download: fetch ``images_background.zip`` / ``images_evaluation.zip`` into ``root`` when missing.
        cache_dir, device, **kwargs: see :class:`~datamodules.images.ClassImageDataModule`.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str | None = None,
        background: str | None = None,
        rotations: bool | None = None,
        val_alphabets: int | Sequence[str] | None = None,
        test_set: str | None = None,
        image_size: int = 28,
        invert: bool = True,
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, image_size, download=download, cache_dir=cache_dir, device=device, **kwargs)
        self.split = split or ("vinyals" if root is not None else "lake")
        self.background = background or ("small1+small2" if root is None and self.split == "lake" else "full")
        self.test_set = test_set or ("split" if root is not None else "lake_runs")
        self.rotations = self.split == "vinyals" if rotations is None else bool(rotations)
        self.val_alphabets = val_alphabets
        self.invert = invert
        self._archives: dict[str, ClassStore] = {}
        self._check_options()

    def _check_options(self) -> None:
        name = type(self).__name__
        for option, value, allowed in (
            ("split", self.split, CLASS_SPLITS),
            ("background", self.background, tuple(BACKGROUNDS)),
            ("test_set", self.test_set, TEST_SETS),
        ):
            if value not in allowed:
                raise ConfigError(f"{name}: unknown {option} {value!r}; use one of {', '.join(allowed)}")
        if self.split == "vinyals" and self.background != "full":
            raise ConfigError(f"{name}: background={self.background!r} applies to split='lake' only; the vinyals split has fixed characters")
        needs_full = self.split == "vinyals" or self.background == "full" or self.test_set == "split"
        if self.root is None and needs_full:
            raise ConfigError(
                f"{name}: split={self.split!r}, background={self.background!r}, test_set={self.test_set!r} needs the full "
                "Omniglot; pass root=<folder> (with download=True to fetch it), or use split='lake' with a small "
                "background and test_set='lake_runs', which ship with the package"
            )
        if isinstance(self.val_alphabets, (int, bool)) and (isinstance(self.val_alphabets, bool) or self.val_alphabets < 1):
            raise ConfigError(f"{name}: val_alphabets must be a positive number of alphabets or a list of names")
        if self.split == "vinyals" and self.test_set == "lake_runs":
            warnings.warn(
                "78 of the 200 characters in Lake's runs are in the Vinyals training split (which takes 8 evaluation "
                "alphabets); use split='lake' for a clean one-shot challenge result",
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------------------------- files
    def _needed(self) -> list[str]:
        if self.split == "vinyals":
            needed = ["images_background", "images_evaluation"]
        else:
            needed = list(BACKGROUNDS[self.background])
            if self.test_set == "split":
                needed.append("images_evaluation")
        return needed + (["all_runs"] if self.test_set == "lake_runs" else [])

    def _tree(self, name: str) -> tuple[FileTree | None, Path | None]:
        """The archive ``name`` and the folder it lies in (``None`` for the shipped copies, never written to)."""
        if self.root is not None:
            tree = FileTree.find(self.root, name)
            if tree is not None:
                return tree, self.root
        tree = FileTree.find(SHIPPED, name)
        return tree, None

    def prepare_files(self) -> None:
        for name in self._needed():
            tree, _ = self._tree(name)
            if tree is not None:
                continue
            if self.root is None:
                raise DataError(f"OmniglotDataModule: the shipped {SHIPPED / name}.zip is missing; reinstall lit_meta")
            if self.download and name in DOWNLOADS:
                url, md5 = DOWNLOADS[name]
                fetch(url, self.root / f"{name}.zip", md5=md5)
            elif not self.root.is_dir():
                raise DataError(
                    f"OmniglotDataModule: root {self.root} does not exist; pass download=True to fetch Omniglot "
                    f"there, or put the official {name}.zip ({_URL}) in it"
                )
            else:
                raise DataError(
                    f"OmniglotDataModule: {self.root} has neither {name}.zip nor {name}/ (official Omniglot layout); "
                    f"pass download=True to fetch it, or put {name}.zip from {_URL} there"
                )

    def _archive(self, name: str) -> ClassStore:
        """All characters of one archive, named ``<Alphabet>/characterNN``, 20 drawings each."""
        if name not in self._archives:
            tree, data_dir = self._tree(name)
            if tree is None:
                self.prepare_files()
                tree, data_dir = self._tree(name)

            def build() -> ClassStore:
                classes: dict[str, list[str]] = {}
                for path in tree.images():
                    parts = path.split("/")
                    if len(parts) == 3:
                        classes.setdefault(f"{parts[0]}/{parts[1]}", []).append(path)
                if not classes:
                    raise DataError(f"{tree.path} holds no <Alphabet>/<character>/*.png images; get the official {name}.zip again")
                return self.decode_classes(tree, classes, channels=1, invert=self.invert)

            self._archives[name] = self.cached(f"omniglot-{name}", data_dir, [tree.fingerprint()], build, invert=self.invert)
        return self._archives[name]

    # ------------------------------------------------------------------------------------------------ splits
    def load_split(self, split: str) -> ClassStore:
        if split == "test" and self.test_set == "lake_runs":
            return self._runs()
        store = self._vinyals(split) if self.split == "vinyals" else self._lake(split)
        return store.rotated(4) if self.rotations else store

    def _vinyals(self, split: str) -> ClassStore:
        characters = json.loads((RESOURCES / "splits" / "omniglot" / f"{split}.json").read_text())
        parts = []
        for half, alphabets in characters.items():
            names = [f"{alphabet}/{character}" for alphabet, chars in alphabets.items() for character in chars]
            if names:
                archive = self._archive(f"images_{half}")
                missing = sorted(set(names) - set(archive.names))
                if missing:
                    raise DataError(
                        f"images_{half} lacks {len(missing)} characters of the Vinyals {split} split (e.g. {missing[0]}); "
                        "the archive is incomplete: get the official one again"
                    )
                parts.append(archive.select(names))
        return ClassStore.concat(parts)

    def _background(self) -> ClassStore:
        """The background archives of ``background``, a character in two of them (Greek, Latin) taken once."""
        if "background" not in self._archives:
            parts, seen = [], set()
            for name in BACKGROUNDS[self.background]:
                archive = self._archive(name)
                keep = [n for n in archive.names if n not in seen]
                seen.update(keep)
                parts.append(archive.select(keep))
            self._archives["background"] = parts[0] if len(parts) == 1 else ClassStore.concat(parts)
        return self._archives["background"]

    def validation_alphabets(self) -> list[str]:
        """The lake split's validation alphabets (see ``val_alphabets``)."""
        alphabets = sorted({name.split("/")[0] for name in self._background().names})
        if self.val_alphabets is None or isinstance(self.val_alphabets, int):
            count = self.val_alphabets or max(1, round(len(alphabets) / 6))
            if count >= len(alphabets):
                raise ConfigError(f"OmniglotDataModule: val_alphabets={count} leaves no training alphabet of {len(alphabets)}")
            # A fixed generator: the split must not move with the run's seed.
            order = torch.randperm(len(alphabets), generator=torch.Generator().manual_seed(0)).tolist()
            return sorted(alphabets[i] for i in order[:count])
        unknown = [a for a in self.val_alphabets if a not in alphabets]
        if unknown:
            raise ConfigError(f"OmniglotDataModule: val_alphabets {unknown} are not background alphabets; choose from {', '.join(alphabets)}")
        return sorted(self.val_alphabets)

    def _lake(self, split: str) -> ClassStore:
        if split == "test":
            return self._archive("images_evaluation")
        background = self._background()
        held_out = set(self.validation_alphabets())
        keep = [n for n in background.names if (n.split("/")[0] in held_out) == (split == "val")]
        return background.select(keep)

    def _runs(self) -> ClassStore:
        tree, data_dir = self._tree("all_runs")

        def build() -> ClassStore:
            return self.decode_classes(tree, run_classes(tree), channels=1, invert=self.invert)

        return self.cached("omniglot-all_runs", data_dir, [tree.fingerprint()], build, invert=self.invert)

    # ---------------------------------------------------------------------------------------------- episodes
    def shape(self, split: str) -> EpisodeShape:
        if split == "test" and self.test_set == "lake_runs":
            return EpisodeShape(RUN_WAYS, 1, 1)
        return super().shape(split)

    def num_episodes(self, split: str) -> int:
        if split == "test" and self.test_set == "lake_runs":
            return NUM_RUNS
        return super().num_episodes(split)

    def more_episodes(self, split: str, world_size: int) -> str:
        if split == "test" and self.test_set == "lake_runs":
            return f"Lake's runs are a fixed {NUM_RUNS}: test on at most {NUM_RUNS} devices, or use test_set='split' with test_episodes >= {world_size}"
        return super().more_episodes(split, world_size)

    def num_classes(self, split: str) -> int | None:
        if split == "test" and self.test_set == "lake_runs":
            return RUN_WAYS
        return super().num_classes(split)

    def class_sizes(self, split: str) -> dict[str, int] | None:
        if split == "test" and self.test_set == "lake_runs":
            return None
        return super().class_sizes(split)

    def sample_tasks(self, split: str, generators: list[torch.Generator]) -> TaskBatch:
        if split == "test" and self.test_set == "lake_runs":
            runs = [int(torch.randint(NUM_RUNS, (1,), generator=g)) for g in generators]
            return run_tasks(self.store("test"), runs)
        return super().sample_tasks(split, generators)

    def episode_loader(self, split: str) -> EpisodeLoader:
        if split == "test" and self.test_set == "lake_runs":
            if self.ways != RUN_WAYS:
                warnings.warn(
                    f"Lake's runs are {RUN_WAYS}-way tasks while ways={self.ways}: a model with a fixed {self.ways}-way "
                    f"output layer (MAML, ANIL, Meta-SGD) needs ways={RUN_WAYS} to be tested on them",
                    stacklevel=2,
                )
            rank, world_size = self._rank()
            return LakeRunsLoader(
                self.store("test"),
                meta_batch_size=self.eval_meta_batch_size,
                seed=self.seed,
                stream=STREAMS["test"],
                rank=rank,
                world_size=world_size,
            )
        return super().episode_loader(split)
