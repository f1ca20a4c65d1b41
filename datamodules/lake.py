"""Lake et al.'s one-shot classification challenge (``all_runs.zip``) as a fixed test set of 20 tasks.

Each of the 20 runs is a 20-way within-alphabet one-shot task: 20 training images (``training/classNN.png``, one per
class) and 20 test images (``test/itemNN.png``), paired by ``class_labels.txt``. Run ``r`` becomes task ``r``: the
support is ``class01..class20`` with labels ``0..19``, the query holds each class's test image, ordered by label
(so ``query_y`` is ``0..19``, and the test item paired with ``classNN`` carries label ``NN - 1``). Accuracy over the
20 tasks is accuracy over the 400 test images, comparable with people (95.5%) and BPL (96.7%) in Lake et al. (2015).
"""

from __future__ import annotations

from typing import Any

import torch

from datamodules.errors import DataError
from datamodules.files import FileTree
from datamodules.sampler import EpisodeLoader
from datamodules.store import ClassStore
from datamodules.task_batch import TaskBatch

NUM_RUNS = 20
RUN_WAYS = 20


def run_classes(tree: FileTree) -> dict[str, list[str]]:
    """``{"runRR/classNN": [training image, paired test image]}`` for the 20 runs in order.

    Raises:
        DataError: when a run's ``class_labels.txt`` is missing or does not pair each class with exactly one item.
    """
    classes: dict[str, list[str]] = {}
    for run in range(1, NUM_RUNS + 1):
        name = f"run{run:02d}"
        try:
            text = tree.read(f"{name}/class_labels.txt").decode()
        except (KeyError, FileNotFoundError):  # zip member / file missing
            raise DataError(f"{tree.where(name + '/class_labels.txt')} is missing; all_runs is incomplete, get it again") from None
        pairs = dict(reversed(line.split()) for line in text.splitlines() if line.strip())  # training -> test
        expected = [f"{name}/training/class{c:02d}.png" for c in range(1, RUN_WAYS + 1)]
        if sorted(pairs) != expected:
            raise DataError(
                f"{tree.where(name + '/class_labels.txt')} does not pair each of the {RUN_WAYS} training classes with "
                "one test item; all_runs.zip is damaged, get it again"
            )
        for training in expected:
            classes[training.replace("/training/", "/").removesuffix(".png")] = [training, pairs[training]]
    return classes


def run_tasks(store: ClassStore, runs: list[int]) -> TaskBatch:
    """The tasks of ``runs`` (0-based) from the store of :func:`run_classes`."""
    classes = torch.tensor([[run * RUN_WAYS + c for c in range(RUN_WAYS)] for run in runs], dtype=torch.long)
    first = store.offsets[classes]  # each class: its training image, then its test image
    labels = torch.arange(RUN_WAYS, device=store.device).expand(len(runs), -1).contiguous()
    return TaskBatch(store.take(first), labels, store.take(first + 1), labels.clone())


class LakeRunsLoader(EpisodeLoader):
    """The 20 runs as fixed test episodes (episode ``i`` is run ``i + 1``), shared out over the ranks.

    Args:
        store: the store of :func:`run_classes`.
        **kwargs: :class:`~datamodules.sampler.EpisodeLoader` arguments other than the sampling ones.
    """

    def __init__(self, store: ClassStore, **kwargs: Any) -> None:
        super().__init__(self._sample_one, num_episodes=NUM_RUNS, **kwargs)
        self.store = store

    def _sample_one(self, generator: torch.Generator) -> Any:  # pragma: no cover - batch() is used instead
        raise NotImplementedError("LakeRunsLoader yields whole runs")

    def batch(self, index: int) -> TaskBatch:
        # Fixed episodes are keyed (seed, stream, episode): the episode number is the run.
        return run_tasks(self.store, [keys[-1] for keys in self.episode_ids(index)])
