"""Weights & Biases that never blocks: offline without credentials, a bounded start-up timeout."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_credentials_configured() -> bool:
    """True when an API key is in the environment or in ``~/.netrc`` (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that runs offline when no credentials are configured.

    Without this, ``wandb`` with no network waits at a login prompt forever, or for ~100 s with a key. An explicit
    ``WANDB_MODE`` (``online``, ``offline``, ``disabled``) always wins; ``offline=None`` means "decide from the
    credentials". Offline runs can be uploaded later with ``wandb sync <save_dir>/wandb/offline-run-*``.

    Args:
        project: W&B project.
        name: run name.
        tags: run tags.
        save_dir: where W&B files go.
        offline: force offline (``True``) or online (``False``); ``None`` decides automatically.
        init_timeout: seconds to wait for the W&B service at start-up.
        **kwargs: passed to Lightning's ``WandbLogger`` / ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "lit_meta",
        name: str | None = None,
        tags: list[str] | None = None,
        save_dir: str = "runs",
        offline: bool | None = None,
        init_timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        mode = os.environ.get("WANDB_MODE")
        if mode is None:
            offline = not wandb_credentials_configured() if offline is None else offline
            mode = "offline" if offline else "online"
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        import wandb

        settings = kwargs.pop("settings", None) or wandb.Settings(init_timeout=init_timeout)
        super().__init__(
            project=project,
            name=name,
            tags=tags,
            save_dir=save_dir,
            offline=mode in ("offline", "dryrun"),
            mode=mode,
            settings=settings,
            **kwargs,
        )
