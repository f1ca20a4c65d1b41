"""``python -m lit_meta {fit,validate,test,predict}``: LightningCLI with the defaults meta-learning needs.

* ``trainer.inference_mode: false``: evaluation adapts with gradients.
* Checkpoints: ``last.ckpt`` plus the best on the validation metric (accuracy up, or MSE down for regression),
  written atomically by Lightning; a first ``Ctrl-C`` or a ``SIGTERM`` stops after the current step and writes
  ``last.ckpt`` there (:class:`~lit_meta.callbacks.MetaCheckpoint`).
* Loggers: CSV always, Weights & Biases offline unless credentials are configured.
* ``fit`` tests the best checkpoint afterwards (``--test_after_fit false`` to skip).
* ``validate``/``test``/``predict --ckpt_path model.ckpt`` read the model (algorithm and hyper-parameters) from the
  checkpoint, so ``--model`` is not needed; flags such as ``--model.init_args.eval_inner_steps=20`` still override it,
  and a ``--model`` of another algorithm is refused.
* ``predict`` writes its results with :class:`~lit_meta.prediction.PredictionWriter` (e.g. a CSV for
  ``datamodules.PredictFolderDataModule``) and logs nothing; ``fit``/``validate`` draw one validation task with
  :class:`~lit_meta.media.MediaCallback` (W&B images, or PNGs under the run directory).
* Bad input ends in one ``error: ...`` line and exit status 2, never a traceback.
* glibc's ``malloc`` keeps freed memory for reuse (:func:`~lit_meta.allocator.tune_cpu_allocator`; faster CPU steps;
  ``LIT_META_MALLOC=system`` leaves it alone).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from jsonargparse import Namespace

import datamodules
import lit_meta
from datamodules.base import EpisodicDataModule
from datamodules.errors import LitMetaError
from lit_meta.algorithms.base import MetaLearner
from lit_meta.media import MediaCallback
from lit_meta.allocator import tune_cpu_allocator
from lit_meta.prediction import PredictionWriter, check_algorithm, checkpoint_algorithm, read_checkpoint
from lit_meta.callbacks import MetaCheckpoint, Throughput

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
            "callbacks": [MetaCheckpoint(), Throughput(), MediaCallback(), PredictionWriter()],
            "logger": [
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "lit_meta"}},
                {"class_path": "lit_meta.loggers.WandbLogger", "init_args": {"save_dir": "runs"}},
            ],
        }
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}))
        super().__init__(
            MetaLearner,
            EpisodicDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=OneLineErrorParser,
            trainer_defaults=trainer_defaults,
            seed_everything_default=0,
            save_config_callback=ConfigToLoggers,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    # ---------------------------------------------------------------------------------- the model from --ckpt_path
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        self.config = parser.parse_args(model_from_checkpoint(argv))

    def _parse_ckpt_path(self) -> None:
        # Lightning re-applies the checkpoint's hyper-parameters after parsing, over the user's own flags, and only
        # for checkpoints written through the CLI. Evaluation commands got them before parsing instead
        # (model_from_checkpoint), so flags win; here only check that the model that came out can load it.
        subcommand = self.config.get("subcommand")
        if subcommand not in EVAL_COMMANDS:
            return super()._parse_ckpt_path()
        path = self.config[subcommand].get("ckpt_path")
        model = self.config[subcommand].get("model")
        class_path = getattr(model, "class_path", None) or (model.get("class_path") if isinstance(model, dict) else None)
        if path and class_path and Path(path).is_file():
            requested = _model_class(class_path)
            if requested is not None:
                check_algorithm(checkpoint_algorithm(read_checkpoint(path)), requested, f"checkpoint {path}", relation="exact")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            # Prediction has no metrics to log: no run directory, no W&B run (``--trainer.logger`` still works).
            parser.set_defaults({"trainer.logger": False})
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="fit only: then test the best checkpoint (or the last one)."
        )
        parser.add_argument(
            "--media",
            type=bool,
            default=True,
            help="draw one validation task per validation (lit_meta.media.MediaCallback): W&B images, or PNGs in the run directory.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not self._get(self.config, "media", True):
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, MediaCallback)]
        return trainer

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit", True) or self.trainer.fast_dev_run:
            return
        ckpt = self.trainer.checkpoint_callback
        ckpt_path = "best" if ckpt is not None and ckpt.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


EVAL_COMMANDS = ("validate", "test", "predict")


def _option_value(argv: list[str], name: str) -> str | None:
    """The last value given to ``--name value`` or ``--name=value`` in ``argv``."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def _model_class(name: str) -> type | None:
    """The :class:`MetaLearner` subclass a ``--model`` value names (``MAML``, ``lit_meta.MAML``, a full path)."""
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(__import__(module_name, fromlist=[attr]), attr, None)
        except ImportError:
            return None
        return cls if isinstance(cls, type) and issubclass(cls, MetaLearner) else None
    pending, seen = [MetaLearner], set()
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                pending.append(sub)
    return None


