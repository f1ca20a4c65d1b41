r"""Transfer-learning baselines: pre-train a classifier on all base classes, evaluate the embedding few-shot.

**Pre-training.** The backbone ``f`` and a classifier head over the ``C`` base (training) classes are trained on
ordinary mini-batches of labelled images (the datamodule's ``train_mode: batches``) with the cross-entropy, optionally
label-smoothed:

* ``classifier: linear`` (Chen et al. 2019's *Baseline*; Tian et al. 2020's pre-training): ``logits = W f(x) + b``;
* ``classifier: cosine`` (Chen et al. 2019's *Baseline++*): ``logits_c = s * cos(f(x), w_c)`` with a scale ``s``
  (learned by default, stored as ``log s``).

The head is used only in pre-training. Validation and test run the library's fixed few-shot episodes on the frozen
embedding, with an ``evaluator``:

* ``nearest_centroid`` (SimpleShot, Wang et al. 2019): features are transformed by ``feature_transform``

      none: z,    l2: z / ||z||,    cl2: (z - mu) / ||z - mu||,

  where ``mu`` is the mean feature of the base-class training images (computed by :meth:`Pretrain.compute_base_mean`
  over the whole training split and kept in the ``base_mean`` buffer); a query goes to the class whose centroid (the
  mean transformed support feature) is nearest in Euclidean distance, ``logits_c = -||t(z_q) - m_c||^2``.
* ``logistic_regression`` (RFS-simple, Tian et al. 2020): multinomial logistic regression on the (by default
  L2-normalised) support features, solved to convergence with L-BFGS in float64 for the objective of scikit-learn's
  ``LogisticRegression(C=1.0)``, which Tian et al. call:

      min_{W, b}  (1/2) ||W||_F^2 + C * sum_{i in S} CE(W z_i + b, y_i)          (the bias is not penalised)

* ``finetune_head`` (Chen et al. 2019's test): a new linear (Baseline) or cosine (Baseline++) head trained on the
  support features by SGD, as in their ``BaselineFinetune``: 100 epochs over the support set in random mini-batches
  of 4, learning rate 0.01, momentum 0.9 with dampening 0.9, weight decay 0.001; their cosine test head has a fixed
  scale of 2 (for heads of at most 200 classes) and a class-wise learnable norm.

References: W.-Y. Chen, Y.-C. Liu, Z. Kira, Y.-C. F. Wang, J.-B. Huang, "A Closer Look at Few-shot Classification",
ICLR 2019. Y. Wang, W.-L. Chao, K. Q. Weinberger, L. van der Maaten, "SimpleShot: Revisiting Nearest-Neighbor
Classification for Few-Shot Learning", arXiv:1911.04623, 2019. Y. Tian, Y. Wang, D. Krishnan, J. B. Tenenbaum,
P. Isola, "Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need?", ECCV 2020.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.errors import ConfigError
from datamodules.task_batch import ExampleBatch, TaskBatch
from lit_meta.adaptation import map_tasks
from lit_meta.algorithms.base import task_loss, task_metric
from lit_meta.algorithms.embedding import EmbeddingMetaLearner, class_means
from lit_meta.algorithms.protonet import squared_distances
from lit_meta.normalization import Recording, not_recording, recording

CLASSIFIERS = ("linear", "cosine")
EVALUATORS = ("nearest_centroid", "logistic_regression", "finetune_head")
TRANSFORMS = ("none", "l2", "cl2")
#: The feature transform of each evaluator when ``feature_transform`` is not given (each paper's choice).
DEFAULT_TRANSFORMS = {"nearest_centroid": "cl2", "logistic_regression": "l2", "finetune_head": "none"}
#: Chen et al.'s cosine test head: a fixed scale of 2 for at most 200 classes, 10 above (their ``distLinear``).
FINETUNE_COSINE_SCALE = 2.0


class CosineClassifier(nn.Module):
    """``logits_c = s * cos(z, w_c)``: a bias-free linear map of the normalised feature onto normalised class weights.

    Args:
        in_features: feature size ``D``.
        num_classes: classes ``C``.
        scale: the (initial) scale ``s``.
        learn_scale: train ``s`` (stored as ``log s``, so it stays positive).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 10.0, learn_scale: bool = True) -> None:
        super().__init__()
        if not scale > 0:
            raise ConfigError(f"cosine_scale must be positive, got {scale!r}")
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialization
        if learn_scale:
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        else:
            self.register_buffer("log_scale", torch.tensor(math.log(scale)))

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def forward(self, z: Tensor) -> Tensor:
        return self.scale * (F.normalize(z, dim=-1) @ F.normalize(self.weight, dim=-1).transpose(0, 1))


