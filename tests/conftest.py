"""Shared test settings: W&B off, few threads, where the real data is."""

import os
from pathlib import Path

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")
# Inherited by every process a test starts (the command line, benchmarks, DDP ranks): see torch.set_num_threads below.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests use tiny models, where intra-op threads cost more than they give (and oversubscribe the 2 CI cores when
# a test starts worker processes).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


REQUIRE_DATA = _flag("LIT_META_REQUIRE_DATA")
#: dataset folder -> (its name, what must be in it as a zip or a folder, the command that gets it from the repo root)
REAL_DATA = {
    "omniglot": (
        "Omniglot",
        ("images_background", "images_evaluation"),
        "python -m lit_meta download omniglot --root data/omniglot",
    ),
}


def data_roots() -> list[Path]:
    """Where the tests look for real data: ``$LIT_META_DATA`` alone when it is set, else ``<repo>/data``, then
    ``shared/data`` beside the checkout (several checkouts reading one copy)."""
    if os.environ.get("LIT_META_DATA"):
        return [Path(os.environ["LIT_META_DATA"]).expanduser()]
    return [REPO / "data", REPO.parent / "shared" / "data"]


def real_data(dataset: str) -> Path:
    """The folder of ``dataset`` (a key of :data:`REAL_DATA`) under the first data root that has all of it.

    Where none has it the test is skipped, with the command that gets the data; ``LIT_META_REQUIRE_DATA=1`` (CI,
    which always has the data) fails it instead, so a misplaced data folder cannot pass as skipped.
    """
    name, needed, command = REAL_DATA[dataset]
    for root in data_roots():
        folder = root / dataset
        if all((folder / part).is_dir() or (folder / f"{part}.zip").is_file() for part in needed):
            return folder
    looked = " or ".join(str(root / dataset) for root in data_roots())
    msg = f"needs the full {name}, not in {looked}: run `{command}` in {REPO} (or set LIT_META_DATA=<folder of {dataset}/>)"
    if REQUIRE_DATA:
        pytest.fail(msg + " (LIT_META_REQUIRE_DATA=1)", pytrace=False)
    pytest.skip(msg)


@pytest.fixture
def omniglot_root() -> Path:
    """The full Omniglot (official zips or folders): see :func:`real_data`."""
    return real_data("omniglot")


REQUIRE_L2L = _flag("LIT_META_REQUIRE_L2L")


def import_learn2learn():
    """Import the optional learn2learn, or skip the test with the reason (fail instead when ``LIT_META_REQUIRE_L2L=1``,
    as in CI, so a broken install cannot pass as skipped)."""
    try:
        import learn2learn
    except Exception as exc:  # a broken install (e.g. uncompiled Cython) is as unusable as a missing one
        msg = f"learn2learn is not importable ({type(exc).__name__}: {exc}); install it with scripts/install_learn2learn.sh"
        if REQUIRE_L2L:
            pytest.fail(msg + " (LIT_META_REQUIRE_L2L=1)", pytrace=False)
        pytest.skip(msg)
    return learn2learn


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


def sinusoid_maml_run(root: Path, max_steps: int, callbacks: list, validate: bool = False, by_epochs: bool = False):
    """``(model, datamodule, trainer)`` of a tiny seeded MAML sinusoid run, 3 steps an epoch: for resume tests.

    ``by_epochs`` stops the run with ``max_epochs`` (``max_steps`` must then be a whole number of epochs), as every
    shipped config does; Lightning restores loops differently in the two modes.
    """
    import lightning.pytorch as pl

    from datamodules import SinusoidDataModule
    from lit_meta import MAML, SinusoidMLP

    pl.seed_everything(0)
    model = MAML(SinusoidMLP(hidden=(16, 16)), inner_lr=0.01, inner_steps=1)
    dm = SinusoidDataModule(shots=5, queries=5, meta_batch_size=4, train_batches=3, val_episodes=4, test_episodes=4)
    trainer = pl.Trainer(
        max_steps=-1 if by_epochs else max_steps,
        max_epochs=max_steps // 3 if by_epochs else None,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        limit_val_batches=None if validate else 0,
        num_sanity_val_steps=0,
        default_root_dir=root,
        accelerator="cpu",
    )
    return model, dm, trainer


def cpu_trainer(**kwargs):
    """A quiet single-CPU ``Trainer`` for tests (gradients in evaluation, no logger or checkpoints); ``kwargs`` override."""
    import lightning.pytorch as pl

    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def random_images(channels: int = 3, size: int = 12, **kwargs):
    """A :class:`~datamodules.ClassImageDataModule` of five classes of six random ``uint8`` images per split (a
    different draw per split), 3-way 1-shot 2-query tasks in meta-batches of 2 and 3 training batches by default."""
    from datamodules import ClassImageDataModule, ClassStore
    from datamodules.images import SPLITS

    class RandomImages(ClassImageDataModule):
        def load_split(self, split):
            g = torch.Generator().manual_seed(SPLITS.index(split))
            images = torch.randint(0, 256, (30, channels, size, size), generator=g, dtype=torch.uint8)
            return ClassStore(images, [6] * 5, [f"{split}{c}" for c in range(5)])

    options = dict(ways=3, shots=1, queries=2, meta_batch_size=2, train_batches=3, val_episodes=4, test_episodes=4, eval_meta_batch_size=2)
    options.update(kwargs)
    return RandomImages(root=None, image_size=size, **options)
