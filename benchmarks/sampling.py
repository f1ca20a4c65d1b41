"""Speed of the episodic data path: tasks/second of the Omniglot training loader, against learn2learn.

Measures, on the full Omniglot (``$LIT_META_DATA/omniglot`` or ``data/omniglot`` by default), in one process and one
thread:

* cold start: decode + resize all 32,460 images, write the cache, build the Vinyals split with rotations;
* warm start: the same from the cache;
* tasks/second of ``OmniglotDataModule.train_dataloader()`` (Vinyals split, x4 rotations, meta-batches of 32) for
  5-way 1-shot and 20-way 5-shot, with as many queries per class as shots (MAML's episodes) and with 15;
* the same episodes from learn2learn's ``TaskDataset`` (``MetaDataset`` over a torchvision-style dataset of the same
  PNGs with the transform of learn2learn's ``FullOmniglot`` example, and the ``NWays``/``KShots``/``LoadData``/
  ``RemapLabels`` task transforms; no rotations, which would only slow it down further), when learn2learn is
  importable, and the ratio.

Caches go to a temp folder (never beside the data). ``python benchmarks/sampling.py --help`` for options; the default
run takes about a minute (more on a busy machine).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch

from data_paths import OMNIGLOT as DEFAULT_DATA

#: (ways, shots, queries per class): MAML's Omniglot episodes (queries = shots) and the usual 15-query evaluation ones.
SHAPES = ((5, 1, 1), (5, 1, 15), (20, 5, 5), (20, 5, 15))


def rate(step: Callable[[], int], seconds: float, minimum: int = 3) -> float:
    """Tasks per second of ``step`` (which returns the tasks it made), run for ``seconds`` and ``minimum`` times."""
    step()  # warm-up
    tasks, calls, start = 0, 0, time.perf_counter()
    while calls < minimum or time.perf_counter() - start < seconds:
        tasks += step()
        calls += 1
    return tasks / (time.perf_counter() - start)


def ours(root: Path, ways: int, shots: int, queries: int, seconds: float) -> float:
    from datamodules import OmniglotDataModule

    dm = OmniglotDataModule(root, ways=ways, shots=shots, queries=queries, meta_batch_size=32, train_batches=10**9)
    batches = iter(dm.train_dataloader())
    return rate(lambda: next(batches).num_tasks, seconds)


class ZipOmniglot(torch.utils.data.Dataset):
    """A torchvision-style Omniglot of both halves, read from the official zips (no extraction needed).

    Like ``torchvision.datasets.Omniglot`` it decodes an image per item (``Image.open(...).convert("L")`` and the
    transform), labels are character ids, evaluation characters after the background ones (as learn2learn's
    ``FullOmniglot``). Reading a zip member is no slower than opening a file, so this does not handicap learn2learn.
    """

    def __init__(self, root: Path, transform: Callable) -> None:
        self.transform = transform
        self.archives, self.items, characters = {}, [], {}
        for half in ("images_background", "images_evaluation"):
            archive = self.archives[half] = zipfile.ZipFile(root / f"{half}.zip")
            for member in sorted(m for m in archive.namelist() if m.endswith(".png")):
                character = characters.setdefault(member.rsplit("/", 1)[0], len(characters))
                self.items.append((half, member, character))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        half, member, character = self.items[index]
        image = Image.open(io.BytesIO(self.archives[half].read(member))).convert("L")
        return self.transform(image), character


def learn2learn_tasksets(root: Path) -> Callable[[int, int, int], Callable[[], object]] | str:
    """A factory of learn2learn task samplers, or why there is none."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            import learn2learn as l2l  # prints a gym deprecation banner
    except Exception as error:  # ImportError, or a broken install of its many dependencies
        return f"not installed ({type(error).__name__})"
    from PIL import Image
    from torchvision import transforms

    # The transform of learn2learn's FullOmniglot example.
    transform = transforms.Compose([transforms.Resize(28, interpolation=Image.LANCZOS), transforms.ToTensor(), lambda x: 1.0 - x])
    dataset = ZipOmniglot(root, transform)
    # The labels are known from the file list: spares MetaDataset a pass that decodes every image.
    labels_to_indices: dict[int, list[int]] = {}
    for index, (_, _, character) in enumerate(dataset.items):
        labels_to_indices.setdefault(character, []).append(index)
    meta = l2l.data.MetaDataset(dataset, labels_to_indices=labels_to_indices)

    def factory(ways: int, shots: int, queries: int) -> Callable[[], object]:
        task_transforms = [
            l2l.data.transforms.NWays(meta, ways),
            l2l.data.transforms.KShots(meta, shots + queries),
            l2l.data.transforms.LoadData(meta),
            l2l.data.transforms.RemapLabels(meta),
        ]
        return l2l.data.TaskDataset(meta, task_transforms=task_transforms, num_tasks=-1).sample

    return factory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with images_background.zip and images_evaluation.zip")
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent measuring each row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the loader runs on one core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="lit_meta_bench_") as tmp:
        os.environ["LIT_META_CACHE"] = str(Path(tmp) / "cache")
        from datamodules import OmniglotDataModule

        start = time.perf_counter()
        OmniglotDataModule(args.data).setup()
        cold = time.perf_counter() - start
        start = time.perf_counter()
        OmniglotDataModule(args.data).setup()
        warm = time.perf_counter() - start

        print(f"Omniglot from {args.data}: 32,460 images -> uint8 28x28, Vinyals split x4 rotations; torch threads {args.threads}")
        print(f"cold start (decode + cache + split): {cold:6.2f} s")
        print(f"warm start (load cache + split):     {warm:6.2f} s")
        print()

        factory = learn2learn_tasksets(args.data)
        header = f"| {'episodes':<22} | {'lit_meta tasks/s':>16} | {'learn2learn tasks/s':>19} | {'speed-up':>8} |"
        print(header)
        print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
        for ways, shots, queries in SHAPES:
            fast = ours(args.data, ways, shots, queries, args.seconds)
            if isinstance(factory, str):
                slow_cell, ratio_cell = factory, "-"
            else:
                sample = factory(ways, shots, queries)
                slow = rate(lambda: (sample(), 1)[1], args.seconds)
                slow_cell, ratio_cell = f"{slow:,.0f}", f"{fast / slow:,.0f}x"
            name = f"{ways}-way {shots}-shot {queries}-query"
            print(f"| {name:<22} | {fast:>16,.0f} | {slow_cell:>19} | {ratio_cell:>8} |")


if __name__ == "__main__":
    main()