def _config_model_class(value: str) -> type | None:
    """The algorithm a ``--config`` (file or YAML string) names under ``model``, when it can be read."""
    import yaml

    try:
        path = Path(value)
        data = yaml.safe_load(path.read_text() if path.is_file() else value)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    class_path = model.get("class_path") if isinstance(model, dict) else model if isinstance(model, str) else None
    return _model_class(class_path) if isinstance(class_path, str) else None


def model_from_checkpoint(argv: list[str]) -> list[str]:
    """``argv`` with the checkpoint's model added, for ``validate``/``test``/``predict --ckpt_path``.

    The checkpoint records its algorithm (``MetaLearner.on_save_checkpoint``, or ``_class_path`` when trained through
    the CLI) and its hyper-parameters, the backbone as a ``{class_path, init_args}`` record: together a complete
    ``--model``. It goes after the last ``--config`` (the checkpoint describes the trained model better than a config,
    e.g. the default job's) and before every other argument, so ``--model.init_args.*`` flags override it. A
    ``--model`` or a config naming another algorithm is refused with a one-line error.
    """
    if not argv or argv[0] not in EVAL_COMMANDS:
        return argv
    path = _option_value(argv, "--ckpt_path")
    if not path or path in ("best", "last", "hpc", "registry") or "://" in path:
        return argv
    checkpoint = read_checkpoint(path)
    recorded = checkpoint_algorithm(checkpoint)
    explicit = _option_value(argv, "--model")
    if explicit and not explicit.lstrip().startswith(("{", "class_path")):
        requested = _model_class(explicit.strip())
        if requested is not None:
            check_algorithm(recorded, requested, f"checkpoint {path}", relation="exact")
    position = 1
    for i, arg in enumerate(argv):
        config = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else arg.partition("=")[2] if arg.startswith("--config=") else None
        if config is None:
            continue
        position = i + (2 if "=" not in arg else 1)
        requested = None if Path(config) == DEFAULT_CONFIG else _config_model_class(config)
        if requested is not None:
            check_algorithm(recorded, requested, f"checkpoint {path}", relation="exact")
    if recorded is None:
        return argv
    init_args = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    model = json.dumps({"class_path": recorded, "init_args": init_args}, default=str)
    return [*argv[:position], "--model", model, *argv[position:]]


def _user_error(err: BaseException) -> BaseException | None:
    """The :class:`LitMetaError` behind ``err`` (jsonargparse and Lightning wrap what they catch), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LitMetaError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def with_default_config(args: list[str]) -> list[str]:
    """``fit``/``validate``/``test`` with neither a config nor a model/data choice run the default job.

    The default (``lit_meta/default.yaml``: ProtoNet on the Omniglot shipped in the package, tested on Lake's runs)
    is added as an explicit ``--config`` rather than as a parser default, so that it never leaks settings into a
    user's own config.
    """
    if not args or args[0] not in ("fit", "validate", "test"):
        return args
    chosen = any(a in ("-c", "--config", "--model", "--data") or a.startswith(("--config=", "--model=", "--data=")) for a in args[1:])
    return args if chosen else [args[0], "--config", str(DEFAULT_CONFIG), *args[1:]]


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m lit_meta`` and the ``lit-meta`` script."""
    # The command line owns its process, so it may change how the process allocates (see lit_meta.allocator).
    tune_cpu_allocator()
    args = with_default_config(list(sys.argv[1:] if args is None else args))
    try:
        MetaCLI(args=args)
    except Exception as err:
        cause = _user_error(err)
        if cause is None:
            raise
        sys.stderr.write(f"error: {cause}\n")
        sys.exit(2)
