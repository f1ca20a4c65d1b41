"""``python -m lit_meta {fit,validate,test,predict,download}``: LightningCLI with the defaults meta-learning needs.

* ``trainer.inference_mode: false``: evaluation adapts with gradients.
* Checkpoints: ``last.ckpt`` plus the best on the validation metric (accuracy up, or MSE down for regression),
  written atomically by Lightning; a first ``Ctrl-C`` or a ``SIGTERM`` stops after the current step and writes
  ``last.ckpt`` there (:class:`~lit_meta.callbacks.MetaCheckpoint`).
* Loggers: CSV always, Weights & Biases offline unless credentials are configured.
* Progress: Lightning's bar on a terminal; when standard output is a file or a pipe, one line every
  ``log_every_n_steps`` steps and one per validation and test (:class:`~lit_meta.callbacks.LineProgress`).
* ``fit`` tests the best checkpoint afterwards (``--test_after_fit false`` to skip).
* ``validate``/``test``/``predict --ckpt_path model.ckpt`` read the model (algorithm and hyper-parameters) from the
  checkpoint, so ``--model`` is not needed; flags such as ``--model.init_args.eval_inner_steps=20`` still override it,
  and a ``--model`` of another algorithm is refused.
* ``predict`` writes its results with :class:`~lit_meta.prediction.PredictionWriter` (e.g. a CSV for
  ``datamodules.PredictFolderDataModule``) and logs nothing; ``fit``/``validate`` draw one validation task with
  :class:`~lit_meta.media.MediaCallback` (W&B images, or PNGs under the run directory).
* ``download omniglot --root data/omniglot`` fetches the official Omniglot archives (plain ``argparse``, handled
  before LightningCLI is built).
* Bad input ends in one ``error: ...`` line and exit status 2, never a traceback (``LIT_META_DEBUG=1`` prints the
  traceback too): lit_meta's own errors, jsonargparse's, what Lightning and torch raise while validating the
  Trainer's arguments, the optimizer's and ``--ckpt_path``, and a checkpoint that does not fit the model.
* glibc's ``malloc`` keeps freed memory for reuse (:func:`~lit_meta.allocator.tune_cpu_allocator`; faster CPU steps;
  ``LIT_META_MALLOC=system`` leaves it alone).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from datamodules.base import EpisodicDataModule
from datamodules.errors import ConfigError, DataError, LitMetaError
from lit_meta.algorithms.base import MetaLearner
from lit_meta.allocator import tune_cpu_allocator
from lit_meta.callbacks import LineProgress, MetaCheckpoint, Throughput
from lit_meta.checkpoints import check_algorithm, checkpoint_algorithm, read_checkpoint, resolve_algorithm
from lit_meta.media import MediaCallback
from lit_meta.prediction import PredictionWriter

DEFAULT_CONFIG = Path(__file__).parent / "default.yaml"
#: ``predict``'s defaults (no logger: prediction has no metrics), read as a default config file of that subcommand.
PREDICT_DEFAULTS = Path(__file__).parent / "predict_defaults.yaml"

EVAL_COMMANDS = ("validate", "test", "predict")
#: ``--ckpt_path`` values that Lightning resolves itself rather than naming a file.
CKPT_KEYWORDS = ("best", "last", "hpc", "registry")

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


def _flatten(text: str, limit: int = 600) -> str:
    """``text`` on one line (whitespace runs collapsed), cut at about ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


def _debug() -> bool:
    return bool(os.environ.get("LIT_META_DEBUG"))


class OneLineErrorParser(LightningArgumentParser):
    """Argument parser that reports a bad config or flag in one line and exits with status 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        if _debug():
            sys.stderr.write(f"{message}\n")
        sys.stderr.write(f"error: {_flatten(_one_line(message))}\n")
        sys.exit(2)


class ConfigToLoggers(SaveConfigCallback):
    """Save ``config.yaml`` beside the logs and make the full config the W&B run's config."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from lit_meta.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.clone().as_dict(), allow_val_change=True)


def _section(config: Namespace) -> Namespace:
    """The part of a parsed config that belongs to its subcommand (all of it when there is none)."""
    subcommand = config.get("subcommand")
    return config[subcommand] if subcommand else config


def _class_path(model: Any) -> str | None:
    """The ``class_path`` of a parsed ``model`` value (a Namespace, a dict, or a plain string)."""
    if isinstance(model, str):
        return model
    if isinstance(model, (dict, Namespace)):
        value = model.get("class_path")
        return value if isinstance(value, str) else None
    return None