# ----------------------------------------------------------------------------------------------------- evaluators
def transform_features(z: Tensor, transform: str, base_mean: Tensor | None = None) -> Tensor:
    """SimpleShot's feature transforms: ``none``, ``l2`` (``z / ||z||``), ``cl2`` (``(z - mu) / ||z - mu||``)."""
    if transform == "none":
        return z
    if transform == "cl2":
        if base_mean is None:
            raise ConfigError("feature_transform cl2 needs the base-class mean feature")
        z = z - base_mean
    return F.normalize(z, dim=-1)


def nearest_centroid_logits(support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
    """``[Q, N]`` negative squared distances of the queries to the class centroids of the support features."""
    return -squared_distances(query, class_means(support, support_y, ways))


def fit_logistic_regression(
    features: Tensor, labels: Tensor, ways: int, c: float = 1.0, max_iter: int = 1000, tolerance: float = 1e-9
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression ``(W [N, D], b [N])`` minimising ``||W||^2 / 2 + c * sum_i CE(W z_i + b, y_i)``.

    scikit-learn's ``LogisticRegression(C=c)`` objective with an unpenalised intercept, solved in float64 by
    L-BFGS with a strong-Wolfe line search until the gradient's largest entry is below ``tolerance`` (the problem is
    strictly convex in ``W``, so that is its unique minimum; ``b`` is unique up to a constant that changes no
    probability).
    """
    if not c > 0:
        raise ConfigError(f"logistic_c must be positive, got {c!r}")
    x = features.detach().double()
    y = labels.detach()
    params = torch.zeros(ways, x.shape[1] + 1, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [params], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance, tolerance_change=0.0, history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        optimizer.zero_grad()
        weight, bias = params[:, :-1], params[:, -1]
        loss = 0.5 * weight.pow(2).sum() + c * F.cross_entropy(x @ weight.T + bias, y, reduction="sum")
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    params = params.detach()
    return params[:, :-1], params[:, -1]


def finetune_head(
    support: Tensor,
    support_y: Tensor,
    ways: int,
    classifier: str = "linear",
    epochs: int = 100,
    batch_size: int = 4,
    lr: float = 0.01,
    momentum: float = 0.9,
    dampening: float = 0.9,
    weight_decay: float = 0.001,
    generator: torch.Generator | None = None,
) -> tuple[nn.Module, list[float]]:
    """Chen et al.'s test-time head: a new classifier trained on fixed support features by SGD.

    Every epoch visits the support set in a random order in mini-batches of ``batch_size``. ``classifier``:
    ``"linear"`` (``nn.Linear``) or ``"cosine"`` (a cosine head with a class-wise learnable norm and the fixed
    scale of their code, see :data:`FINETUNE_COSINE_SCALE`).

    Returns:
        The trained head and the support loss (cross-entropy over the whole support set) before each epoch and after
        the last.
    """
    z = support.detach()
    dim = z.shape[-1]
    with torch.random.fork_rng(devices=[]):
        # The head's initial weights come from the generator's stream, so evaluation is deterministic.
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else 0)
        head: nn.Module = nn.Linear(dim, ways) if classifier == "linear" else _NormCosineHead(dim, ways)
    head = head.to(device=z.device, dtype=z.dtype)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    losses = []
    with torch.enable_grad():
        for _ in range(epochs):
            with torch.no_grad():
                losses.append(float(F.cross_entropy(head(z), support_y)))
            order = torch.randperm(len(z), generator=generator).to(z.device)
            for start in range(0, len(z), batch_size):
                index = order[start : start + batch_size]
                optimizer.zero_grad()
                F.cross_entropy(head(z[index]), support_y[index]).backward()
                optimizer.step()
    with torch.no_grad():
        losses.append(float(F.cross_entropy(head(z), support_y)))
    return head, losses


class _NormCosineHead(nn.Module):
    """Chen et al.'s test head for Baseline++: ``s * g_c * cos(z, v_c)`` with ``W = g v / ||v||`` (weight norm, a
    class-wise learnable norm ``g``) and a fixed ``s``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        linear = nn.Linear(in_features, num_classes, bias=False)
        self.direction = nn.Parameter(linear.weight.detach().clone())
        self.norm = nn.Parameter(linear.weight.detach().norm(dim=1))

    def forward(self, z: Tensor) -> Tensor:
        weight = self.norm.unsqueeze(1) * F.normalize(self.direction, dim=1)
        return FINETUNE_COSINE_SCALE * (F.normalize(z, dim=-1, eps=1e-5) @ weight.T)


