"""Shared test settings: W&B off, few threads, the real data beside the checkout."""

import os
from pathlib import Path

os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests use tiny models, where intra-op threads cost more than they give (and oversubscribe the 2 CI cores when
# a test starts worker processes).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (real Omniglot and splits); CI has it at the same relative path."""
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read the real data from ../shared/data")
    return SHARED_DATA


REQUIRE_L2L = os.environ.get("LIT_META_REQUIRE_L2L", "").strip().lower() in {"1", "true", "yes"}


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