class MetaCLI(LightningCLI):
    """The lit_meta command line.

    Built on LightningCLI's public hooks only (``parse_arguments``, ``before_instantiate_classes``,
    ``instantiate_trainer``, ``after_fit``, ``parser_kwargs``), so a Lightning release that reorganises the CLI's
    private methods does not change what these commands do.
    """

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
        #: The callbacks of every run; instantiate_trainer leaves MediaCallback out on --media false and adds
        #: LineProgress when standard output is not a terminal.
        self.default_callbacks = list(trainer_defaults["callbacks"])
        # Per-subcommand parser arguments are LightningCLI's documented way to give one subcommand its own defaults.
        parser_kwargs = {
            "epilog": "other commands: download (fetch a dataset's official files; see python -m lit_meta download --help)",
            "predict": {"default_config_files": [str(PREDICT_DEFAULTS)]},
        }
        for key, value in kwargs.pop("parser_kwargs", {}).items():
            parser_kwargs[key] = {**parser_kwargs.get(key, {}), **value} if isinstance(value, dict) else value
        self._held_ckpt_path: str | None = None
        super().__init__(
            MetaLearner,
            EpisodicDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=OneLineErrorParser,
            parser_kwargs=parser_kwargs,
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
        self._check_ckpt_path()

    def _check_ckpt_path(self) -> None:
        """Refuse a ``--ckpt_path`` that cannot be what the command needs, before anything is built or written."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        path = section.get("ckpt_path")
        if not path:
            return
        if path == "best" or (path == "last" and subcommand in EVAL_COMMANDS):
            # Lightning resolves these from a fit in the same process; a fresh command has none, and "last" would
            # evaluate the untrained model without a word.
            raise ConfigError(
                f"--ckpt_path {path} refers to a fit in the same process; give the checkpoint's file, e.g. "
                f"--ckpt_path runs/lit_meta/version_0/checkpoints/{'last' if path == 'last' else 'best-...'}.ckpt"
            )
        if path in CKPT_KEYWORDS or "://" in str(path):
            return
        checkpoint = read_checkpoint(path)
        recorded = checkpoint_algorithm(checkpoint)
        if recorded is None:
            raise DataError(
                f"checkpoint {path} records no lit_meta algorithm: it was not written by a lit_meta model "
                "(MetaLearner subclass); train one with python -m lit_meta fit"
            )
        requested = _model_class(_class_path(section.get("model")) or "")
        if subcommand == "fit":
            recorded_cls = resolve_algorithm(recorded)
            if requested is not None and recorded_cls is not requested:
                raise ConfigError(
                    f"checkpoint {path} was written by {recorded_cls.__name__}, not {requested.__name__}: fit resumes a "
                    f"run, so give the config it was trained with (its model is {recorded})"
                )
            return
        if requested is not None:
            check_algorithm(recorded, requested, f"checkpoint {path}", relation="exact")
        # Lightning re-applies a checkpoint's hyper-parameters right after parse_arguments, over the user's own
        # flags; evaluation commands already got them before parsing (model_from_checkpoint), so that flags win.
        # The path is held back from that step and given back in before_instantiate_classes.
        self._held_ckpt_path = path
        section.ckpt_path = None

    def before_instantiate_classes(self) -> None:
        if self._held_ckpt_path is not None:
            _section(self.config).ckpt_path = self._held_ckpt_path
            self._held_ckpt_path = None

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

    # ------------------------------------------------------------------------------------------------- the trainer
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        section = _section(self.config_init)
        trainer_config = section.get("trainer") or {}
        callbacks = list(self.default_callbacks)
        if not section.get("media", True):
            callbacks = [c for c in callbacks if not isinstance(c, MediaCallback)]
        given = trainer_config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if trainer_config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            # Lightning's bar redraws in place, which a log file keeps as ~300 bytes per step: lines instead.
            if not _is_terminal(sys.stdout):
                callbacks.append(LineProgress())
        self.trainer_defaults["callbacks"] = callbacks
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError, ImportError) as err:
            # The Trainer's constructor only validates and stores its arguments (devices, accelerator, strategy,
            # precision, durations, limits) and imports what they need: what it raises is about the --trainer values.
            raise ConfigError(f"--trainer: {_flatten(err)}") from err
        check_trainer(trainer)
        return trainer

    def after_fit(self) -> None:
        if not _section(self.config).get("test_after_fit", True) or self.trainer.fast_dev_run:
            return
        ckpt = self.trainer.checkpoint_callback
        ckpt_path = "best" if ckpt is not None and ckpt.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def check_trainer(trainer: Trainer) -> None:
    """Refuse the ``--trainer`` values that Lightning accepts but that fail (or mean nothing) once the run is under way.

    Raises:
        ConfigError: ``check_val_every_n_epoch`` or ``log_every_n_steps`` is not a positive integer.
    """
    every = trainer.check_val_every_n_epoch
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ConfigError(f"--trainer.check_val_every_n_epoch must be a positive integer or null, got {every!r}")
    if not isinstance(trainer.log_every_n_steps, int) or trainer.log_every_n_steps < 1:
        raise ConfigError(f"--trainer.log_every_n_steps must be a positive integer, got {trainer.log_every_n_steps!r}")


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
    if not name:
        return None
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
    if not path or path in CKPT_KEYWORDS or "://" in path:
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


# ---------------------------------------------------------------------------------------------- errors, one line
def _raised_by(err: BaseException) -> tuple[str, str]:
    """``(file, function)`` of the frame that raised ``err``."""
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ is not None else []
    return (Path(frames[-1].filename).as_posix(), frames[-1].name) if frames else ("", "")


#: Where Lightning and torch check the run's set-up: the Trainer and its connectors (devices, accelerator, strategy,
#: precision, ``ckpt_path``), the loops' limits, the callbacks' options, the optimizers' hyper-parameters. The
#: configuration errors raised there are about the user's input; the same types raised anywhere else are bugs.
VALIDATING_CODE = (
    "/lightning/pytorch/trainer/",
    "/lightning/pytorch/loops/",
    "/lightning/pytorch/callbacks/",
    "/lightning/pytorch/accelerators/",
    "/lightning/pytorch/strategies/",
    "/lightning/pytorch/plugins/",
    "/lightning/fabric/connector.py",
    "/lightning/fabric/accelerators/",
    "/lightning/fabric/strategies/",
    "/lightning/fabric/plugins/",
    "/lightning/fabric/utilities/device_parser.py",
    "/torch/optim/",
)


def _state_dict_mismatch(err: BaseException) -> str | None:
    """One line for torch's strict ``load_state_dict`` failure (the checkpoint's tensors do not fit the model)."""
    where, function = _raised_by(err)
    text = str(err)
    if not (isinstance(err, RuntimeError) and where.endswith("/torch/nn/modules/module.py") and function == "load_state_dict"):
        return None
    if not text.startswith("Error(s) in loading state_dict"):
        return None
    problems = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    first = problems[0] if problems else text
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return _flatten(
        f"the checkpoint does not fit the model the flags build: {first}{more}; leave the model's flags out or "
        "set them as in training"
    )


def user_error(err: BaseException) -> str | None:
    """The one-line message of ``err`` if it was caused by the user's input, else ``None`` (a bug: the traceback).

    User input errors are lit_meta's :class:`LitMetaError` (also where jsonargparse or Lightning wrapped one),
    the configuration errors that Lightning and torch raise in :data:`VALIDATING_CODE`, and a checkpoint whose
    tensors do not fit the model.
    """
    seen = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, LitMetaError):
            return _flatten(cause)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    for cause in _unwrapped(err):
        if isinstance(cause, (MisconfigurationException, ValueError)) and any(part in _raised_by(cause)[0] for part in VALIDATING_CODE):
            return _flatten(cause)
        mismatch = _state_dict_mismatch(cause)
        if mismatch is not None:
            return mismatch
    return None


def _unwrapped(err: BaseException) -> list[BaseException]:
    """``err``, then, while the exception at hand was raised by jsonargparse, the one it wraps (jsonargparse
    re-raises what a class it instantiates raises as its own error); innermost first."""
    chain = [err]
    while "/jsonargparse/" in _raised_by(chain[-1])[0]:
        inner = chain[-1].__cause__ or chain[-1].__context__
        if inner is None or inner in chain:
            break
        chain.append(inner)
    return chain[::-1]


# ---------------------------------------------------------------------------------------------------- download
class _OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse`` that ends a bad command line in one ``error:`` line and exit status 2, like the other commands."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {_flatten(message)} (see {self.prog} --help)\n")
        sys.exit(2)


def download_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m lit_meta download`` (plain ``argparse``: the command builds no Lightning objects)."""
    parser = _OneLineArgumentParser(
        prog="python -m lit_meta download",
        description=(
            "Fetch a dataset's official files into a folder: each is written to a temporary file beside its "
            "destination, checked against its md5, then renamed, so an interrupted download leaves nothing behind. "
            "Files already there are skipped."
        ),
        epilog=(
            "omniglot: images_background.zip and images_evaluation.zip (Lake et al.). Lake's one-shot runs "
            "(all_runs.zip) and the small background sets ship with lit_meta and are read from the package."
        ),
    )
    parser.add_argument("dataset", choices=["omniglot"], help="the dataset to fetch")
    parser.add_argument("--root", default=None, help="the folder to put the files in (default: data/<dataset>)")
    parser.add_argument(
        "--mirror", default=None, metavar="URL", help="fetch from this base URL instead, a mirror with the same file names"
    )
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds to wait for the server (default 60)")
    return parser


def download_command(argv: list[str]) -> int:
    """``python -m lit_meta download ...``: fetch the dataset's missing files; the exit status."""
    from datamodules.omniglot import download_omniglot

    options = download_parser().parse_args(argv)
    root = Path(options.root or Path("data") / options.dataset).expanduser()
    if options.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {options.timeout}")
    download_omniglot(root, mirror=options.mirror, timeout=options.timeout, log=lambda line: print(line, flush=True))
    return 0


# -------------------------------------------------------------------------------------------------- entry point
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
    args = list(sys.argv[1:] if args is None else args)
    try:
        if args and args[0] == "download":
            sys.exit(download_command(args[1:]))
        # The command line owns its process, so it may change how the process allocates (see lit_meta.allocator).
        tune_cpu_allocator()
        MetaCLI(args=with_default_config(args))
    except KeyboardInterrupt:
        # Training handles Ctrl-C itself (MetaCheckpoint); this is a Ctrl-C anywhere else, e.g. during a download.
        if _debug():
            raise
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    except Exception as err:
        message = user_error(err)
        if message is None:
            raise
        if _debug():
            traceback.print_exc()
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
