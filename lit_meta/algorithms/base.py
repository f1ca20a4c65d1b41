"""The manual-optimization skeleton that every algorithm shares.

A subclass says only what is particular to it: :meth:`MetaLearner.task_step`, which adapts to one task's support set
and returns the outer objective and the query predictions. Everything else lives here once: vectorizing over the
tasks of a meta-batch, the outer optimizer step, chunked gradient accumulation, skipping non-finite steps, clipping
after unscaling, episodic evaluation with 95% confidence intervals, and logging.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from datamodules.errors import ConfigError, LitMetaError
from datamodules.predict_folder import InputFormat, input_format_of
from datamodules.task_batch import TaskBatch
from lit_meta.adaptation import fp32_inner_loop, map_tasks
from lit_meta.backbones import (
    BatchStatNorm,
    backbone_spec,
    build_backbone,
    refuse_running_statistics_under_vmap,
    set_training_step,
)
from lit_meta.metrics import MeanConfidenceInterval
from lit_meta.normalization import (
    Recording,
    check_protocol,
    current_recording,
    has_running_statistics,
    recording,
    running_statistics,
    update_running_statistics,
)
from lit_meta.adapted import AdaptedModel, predict_batch
from lit_meta.checkpoints import CHECKPOINT_KEY, check_algorithm, checkpoint_algorithm, read_checkpoint



def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def task_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy for class labels, mean squared error for float targets."""
    if torch.is_floating_point(target):
        return F.mse_loss(prediction, target)
    return F.cross_entropy(prediction, target)


def task_metric(prediction: Tensor, target: Tensor) -> Tensor:
    """Accuracy for class labels, mean squared error for float targets."""
    if torch.is_floating_point(target):
        return F.mse_loss(prediction, target)
    return (prediction.argmax(dim=-1) == target).float().mean()


