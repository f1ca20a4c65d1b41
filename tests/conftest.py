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
