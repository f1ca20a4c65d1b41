"""``python -m lit_meta {fit,validate,test,predict}``: LightningCLI with the defaults meta-learning needs.

* ``trainer.inference_mode: false``: evaluation adapts with gradients.
* Checkpoints: ``last.ckpt`` plus the best on the validation metric (accuracy up, or MSE down for regression),
  written atomically by Lightning.
* Loggers: CSV always, Weights & Biases offline unless credentials are configured.
* ``fit`` tests the best checkpoint afterwards (``--test_after_fit false`` to skip).
* Bad input ends in one ``error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import datamodules
import lit_meta
from datamodules.base import EpisodicDataModule
from datamodules.errors import LitMetaError
from lit_meta.algorithms.base import MetaLearner

DEFAULT_CONFIG = Path(__file__).parent / "default.yaml"


_NOISE = re.compile(
    r"^(Does not validate against|Subtypes:|Errors:|Given value|Expected a <class 'NoneType'>|Expected a path but)"
)


def _one_line(message: str) -> str:
    """The telling part of a (possibly nested, multi-line) jsonargparse message, as one line.

    jsonargparse explains a bad ``--model``/``--data`` value as a union of alternatives (the class or ``None``);
    the useful part is the innermost reason given for the class branch, e.g. "Option 'x' is not accepted".
    """
    lines = [line.strip(" -\t") for line in str(message).splitlines() if line.strip(" -\t")]
    if not lines:
        return "invalid arguments"
    head, reasons = lines[0], [line for line in lines[1:] if not _NOISE.match(line)]
    if not reasons:
        return head
    reason = " ".join(reasons)
    return f"{head} {reason}" if head.endswith(":") else f"{head}: {reason}"


class OneLineErrorParser(LightningArgumentParser):
    """Argument parser that reports a bad config or flag in one line and exits with status 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        if os.environ.get("LIT_META_DEBUG"):
            sys.stderr.write(f"{message}\n")
        sys.stderr.write(f"error: {_one_line(message)}\n")
        sys.exit(2)


class MetaCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` keeping ``last.ckpt`` and the best checkpoint on the datamodule's validation metric."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("save_top_k", 1)
        super().__init__(**kwargs)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.monitor is None:
            dm = trainer.datamodule
            regression = getattr(dm, "task_type", "classification") == "regression"
            self.monitor = "val/mse" if regression else "val/acc"
            self.mode = "min" if regression else "max"
            self.kth_value = torch.tensor(float("inf") if regression else float("-inf"))
            self.filename = "best-{epoch}-{step}"
            self.auto_insert_metric_name = False
        super().setup(trainer, pl_module, stage)


class ConfigToLoggers(SaveConfigCallback):
    """Save ``config.yaml`` beside the logs and make the full config the W&B run's config."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from lit_meta.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.clone().as_dict(), allow_val_change=True)


class MetaCLI(LightningCLI):
    """The lit_meta command line."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        trainer_defaults = {
            "inference_mode": False,
            "callbacks": [MetaCheckpoint()],
            "logger": [
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "lit_meta"}},
                {"class_path": "lit_meta.loggers.WandbLogger", "init_args": {"save_dir": "runs"}},
            ],
        }
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}))
        parser_kwargs = {"default_config_files": [str(DEFAULT_CONFIG)]} if DEFAULT_CONFIG.exists() else {}
        super().__init__(
            MetaLearner,
            EpisodicDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=OneLineErrorParser,
            parser_kwargs={"fit": parser_kwargs, "validate": {}, "test": {}, "predict": {}},
            trainer_defaults=trainer_defaults,
            seed_everything_default=0,
            save_config_callback=ConfigToLoggers,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="fit only: then test the best checkpoint (or the last one)."
        )

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit", True) or self.trainer.fast_dev_run:
            return
        ckpt = self.trainer.checkpoint_callback
        ckpt_path = "best" if ckpt is not None and ckpt.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def _user_error(err: BaseException) -> BaseException | None:
    """The :class:`LitMetaError` behind ``err`` (jsonargparse and Lightning wrap what they catch), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LitMetaError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m lit_meta`` and the ``lit-meta`` script."""
    try:
        MetaCLI(args=args)
    except Exception as err:
        cause = _user_error(err)
        if cause is None:
            raise
        sys.stderr.write(f"error: {cause}\n")
        sys.exit(2)