class MetaLearner(pl.LightningModule):
    """Base class of every meta-learning algorithm.

    Hyper-parameters (every ``__init__`` argument of the algorithm) are saved in checkpoints; the backbone as its
    ``{"class_path", "init_args"}`` record (see :class:`~lit_meta.backbones.Backbone`), so
    ``Algorithm.load_from_checkpoint(path)`` rebuilds it and checkpoints load with ``weights_only=True``. A backbone
    that is not a :class:`~lit_meta.backbones.Backbone` must be passed again: ``load_from_checkpoint(path, backbone=net)``.

    Args:
        backbone: the network (see :mod:`lit_meta.backbones`), or its ``{"class_path", "init_args"}`` record.
        optimizer: the outer (meta) optimizer, called with the parameters to optimize.
        lr_scheduler: optional scheduler of the outer optimizer, stepped every ``scheduler_interval``.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        vectorize: run the tasks of a meta-batch as one batched computation (``torch.func.vmap``) instead of a
            Python loop; the results are the same.
        chunk_size: at most this many tasks at once: training accumulates the meta-gradient chunk by chunk (one
            backward each, so peak memory is that of a chunk), evaluation vmaps in chunks. ``None``: all at once.
        grad_clip_norm: clip the meta-gradient to this norm (after fp16 unscaling); ``None`` disables.
        inner_loop_fp32: under ``16-mixed``/``bf16-mixed``, run the per-task inner loops (support-set gradients and
            updates) in float32 with autocast disabled, keeping the query forward and outer backward in mixed
            precision; see :func:`~lit_meta.adaptation.fp32_inner_loop`. No effect in ``32-true``.
        normalization: the evaluation protocol of the normalization layers: ``"transductive"``, ``"support"``,
            ``"per_query"`` or ``"running"`` (see :mod:`lit_meta.normalization`). Training is the same under each;
            validation and test follow it.
        predict_normalization: the protocol of :meth:`adapt` and ``predict``; ``None``: ``normalization`` where it
            is not transductive, else ``"support"``, so that an image's prediction never depends on the other
            images of the call. ``"transductive"`` must be asked for.
        init_from: a lit_meta checkpoint whose backbone weights (parameters and normalization statistics) this
            model starts ``fit`` from, e.g. a pre-trained network (:class:`~lit_meta.algorithms.pretrain.Pretrain`)
            that an episodic method fine-tunes. Read when a fit starts (``on_fit_start``) without ``--ckpt_path``;
            a resumed fit takes every weight from its own checkpoint.
    """

    #: What the training loader must serve (the datamodule's ``train_mode``): ``"episodes"`` or ``"batches"``.
    train_mode = "episodes"

    def __init__(
        self,
        backbone: nn.Module | None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        vectorize: bool = True,
        chunk_size: int | None = None,
        grad_clip_norm: float | None = None,
        inner_loop_fp32: bool = False,
        normalization: str = "transductive",
        predict_normalization: str | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if backbone is None:
            raise ConfigError(
                f"{type(self).__name__} needs a backbone: this checkpoint does not record how to build its own, so pass "
                "it again, e.g. load_from_checkpoint(path, backbone=net)"
            )
        if isinstance(backbone, dict):
            backbone = build_backbone(backbone)
        # Collects the subclass's arguments too (Lightning walks the __init__ frames); modules and callables are
        # kept out so checkpoints hold only plain data.
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.hparams["backbone"] = backbone_spec(backbone)
        if scheduler_interval not in ("epoch", "step"):
            raise ConfigError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        if chunk_size is not None and chunk_size <= 0:
            raise ConfigError(f"chunk_size must be a positive integer or null, got {chunk_size!r}")
        self.automatic_optimization = False
        self.backbone = backbone
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.vectorize = vectorize
        self.chunk_size = chunk_size
        self.grad_clip_norm = grad_clip_norm
        self.inner_loop_fp32 = inner_loop_fp32
        self.normalization = check_protocol(normalization)
        self.predict_normalization = None if predict_normalization is None else check_protocol(predict_normalization)
        if init_from is not None and not isinstance(init_from, str):
            raise ConfigError(f"init_from must be the path of a lit_meta checkpoint, got {init_from!r}")
        self.init_from = init_from
        self._eval_metrics: dict[str, MeanConfidenceInterval] = {}
        self.skipped_steps = 0
        self._restored_rng: dict[str, Tensor] | None = None
        # What the inputs look like (channels, size, inversion, value range): taken from the training datamodule,
        # saved in checkpoints, so prediction converts a user's images the way training did.
        self.input_format: InputFormat | None = None

    # --------------------------------------------------------------------------------------------- subclass API
    def task_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        """Adapt to one task and return ``(objective, query_predictions)``.

        Called per task (inside ``vmap`` when ``vectorize``): tensors have no task dimension. ``objective`` is the
        scalar outer loss of the task (the query loss after adaptation for most methods); ``training`` selects the
        training or evaluation settings (e.g. inner steps).
        """
        raise NotImplementedError

    def task_metrics(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Per-task evaluation values (``[T]`` each). The default: query loss and accuracy (or MSE)."""
        objective, predictions = self.task_outputs(batch, training=False)
        values = {self.metric_name(batch): self._per_task(task_metric, predictions, batch.query_y)}
        if batch.is_classification:
            values["loss"] = self._per_task(task_loss, predictions, batch.query_y)
        return values

    # ------------------------------------------------------------------------------------------------ meta-batch
    def task_outputs(self, batch: TaskBatch, training: bool) -> tuple[Tensor, Tensor]:
        """``(objectives [T], query_predictions [T, ...])`` of every task in the batch."""

        # While training records normalization statistics, each task returns its own as extra outputs, so they leave
        # vmap stacked over the tasks; they join the caller's recording scope (see lit_meta.normalization).
        outer = current_recording() if training else None
        recorded: list[nn.Module] = []

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, ...]:
            if outer is None:
                return self.task_step(sx, sy, qx, qy, training)
            with recording() as scope:
                objective, predictions = self.task_step(sx, sy, qx, qy, training)
            recorded[:] = scope.modules
            return (objective, predictions, *scope.tensors)

        chunk = None if training else self.chunk_size
        with self.inner_loop_precision(), nullcontext() if training else self.evaluation_normalization():
            outputs = map_tasks(
                one_task,
                batch.support_x,
                batch.support_y,
                batch.query_x,
                batch.query_y,
                vectorize=self.vectorize,
                chunk_size=chunk,
            )
        if outer is not None:
            outer.extend(recorded, outputs[2:])
        return outputs[0], outputs[1]

    def protocol(self, training: bool) -> str:
        """The normalization protocol of a pass: batch statistics in training, ``normalization`` at evaluation."""
        return "transductive" if training else self.normalization

    def evaluation_normalization(self) -> AbstractContextManager[None]:
        """The context evaluation passes run in: running statistics for the ``running`` protocol, else nothing."""
        if self.normalization != "running":
            return nullcontext()
        if not has_running_statistics(self):
            raise ConfigError(
                f"this {type(self).__name__} has no running normalization statistics (its checkpoint was written "
                "without them): evaluate with normalization: transductive, support or per_query"
            )
        return running_statistics()

    def meta_loss(self, batch: TaskBatch) -> Tensor:
        """The differentiable outer loss of a meta-batch: the mean over tasks of each task's objective."""
        return self.task_outputs(batch, training=True)[0].mean()

    @staticmethod
    def _per_task(fn: Callable[[Tensor, Tensor], Tensor], predictions: Tensor, targets: Tensor) -> Tensor:
        return torch.stack([fn(p, t) for p, t in zip(predictions, targets)])

    @staticmethod
    def metric_name(batch: TaskBatch) -> str:
        return "acc" if batch.is_classification else "mse"

    # ------------------------------------------------------------------------------------------------- training
    def _require_grad_mode(self) -> None:
        if torch.is_inference_mode_enabled():
            raise LitMetaError(
                f"{type(self).__name__} adapts with gradients, which inference mode forbids: use "
                "Trainer(inference_mode=False) (the lit_meta CLI's default) or call outside torch.inference_mode()"
            )

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The precision plugin's enabled fp16 GradScaler, or ``None`` (fp32, bf16, no trainer)."""
        trainer = self._trainer
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def inner_loss_scale(self) -> float:
        """The fp16 GradScaler's current scale (1.0 without one), applied to inner-loop losses.

        Lightning's scaler scales only ``manual_backward``; the inner loop differentiates with ``torch.func.grad``,
        whose fp16 gradients underflow unless the inner loss is scaled too (and the gradients divided back, see
        :func:`~lit_meta.adaptation.adapt`). Using the outer scaler's scale means an inner overflow shows up as a
        non-finite meta-gradient, so the scaler skips the step and backs off exactly as for an outer overflow.
        """
        scaler = self.grad_scaler()
        return 1.0 if scaler is None else float(scaler.get_scale())

    def inner_loop_precision(self) -> AbstractContextManager[None]:
        """The context the per-task inner loops run in: float32 without autocast when ``inner_loop_fp32``."""
        return fp32_inner_loop(True) if self.inner_loop_fp32 else nullcontext()

    def _backward_sync(self, last: bool):
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        if last or strategy is None or not hasattr(strategy, "block_backward_sync"):
            return nullcontext()
        return strategy.block_backward_sync()

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        self._require_grad_mode()
        if not isinstance(batch, TaskBatch):
            raise ConfigError(
                f"{type(self).__name__} trains on episodes, but the training loader gave {type(batch).__name__}: set "
                "the datamodule's train_mode: episodes"
            )
        opt = self.optimizers()
        opt.zero_grad()
        chunks = batch.chunks(self.chunk_size) if self.chunk_size else [batch]
        total, metric_values = torch.zeros((), device=self.device), []
        statistics = Recording()
        for i, chunk in enumerate(chunks):
            with recording() as scope:
                objectives, predictions = self.task_outputs(chunk, training=True)
            statistics.extend(scope.modules, scope.tensors)
            loss = objectives.sum() / batch.num_tasks
            with self._backward_sync(last=i == len(chunks) - 1):
                self.manual_backward(loss)
            total = total + loss.detach()
            metric_values.append(self._per_task(task_metric, predictions.detach(), chunk.query_y))
        self.optimizer_step_with_statistics(opt, statistics)
        name = self.metric_name(batch)
        self.log("train/loss", total, prog_bar=True, batch_size=batch.num_tasks)
        self.log(f"train/{name}", torch.cat(metric_values).mean(), prog_bar=True, batch_size=batch.num_tasks)
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=batch.num_tasks)
        return total

    def optimizer_step_with_statistics(self, opt: Any, statistics: Recording) -> None:
        """Step ``opt`` on the accumulated gradients (skipping a non-finite step), step a per-step scheduler, and
        fold the step's recorded normalization ``statistics`` into the running averages."""
        finite = self._gradients_finite()
        if not finite:
            # Drop the gradients but still take the step: optimizers leave parameters without a gradient (and their
            # state) untouched, and Lightning counts the step, as it counts GradScaler's skipped fp16 steps, so
            # global_step advances once per batch on every precision (and in lockstep on every DDP rank).
            opt.zero_grad(set_to_none=True)
        scaler = self.grad_scaler()
        scale = scaler.get_scale() if scaler is not None else None
        opt.step()
        # GradScaler skips a non-finite step inside opt.step() and lowers its scale: that is how an fp16 skip shows.
        if not finite or (scaler is not None and scaler.get_scale() < scale):
            self.skipped_steps += 1
            rank_zero_warn(
                f"non-finite meta-gradient at step {self.global_step - 1}: optimizer step skipped "
                f"({self.skipped_steps} skipped so far)"
            )
        if self.scheduler_interval == "step":
            self._step_scheduler()
        update_running_statistics(statistics.modules, statistics.tensors, reduce=self._mean_over_processes)

    def _mean_over_processes(self, value: Tensor) -> Tensor | None:
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return value
        return trainer.strategy.reduce(value, reduce_op="mean")

    def _gradients_finite(self) -> bool:
        # fp16's GradScaler skips non-finite steps itself (its gradients are still scaled here); this covers
        # fp32/bf16. Gradients are already all-reduced (inf and NaN survive the sum), so every rank decides alike.
        if self.grad_scaler() is not None:
            return True
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Called inside opt.step(), after the precision plugin unscaled the gradients (and after the DDP all-reduce):
        # clipping here acts on the true norm of the full meta-gradient, identically on every rank. Clipping in
        # training_step would clip the scaled fp16 gradients, which then unscale to almost nothing.
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.grad_clip_norm)

    def _step_scheduler(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def on_train_epoch_start(self) -> None:
        # Epoch schedulers are brought to the epoch about to run rather than stepped when one ends: checkpoints are
        # written at the end of validation, before any epoch-end hook, so a scheduler stepped there would resume one
        # epoch behind. Counting from the scheduler's own state makes resume exact from any checkpoint.
        if self.scheduler_interval != "epoch":
            return
        scheduler = self.lr_schedulers()
        if scheduler is None:
            return
        while scheduler.last_epoch < self.current_epoch:
            scheduler.step()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    # ----------------------------------------------------------------------------------------------- evaluation
    def episode_metrics(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Per-episode evaluation values (``[T]`` each) under the evaluation protocol: what validation and test
        average, and what a paired comparison of two models compares (:func:`lit_meta.evaluation.episode_values`)."""
        self._require_grad_mode()
        # The precision context here too: some algorithms evaluate without going through task_outputs.
        with torch.enable_grad(), self.inner_loop_precision(), self.evaluation_normalization():
            return {k: v.detach() for k, v in self.task_metrics(batch).items()}

    def _evaluate(self, batch: TaskBatch, stage: str) -> None:
        values = self.episode_metrics(batch)
        for key, per_task in values.items():
            name = f"{stage}/{key}"
            if name not in self._eval_metrics:
                self._eval_metrics[name] = MeanConfidenceInterval().to(self.device)
            self._eval_metrics[name].update(per_task)

    def _log_evaluation(self, stage: str) -> None:
        for name, metric in list(self._eval_metrics.items()):
            if not name.startswith(f"{stage}/") or not metric.update_called:
                continue
            mean, ci = metric.compute()
            self.log(name, mean.float(), prog_bar=name.endswith(("acc", "mse")), sync_dist=False)
            self.log(f"{name}_ci95", ci.float(), sync_dist=False)
            metric.reset()

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def evaluation_results(self) -> dict[str, float]:
        """The last logged evaluation values (e.g. ``{"test/acc": 0.98, "test/acc_ci95": 0.004}``)."""
        return {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}

    # ----------------------------------------------------------------------------------------------- prediction
    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        class_names: list[str] | None = None,
        steps: int | None = None,
        normalization: str | None = None,
    ) -> AdaptedModel:
        """Adapt to one labelled support set; the result classifies new examples.

        ``adapted = model.adapt(support_x, support_y)``; ``adapted(query_x)`` gives class probabilities ``[Q, N]``,
        ``adapted.predict(query_x)`` class indices. Works for every algorithm: it runs :meth:`task_step` with
        ``training=False`` on the support set and the query inputs (placeholder query targets). Not transductive
        unless asked: an image's prediction does not depend on the other images of the call.

        Args:
            support_x: ``[n, ...]`` inputs: float as in training, or ``uint8`` pixels (converted with
                :attr:`input_format`).
            support_y: ``[n]`` labels ``0..N-1`` (every class present), or float targets for regression.
            class_names: names of the ``N`` classes, for :meth:`AdaptedModel.predict_names`.
            steps: inner steps of optimization-based methods (default ``eval_inner_steps``; 0: no adaptation).
            normalization: the protocol (see :mod:`lit_meta.normalization`); default :attr:`prediction_protocol`.
        """
        return AdaptedModel(self, support_x, support_y, class_names=class_names, steps=steps, normalization=normalization)

    @property
    def prediction_protocol(self) -> str:
        """The normalization protocol of prediction (see ``predict_normalization``)."""
        if self.predict_normalization is not None:
            return self.predict_normalization
        return "support" if self.normalization == "transductive" else self.normalization

    def predict_step(self, batch: TaskBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``{"probabilities": [T, Q, N]}`` (regression: ``{"predictions": [T, Q, ...]}``) for every task of ``batch``.

        The batch's query targets are ignored (only placeholders for the algorithms' losses).
        """
        predictions = predict_batch(self, batch)
        if batch.is_classification:
            return {"probabilities": torch.softmax(predictions, dim=-1)}
        return {"predictions": predictions}

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _datamodule_format(self, split: str) -> InputFormat | None:
        datamodule = self._datamodule()
        return input_format_of(datamodule, split) if datamodule is not None else None

    def on_fit_start(self) -> None:
        # Record the training data's format (a fit that resumes from, or fine-tunes, a checkpoint updates it).
        self.input_format = self._datamodule_format("train") or self.input_format
        self._check_train_mode()
        self._check_ways("train")
        if self.train_mode == "episodes":  # episodic training runs the backbone inside the per-task function
            refuse_running_statistics_under_vmap(self.backbone, self.vectorize, type(self).__name__)
        # Here rather than in setup(): only now does the trainer know whether the fit resumes a --ckpt_path, whose
        # weights (already restored) a resumed run keeps. Copying in place leaves the optimizer's references valid.
        if self.init_from is not None and getattr(self._trainer, "ckpt_path", None) is None:
            self.load_backbone(self.init_from)

    def _check_train_mode(self) -> None:
        datamodule = self._datamodule()
        given = getattr(datamodule, "train_mode", "episodes")
        if datamodule is not None and given != self.train_mode:
            raise ConfigError(
                f"{type(self).__name__} trains on {self.train_mode}, but the datamodule's train_mode is {given!r}: set "
                f"the datamodule's train_mode: {self.train_mode}"
            )

    def load_backbone(self, path: str) -> None:
        """Copy the backbone weights (parameters and buffers) of the lit_meta checkpoint at ``path`` into this model.

        Raises:
            ConfigError: the file is missing or unreadable, holds no backbone, or its backbone's entries or shapes
                differ from this model's (one line, naming the first difference).
        """
        try:
            checkpoint = read_checkpoint(path)
        except LitMetaError as err:
            raise ConfigError(f"init_from: {err}") from None
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise ConfigError(f"init_from: checkpoint {path} holds no backbone weights; give a lit_meta checkpoint")
        own = self.backbone.state_dict()
        theirs = ((checkpoint.get("hyper_parameters") or {}).get("backbone") or {}).get("class_path")
        ours = (self.hparams.get("backbone") or {}).get("class_path")
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        if missing or unexpected or shapes:
            if shapes:
                what = f"{shapes[0]} is {list(state[shapes[0]].shape)} there, {list(own[shapes[0]].shape)} here"
            elif missing:
                what = f"it lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            else:
                what = f"it has {unexpected[0]}, which this backbone lacks"
            built = f" (its backbone is {theirs}, this one {ours})" if theirs and ours and theirs != ours else ""
            raise ConfigError(
                f"init_from: the backbone of {path} does not match this model's{built}: {what}; build the backbone "
                "with the same class and arguments as that checkpoint's"
            )
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(state[key])

    def _check_input_format(self, split: str) -> None:
        if self.input_format is None or getattr(self._trainer, "state", None) is None or self.trainer.state.fn == "fit":
            return
        given = self._datamodule_format(split)
        if given is not None and (given.channels, given.image_size) != (self.input_format.channels, self.input_format.image_size):
            raise ConfigError(
                f"this {type(self).__name__} was trained on {self.input_format.describe()} images, but the datamodule gives "
                f"{given.describe()}: set the datamodule's image_size/channels to match, or use a checkpoint trained on them"
            )

    def head_outputs(self) -> int | None:
        """Classes a task may have, where a fixed-size classifier head decides it (``None``: any number)."""
        return None

    def _check_ways(self, split: str) -> None:
        """One-line error for tasks with more classes than the head has outputs (else: an index error deep inside)."""
        outputs = self.head_outputs()
        datamodule = self._datamodule()
        if outputs is None or getattr(datamodule, "task_type", None) != "classification" or not hasattr(datamodule, "shape"):
            return
        ways = datamodule.shape(split).ways
        if ways > outputs:
            raise ConfigError(
                f"the {split} tasks are {ways}-way but this {type(self).__name__}'s head has {outputs} outputs: build the "
                f"backbone with out_features >= {ways}, or evaluate {outputs}-way tasks"
            )

    def on_validation_start(self) -> None:
        self._check_input_format("val")
        self._check_ways("val")

    def on_test_start(self) -> None:
        self._check_input_format("test")
        self._check_ways("test")

    def on_train_start(self) -> None:
        # The global random state of a resumed fit is the one its checkpoint was written with, so that random
        # layers (dropout, DropBlock) draw what the uninterrupted run drew. Set here, once everything that runs
        # between loading and training (model setup, moving to the device) is done.
        resumed = getattr(self._trainer, "ckpt_path", None) is not None
        if self._restored_rng is not None and resumed:
            torch.set_rng_state(self._restored_rng["cpu"].cpu())
            if self._restored_rng.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(self._restored_rng["cuda"].cpu(), self.device)
        self._restored_rng = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # DropBlock's rate ramps with the optimizer step (restored on resume, the same vmapped or looped).
        set_training_step(self, self.global_step)

    def _rng_state(self) -> dict[str, Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The algorithm is recorded even for models built in Python (only the CLI records ``_class_path``), so the
        # CLI and ``MetaLearner.load_from_checkpoint`` know what to rebuild, and refuse a checkpoint of another one.
        if self.input_format is None:
            self.input_format = self._datamodule_format("train")
        checkpoint[CHECKPOINT_KEY] = {
            "algorithm": f"{type(self).__module__}.{type(self).__qualname__}",
            "input_format": self.input_format.to_dict() if self.input_format is not None else None,
            "rng": self._rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_algorithm(checkpoint_algorithm(checkpoint), type(self), relation="related")
        # A checkpoint written before its normalization layers recorded running statistics lacks their buffers:
        # they load as "never recorded", which the running protocol refuses (the other protocols do not read them).
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for name, module in self.named_modules():
                if isinstance(module, BatchStatNorm) and f"{name}.weight" in state and f"{name}.num_batches_tracked" not in state:
                    state[f"{name}.running_mean"] = torch.zeros_like(module.running_mean)
                    state[f"{name}.running_var"] = torch.ones_like(module.running_var)
                    state[f"{name}.num_batches_tracked"] = torch.tensor(-1, dtype=torch.long)
        record = (checkpoint.get(CHECKPOINT_KEY) or {}).get("input_format")
        if record:
            self.input_format = InputFormat.from_dict(record)
        self._restored_rng = (checkpoint.get(CHECKPOINT_KEY) or {}).get("rng")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None, strict: bool | None = None, **kwargs: Any) -> "MetaLearner":
        """Lightning's ``load_from_checkpoint``, as the algorithm that wrote the checkpoint.

        ``MetaLearner.load_from_checkpoint(path)`` (or :func:`lit_meta.load_model`) rebuilds whichever algorithm
        wrote it; ``MAML.load_from_checkpoint`` on a ProtoNet checkpoint fails with a one-line :class:`ConfigError`
        instead of an unexpected-argument error.
        """
        target = check_algorithm(checkpoint_algorithm(read_checkpoint(checkpoint_path)), cls, f"checkpoint {checkpoint_path}") or cls
        if target is MetaLearner:
            raise ConfigError(
                f"checkpoint {checkpoint_path} does not record its algorithm: load it with the algorithm's class, e.g. "
                "MAML.load_from_checkpoint(path)"
            )
        return super(MetaLearner, target).load_from_checkpoint(
            checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict, **kwargs
        )
