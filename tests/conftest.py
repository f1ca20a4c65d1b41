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


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