# ---------------------------------------------------------------------------------------------------- the module
class Pretrain(EmbeddingMetaLearner):
    """A backbone and a classifier over all base classes, trained on mini-batches; evaluated few-shot on embeddings.

    Needs the datamodule's ``train_mode: batches``. See the module docstring for the classifiers and evaluators.

    Args:
        backbone: an embedding network (``out_features: null``).
        num_classes: classes of the pre-training head; ``None``: the training split's number of classes, read from
            the datamodule when a fit starts (and recorded in the checkpoint).
        classifier: ``"linear"`` (Baseline) or ``"cosine"`` (Baseline++).
        cosine_scale: the cosine classifier's (initial) scale.
        learn_scale: train the cosine classifier's scale.
        label_smoothing: of the pre-training cross-entropy (0: none).
        evaluator: ``"nearest_centroid"``, ``"logistic_regression"`` or ``"finetune_head"``.
        feature_transform: ``"none"``, ``"l2"`` or ``"cl2"``, applied to the features before the evaluator;
            ``None``: ``cl2`` for nearest centroid (SimpleShot's best), ``l2`` for logistic regression (RFS),
            ``none`` for the fine-tuned head (Chen et al.).
        logistic_c: inverse regularisation strength ``C`` of the logistic regression (scikit-learn's default 1.0).
        logistic_max_iter: L-BFGS iterations at most.
        finetune_epochs, finetune_batch_size, finetune_lr: the fine-tuned head's SGD schedule (100, 4, 0.01).
        base_mean_batch_size: images per forward pass when computing the base-class mean feature.
        val_base_mean_images: validation estimates the base-class mean from this many training images (evenly
            spaced over the classes), as the exact mean costs a pass over the whole training split at every
            validation; ``None``: all. Test always uses every training image.
        normalization: the evaluation protocol of the normalization layers; ``"running"`` (the statistics
            accumulated in pre-training, as ``model.eval()``) by default.
        **kwargs: see :class:`~lit_meta.algorithms.base.MetaLearner` (optimizer, lr_scheduler, init_from, ...).
    """

    train_mode = "batches"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        classifier: str = "linear",
        cosine_scale: float = 10.0,
        learn_scale: bool = True,
        label_smoothing: float = 0.0,
        evaluator: str = "nearest_centroid",
        feature_transform: str | None = None,
        logistic_c: float = 1.0,
        logistic_max_iter: int = 1000,
        finetune_epochs: int = 100,
        finetune_batch_size: int = 4,
        finetune_lr: float = 0.01,
        base_mean_batch_size: int = 1024,
        val_base_mean_images: int | None = 10000,
        normalization: str = "running",
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, normalization=normalization, **kwargs)
        for option, value, allowed in (
            ("classifier", classifier, CLASSIFIERS),
            ("evaluator", evaluator, EVALUATORS),
            ("feature_transform", feature_transform if feature_transform is not None else "none", TRANSFORMS),
        ):
            if value not in allowed:
                raise ConfigError(f"Pretrain: {option} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"Pretrain: label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not logistic_c > 0:
            raise ConfigError(f"Pretrain: logistic_c must be positive, got {logistic_c!r}")
        for option, value in (
            ("num_classes", num_classes),
            ("logistic_max_iter", logistic_max_iter),
            ("finetune_epochs", finetune_epochs),
            ("finetune_batch_size", finetune_batch_size),
            ("base_mean_batch_size", base_mean_batch_size),
            ("val_base_mean_images", val_base_mean_images),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"Pretrain: {option} must be a positive integer, got {value!r}")
        if not finetune_lr > 0:
            raise ConfigError(f"Pretrain: finetune_lr must be positive, got {finetune_lr!r}")
        self.classifier_kind = classifier
        self.cosine_scale = cosine_scale
        self.learn_scale = learn_scale
        self.label_smoothing = label_smoothing
        self.evaluator = evaluator
        self.feature_transform = feature_transform or DEFAULT_TRANSFORMS[evaluator]
        self.logistic_c = logistic_c
        self.logistic_max_iter = logistic_max_iter
        self.finetune_epochs = finetune_epochs
        self.finetune_batch_size = finetune_batch_size
        self.finetune_lr = finetune_lr
        self.base_mean_batch_size = base_mean_batch_size
        self.val_base_mean_images = val_base_mean_images
        dim = self.embedding_dim()
        self.classifier: nn.Module | None = None
        if num_classes is not None:
            self.build_classifier(num_classes)
        self.register_buffer("base_mean", torch.zeros(dim))
        # The global step the base mean was computed at; -1: never.
        self.register_buffer("base_mean_step", torch.tensor(-1, dtype=torch.long))

    def build_classifier(self, num_classes: int) -> None:
        """Create the pre-training head over ``num_classes`` classes (and record the number in the hyper-parameters)."""
        dim = self.embedding_dim()
        if self.classifier_kind == "linear":
            self.classifier = nn.Linear(dim, num_classes)
        else:
            self.classifier = CosineClassifier(dim, num_classes, self.cosine_scale, self.learn_scale)
        self.hparams["num_classes"] = num_classes

    # ------------------------------------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        if stage == "fit":
            datamodule = self._datamodule()
            available = datamodule.num_classes("train") if datamodule is not None else None
            if self.classifier is None:
                if available is None:
                    raise ConfigError("Pretrain: the datamodule does not say how many training classes it has: set num_classes")
                self.build_classifier(available)
            elif available is not None and available != self.hparams["num_classes"]:
                raise ConfigError(
                    f"Pretrain: num_classes is {self.hparams['num_classes']} but the training split has {available} "
                    "classes: set num_classes to it (or leave it null)"
                )
        super().setup(stage)

    def training_step(self, batch: ExampleBatch, batch_idx: int) -> Tensor:
        self._require_grad_mode()
        if not isinstance(batch, ExampleBatch):
            raise ConfigError(
                f"Pretrain trains on mini-batches of labelled examples, but the training loader gave "
                f"{type(batch).__name__}: set the datamodule's train_mode: batches"
            )
        if self.classifier is None:
            raise ConfigError("Pretrain has no classifier head: set num_classes, or fit it with a datamodule")
        opt = self.optimizers()
        opt.zero_grad()
        statistics = Recording()
        with recording() as scope:
            logits = self.classifier(self.embed(batch.x))
        statistics.extend(scope.modules, scope.tensors)
        loss = F.cross_entropy(logits, batch.y, label_smoothing=self.label_smoothing)
        self.manual_backward(loss)
        self.optimizer_step_with_statistics(opt, statistics)
        size = batch.num_examples
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        self.log("train/acc", (logits.detach().argmax(-1) == batch.y).float().mean(), prog_bar=True, batch_size=size)
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=size)
        return loss.detach()

    # ---------------------------------------------------------------------------------------------- base mean
    @torch.no_grad()
    def compute_base_mean(self, datamodule: Any, split: str = "train", images: int | None = None) -> Tensor:
        """Set ``base_mean`` to the mean embedding of the images of ``datamodule``'s ``split`` (SimpleShot's ``mu``).

        ``images``: use only this many, evenly spaced over the split (whose classes lie end to end, so every class
        contributes alike); ``None``: all. The images pass ``base_mean_batch_size`` at a time under the evaluation
        protocol's statistics (the running ones by default, so the result does not depend on the batching).
        """
        available = datamodule.num_examples(split)
        if not available:
            raise ConfigError(f"{type(datamodule).__name__} has no labelled {split} examples to compute the base-class mean from")
        if images is None or images >= available:
            chosen = torch.arange(available)
        else:
            chosen = torch.linspace(0, available - 1, images).round().long()
        total = len(chosen)
        was_training = self.training
        self.eval()
        sum_ = torch.zeros(self.base_mean.shape, dtype=torch.float64, device=self.device)
        try:
            with not_recording(), self.evaluation_normalization():
                for index in chosen.split(self.base_mean_batch_size):
                    batch = datamodule.prepare_batch(datamodule.examples(split, index).to(self.device))
                    sum_ += self.embed(batch.x).double().sum(0)
        finally:
            self.train(was_training)
        self.base_mean.copy_((sum_ / total).to(self.base_mean.dtype))
        trainer = self._trainer
        self.base_mean_step.fill_(trainer.global_step if trainer is not None else 0)
        return self.base_mean

    def _refresh_base_mean(self, images: int | None, always: bool = False) -> None:
        # The mean belongs to the weights it was computed with: recompute whenever the weights may have moved since
        # (a new step, another checkpoint), or when asked; without training images the stored mean is all there is.
        if self.feature_transform != "cl2":
            return
        datamodule = self._datamodule()
        if datamodule is None or not datamodule.num_examples("train"):
            if int(self.base_mean_step) < 0:
                raise ConfigError(
                    "feature_transform cl2 needs the base-class mean, and the datamodule has no training images to "
                    "compute it from: use feature_transform l2 or none"
                )
            return
        step = self.trainer.global_step
        if always or int(self.base_mean_step) != step or step == 0:
            self.compute_base_mean(datamodule, images=images)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._refresh_base_mean(self.val_base_mean_images)

    def on_test_start(self) -> None:
        super().on_test_start()
        # A validation estimate (from a subset of the images) never serves a test: the exact mean, from all of them.
        self._refresh_base_mean(None, always=True)

    # ----------------------------------------------------------------------------------------------- evaluation
    def task_outputs(self, batch: TaskBatch, training: bool) -> tuple[Tensor, Tensor]:
        if training:
            raise ConfigError("Pretrain trains on mini-batches of labelled examples, not on episodes: set the datamodule's train_mode: batches")
        # Only the nearest-centroid evaluator is a fixed computation that vmap can batch; the others run optimizers.
        vectorize = self.vectorize and self.evaluator == "nearest_centroid"
        with self.episode_ways(batch), self.inner_loop_precision(), self.evaluation_normalization():

            def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
                return self.task_step(sx, sy, qx, qy, False)

            return map_tasks(
                one_task, batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                vectorize=vectorize, chunk_size=self.chunk_size,
            )

    def task_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            support_z, query_z = self.embed_task(support_x, query_x, training=False)
        logits = self.evaluate_features(support_z, support_y, query_z, self.ways_of(support_y))
        return task_loss(logits, query_y), logits

    def evaluate_features(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, ways: int) -> Tensor:
        """``[Q, N]`` query logits of the ``evaluator`` on one task's support and query features."""
        base_mean = None
        if self.feature_transform == "cl2":
            if int(self.base_mean_step) < 0:
                raise ConfigError(
                    "feature_transform cl2 needs the base-class mean feature, which this model has not computed: "
                    "evaluate it through a Trainer with its training datamodule, or call compute_base_mean(datamodule)"
                )
            base_mean = self.base_mean.to(support_z.dtype)
        support_t = transform_features(support_z, self.feature_transform, base_mean)
        query_t = transform_features(query_z, self.feature_transform, base_mean)
        if self.evaluator == "nearest_centroid":
            return nearest_centroid_logits(support_t, support_y, query_t, ways)
        if self.evaluator == "logistic_regression":
            weight, bias = fit_logistic_regression(support_t, support_y, ways, self.logistic_c, self.logistic_max_iter)
            return (query_t.double() @ weight.T + bias).to(query_z.dtype)
        generator = torch.Generator().manual_seed(0)
        head, _ = finetune_head(
            support_t, support_y, ways, self.classifier_kind, self.finetune_epochs, self.finetune_batch_size,
            self.finetune_lr, generator=generator,
        )
        with torch.no_grad():
            return head(query_t)

    def task_metrics(self, batch: TaskBatch) -> dict[str, Tensor]:
        _, predictions = self.task_outputs(batch, training=False)
        predictions = predictions.detach()
        return {
            self.metric_name(batch): self._per_task(task_metric, predictions, batch.query_y),
            "loss": self._per_task(task_loss, predictions, batch.query_y),
        }
