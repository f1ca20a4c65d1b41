"""The episodic LightningDataModule that every dataset subclasses.

Training data comes in one of two forms (``train_mode``): N-way K-shot episodes (the default), or ordinary
mini-batches of labelled examples over the union of the training classes (``batches``), for the transfer-learning
baselines that pre-train a classifier on all base classes (:class:`~lit_meta.algorithms.pretrain.Pretrain`).
Validation and test are the fixed few-shot episodes in both, so checkpoints are chosen on few-shot accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from datamodules.augmentation import Augmentation, AugmentedBatch
from datamodules.errors import ConfigError, require_positive
from datamodules.sampler import STREAMS, BatchLoader, EpisodeLoader, Task
from datamodules.task_batch import ExampleBatch, TaskBatch


#: What the training loader serves: episodes, or mini-batches of labelled examples over all training classes.
TRAIN_MODES = ("episodes", "batches")

#: The evaluation splits each Lightning stage runs (fit validates).
EVALUATION_SPLITS = {"fit": ("val",), "validate": ("val",), "test": ("test",), "predict": ()}


@dataclass(frozen=True)
class EpisodeShape:
    """N-way K-shot Q-query (for regression ``ways`` is 1 and ``shots``/``queries`` count points)."""

    ways: int
    shots: int
    queries: int


class EpisodicDataModule(pl.LightningDataModule):
    """Base class of the episodic datamodules: N-way K-shot Q-query tasks in meta-batches of ``T``.

    A subclass implements :meth:`sample_task` (one task of a split from a generator) and, where it has classes,
    :meth:`num_classes`; the base class builds the seeded, rank-aware, resumable loaders.

    Args:
        ways: classes per task at validation and test (``N``).
        shots: labelled examples per class in the support set (``K``).
        queries: examples per class in the query set (``Q``).
        meta_batch_size: tasks per training batch (``T``); under DDP this is per rank, so the effective meta-batch
            is ``meta_batch_size * world_size``.
        train_batches: training batches per epoch (on each rank).
        val_episodes: fixed validation episodes (shared out over the ranks).
        test_episodes: fixed test episodes (shared out over the ranks).
        eval_meta_batch_size: tasks per evaluation batch.
        train_ways, train_shots, train_queries: the training episodes' shape where it differs from evaluation
            (e.g. 60-way training for Prototypical Networks); ``None`` means the same as evaluation.
        seed: seeds every episode (see :mod:`datamodules.sampler`).
        train_mode: ``"episodes"`` (the default) or ``"batches"``: mini-batches of ``batch_size`` labelled
            examples, an epoch being one permutation of every training example (``train_batches`` and the episode
            settings then apply to validation and test only); labels index the union of the training classes.
        batch_size: examples per training batch with ``train_mode: batches`` (per rank under DDP).
    """

    #: ``"classification"`` or ``"regression"``: decides the metric the best checkpoint is chosen on.
    task_type = "classification"

    def __init__(
        self,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        meta_batch_size: int = 32,
        train_batches: int = 1000,
        val_episodes: int = 200,
        test_episodes: int = 600,
        eval_meta_batch_size: int = 16,
        train_ways: int | None = None,
        train_shots: int | None = None,
        train_queries: int | None = None,
        seed: int = 0,
        train_mode: str = "episodes",
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        if train_mode not in TRAIN_MODES:
            raise ConfigError(f"train_mode must be one of {', '.join(TRAIN_MODES)}, got {train_mode!r}")
        require_positive(batch_size=batch_size)
        require_positive(
            ways=ways,
            shots=shots,
            queries=queries,
            meta_batch_size=meta_batch_size,
            train_batches=train_batches,
            val_episodes=val_episodes,
            test_episodes=test_episodes,
            eval_meta_batch_size=eval_meta_batch_size,
        )
        for name, value in (("train_ways", train_ways), ("train_shots", train_shots), ("train_queries", train_queries)):
            if value is not None:
                require_positive(**{name: value})
        self.ways, self.shots, self.queries = ways, shots, queries
        self.meta_batch_size = meta_batch_size
        self.train_batches = train_batches
        self.val_episodes = val_episodes
        self.test_episodes = test_episodes
        self.eval_meta_batch_size = eval_meta_batch_size
        self.train_ways = train_ways or ways
        self.train_shots = train_shots or shots
        self.train_queries = train_queries or queries
        self.seed = seed
        self.train_mode = train_mode
        self.batch_size = batch_size
        self._train_loader: EpisodeLoader | BatchLoader | None = None
        self._restored_train_stream: dict[str, Any] | None = None
        #: Per-image augmentation of the training batches (set by datamodules whose inputs are images).
        self.augmentation: Augmentation | None = None

    # ----------------------------------------------------------------------------------------------- subclass API
    def sample_task(self, split: str, generator: torch.Generator) -> Task:
        """Draw one task of ``split`` (``train``/``val``/``test``) using only ``generator`` for randomness.

        Returns ``(support_x, support_y, query_x, query_y)`` with support examples ordered by class.
        """
        raise NotImplementedError

    def sample_tasks(self, split: str, generators: list[torch.Generator]) -> TaskBatch:
        """Draw a meta-batch, task ``t`` from ``generators[t]`` only; must equal stacking :meth:`sample_task` calls.

        Override to vectorize across tasks (the image datamodules gather a whole meta-batch at once).
        """
        return TaskBatch.stack([self.sample_task(split, g) for g in generators])

    def num_classes(self, split: str) -> int | None:
        """Classes available in ``split`` (``None`` where tasks are not drawn from classes)."""
        return None

    def class_sizes(self, split: str) -> dict[str, int] | None:
        """Examples per class name in ``split``, to check ``shots + queries`` (``None`` to skip the check)."""
        return None

    def num_examples(self, split: str) -> int | None:
        """Labelled examples in ``split`` for ``train_mode: batches`` (``None``: the dataset has no such examples)."""
        return None

    def examples(self, split: str, index: torch.Tensor) -> ExampleBatch:
        """The examples of ``split`` at ``index`` (``long [B]``, in ``range(num_examples(split))``), labelled with
        their class's index among the split's classes."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------- episodes
    def shape(self, split: str) -> EpisodeShape:
        if split == "train":
            return EpisodeShape(self.train_ways, self.train_shots, self.train_queries)
        return EpisodeShape(self.ways, self.shots, self.queries)

    def check_split(self, split: str) -> None:
        """Raise a one-line :class:`ConfigError` when ``split`` cannot supply the episodes asked for."""
        shape = self.shape(split)
        available = self.num_classes(split)
        if available is not None and shape.ways > available:
            raise ConfigError(
                f"{type(self).__name__}: {shape.ways}-way tasks need {shape.ways} classes but the {split} split has "
                f"{available}; lower {'train_ways' if split == 'train' else 'ways'}"
            )
        sizes = self.class_sizes(split)
        if sizes:
            need = shape.shots + shape.queries
            name, smallest = min(sizes.items(), key=lambda item: item[1])
            if smallest < need:
                raise ConfigError(
                    f"{type(self).__name__}: class '{name}' of the {split} split has {smallest} examples, fewer than "
                    f"shots + queries = {need}; lower shots/queries"
                )

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def num_episodes(self, split: str) -> int:
        """The number of fixed episodes of ``val`` or ``test``."""
        return self.val_episodes if split == "val" else self.test_episodes

    def more_episodes(self, split: str, world_size: int) -> str:
        """How to give each of ``world_size`` processes an episode of ``split`` (the fix :meth:`setup` names)."""
        option = "val_episodes" if split == "val" else "test_episodes"
        return f"raise {option} to at least {world_size} (they are shared out over the processes), or use fewer devices"

    def setup(self, stage: str | None = None) -> None:
        """Refuse, on every process, a distributed evaluation in which some process would get no episode.

        Fixed evaluation episodes are dealt out round-robin over the processes (see :mod:`datamodules.sampler`):
        with fewer episodes than processes, a process gets none, computes no metric, and the others wait forever
        for it in the metric's all-gather.

        Raises:
            ConfigError: naming the split, the counts and the fix.
        """
        _, world_size = self._rank()
        if world_size <= 1:
            return
        for split in EVALUATION_SPLITS.get(stage, ("val", "test")) if stage else ("val", "test"):
            episodes = self.num_episodes(split)
            if episodes < world_size:
                raise ConfigError(
                    f"{type(self).__name__}: {episodes} {split} episodes for {world_size} processes: "
                    f"{world_size - episodes} of them would get none and the evaluation would never end; "
                    f"{self.more_episodes(split, world_size)}"
                )

    def episode_loader(self, split: str) -> EpisodeLoader:
        """The loader of ``split``: a fresh stream per epoch for training, fixed episodes otherwise."""
        self.check_split(split)
        rank, world_size = self._rank()

        def sample(generator: torch.Generator) -> Task:
            return self.sample_task(split, generator)

        def sample_batch(generators: list[torch.Generator]) -> TaskBatch:
            return self.sample_tasks(split, generators)

        if split == "train":
            return EpisodeLoader(
                sample,
                meta_batch_size=self.meta_batch_size,
                seed=self.seed,
                stream=STREAMS[split],
                num_batches=self.train_batches,
                rank=rank,
                world_size=world_size,
                sample_batch=sample_batch,
                augmentation=self.augmentation,
            )
        return EpisodeLoader(
            sample,
            meta_batch_size=self.eval_meta_batch_size,
            seed=self.seed,
            stream=STREAMS[split],
            num_episodes=self.val_episodes if split == "val" else self.test_episodes,
            rank=rank,
            world_size=world_size,
            sample_batch=sample_batch,
        )

    def batch_loader(self, split: str = "train") -> BatchLoader:
        """Mini-batches of ``batch_size`` labelled examples of ``split``, a new permutation of all of them per epoch."""
        total = self.num_examples(split)
        if not total:
            raise ConfigError(
                f"{type(self).__name__} has no labelled examples to serve in batches: use train_mode: episodes"
            )
        rank, world_size = self._rank()

        def take(index: torch.Tensor) -> ExampleBatch:
            return self.examples(split, index)

        return BatchLoader(
            take,
            num_examples=total,
            batch_size=self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            augmentation=self.augmentation if split == "train" else None,
        )

    def train_dataloader(self) -> EpisodeLoader | BatchLoader:
        loader = self.batch_loader("train") if self.train_mode == "batches" else self.episode_loader("train")
        if self._restored_train_stream is not None:
            loader.load_state_dict(self._restored_train_stream)
            self._restored_train_stream = None
        self._train_loader = loader
        return loader

    # The training stream's position travels in the datamodule's own checkpoint entry. Lightning also saves the
    # loader's state, but hands it back only when it resumes mid-epoch or under ``max_steps``; from a checkpoint
    # written at an epoch's end under ``max_epochs`` (best and last, in every shipped config) it does not, and the
    # resumed run would replay epoch 0's episodes. Loading the same state twice (mid-epoch) is harmless.
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is None:
            return {}
        return {"train_stream": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_train_stream = state_dict.get("train_stream")

    def val_dataloader(self) -> EpisodeLoader:
        return self.episode_loader("val")

    def test_dataloader(self) -> EpisodeLoader:
        return self.episode_loader("test")

    # -------------------------------------------------------------------------------------------- device side
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, (TaskBatch, ExampleBatch, AugmentedBatch)):
            return batch
        prepared = self.prepare_batch(batch)
        trainer = getattr(self, "trainer", None)
        if prepared is not batch and trainer is not None:
            # Lightning converts the inputs to a "-true" precision (16-true, bf16-true, 64-true) before the transfer,
            # when images are still uint8; the floats made here need the same conversion.
            prepared = trainer.precision_plugin.convert_input(prepared)
        return prepared

    def prepare_batch(self, batch: TaskBatch | ExampleBatch | AugmentedBatch) -> TaskBatch | ExampleBatch:
        """Turn ``uint8`` images into float in ``[0, 1]`` on the batch's device (identity for float inputs), then
        augment a training batch's images with the parameters it carries."""
        if isinstance(batch, AugmentedBatch):
            return batch.applied(self.prepare_batch(batch.batch))
        if isinstance(batch, ExampleBatch):
            if batch.x.dtype != torch.uint8:
                return batch
            return ExampleBatch(batch.x.float().div_(255.0), batch.y)
        if batch.support_x.dtype != torch.uint8:
            return batch
        return TaskBatch(
            batch.support_x.float().div_(255.0), batch.support_y, batch.query_x.float().div_(255.0), batch.query_y
        )
