r"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), first and second order, with the MAML++ options.

**MAML.** For a task with support set ``S`` and query set ``Q``, MAML adapts all parameters by ``k`` gradient steps

    theta_0 = theta,   theta_{j+1} = theta_j - alpha * grad L_S(theta_j)

and trains the initialization ``theta`` on the query loss after adaptation, averaged over the ``T`` tasks of a
meta-batch:

    min_theta  (1/T) sum_t L_Q^t(theta_k^t).

``first_order=True`` drops the second-order terms (FOMAML): the inner gradients are treated as constants, so
``d theta_k / d theta = I``.

**MAML++** (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019); each option is off by default, and with
all of them off this is exactly MAML:

* Multi-step loss (``multi_step_loss``, MSL): the outer objective of a task is the weighted sum of the query losses
  after *every* inner step, ``sum_{j=1..k} v_j(e) L_Q(theta_j)``. At epoch ``e = 0`` the weights are uniform,
  ``v_j = 1/k``; every epoch each non-final weight shrinks by ``1/(k E)`` (floored at ``0.03/k``) and the final one
  grows by ``(k-1)/(k E)`` (capped at ``1 - 0.03 (k-1)/k``), where ``E = msl_epochs``. From epoch ``E`` on only the
  final step's loss is used (the reference implementation's ``get_per_step_loss_importance_vector``).
* Learned per-layer per-step inner learning rates (``lslr``, LSLR): ``theta_{j+1}^l = theta_j^l - alpha_{l,j}
  grad_l L_S(theta_j)``, one learnable scalar per parameter tensor ``l`` and step ``j``, initialised to
  ``inner_lr`` and trained by the outer optimizer with the initialization. Evaluation steps beyond the training
  steps reuse the last step's rates.
* Derivative-order annealing (``first_order_epochs``, DA): first-order meta-gradients for the first
  ``first_order_epochs`` epochs, second order afterwards.
* Cosine annealing of the meta learning rate: no option here; configure ``lr_scheduler`` as
  ``torch.optim.lr_scheduler.CosineAnnealingLR`` (``T_max`` = epochs, ``eta_min`` = 1e-5), see
  ``configs/omniglot_mamlpp_*.yaml``.

MAML++'s per-step batch-norm statistics and weights (BNRS/BNWB) are not needed: the backbones normalise with the
statistics of the batch at hand (:class:`~lit_meta.backbones.BatchStatNorm`), in training and evaluation.

**Pre-training on all tasks** (``inner_steps: 0``): with no inner step the outer objective is the query loss of
``theta`` itself, ``(1/T) sum_t L_Q^t(theta)``, the ordinary loss pooled over the tasks of each batch; evaluation
still fine-tunes by ``eval_inner_steps`` SGD steps of ``inner_lr`` on the support set. This is Finn et al.'s
"pretrained" baseline (``configs/sinusoid_pretrained.yaml``).

**Normalization at evaluation** (``normalization``, see :mod:`lit_meta.normalization`): ``"transductive"`` normalizes
the query set with its own batch statistics, as the reference MAML (a prediction then depends on the other queries,
so the number of test queries is part of the protocol); ``"support"`` with the support set's; ``"per_query"`` each
query with the support set plus itself (Nichol et al.'s non-transductive protocol); ``"running"`` with running
statistics accumulated in meta-training, in the inner loop too. Training is the same under each.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from datamodules.errors import ConfigError, require_positive
from datamodules.task_batch import TaskBatch
from lit_meta.adaptation import Params, StepSize, adapt, map_tasks
from lit_meta.algorithms.base import MetaLearner, task_loss, task_metric
from lit_meta.backbones import refuse_fused_norm_for_second_order
from lit_meta.normalization import query_outputs


def parameter_key(name: str) -> str:
    """A parameter name as a :class:`~torch.nn.ParameterDict` key (``.`` is not allowed in keys)."""
    return name.replace(".", "-")


def multi_step_loss_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """MAML++'s per-step importance weights ``v_1..v_steps`` of the query losses at ``epoch``.

    Uniform at epoch 0; each epoch the non-final weights decay by ``1 / (steps * msl_epochs)`` down to
    ``0.03 / steps`` and the final one grows by ``(steps - 1)`` times that, up to ``1 - (steps - 1) 0.03 / steps``.
    The weights always sum to 1.
    """
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    weights = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    weights.append(min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return weights


class MAML(MetaLearner):
    """MAML / FOMAML, with MAML++'s multi-step loss, LSLR and derivative-order annealing as options.

    Args:
        backbone: the network being meta-learned.
        inner_lr: the inner learning rate alpha (with ``lslr``: the initial value of every learned rate).
        inner_steps: inner gradient steps during meta-training; 0 pre-trains on all tasks without adaptation.
        eval_inner_steps: inner gradient steps at validation and test (often more than in training).
        first_order: FOMAML.
        multi_step_loss: MAML++'s multi-step loss (MSL): query losses after every inner step, annealed weights.
        msl_epochs: epochs over which the MSL weights anneal toward the final step; from then on only the final step's
            loss counts.
        lslr: MAML++'s learned per-layer per-step inner learning rates.
        first_order_epochs: MAML++'s derivative-order annealing: first-order meta-gradients in the first
            ``first_order_epochs`` epochs (0: never, unless ``first_order``).
        checkpoint_inner_loop: recompute each inner step in the backward pass instead of storing its activations:
            the same meta-gradient with memory that does not grow with the activations of every step (see
            :func:`~lit_meta.adaptation.adapt`'s ``checkpoint``), for about one more inner step's compute per step.
        **kwargs: see :class:`~lit_meta.algorithms.base.MetaLearner` (optimizer, scheduler, vectorize, chunk_size,
            normalization).
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        multi_step_loss: bool = False,
        msl_epochs: int = 10,
        lslr: bool = False,
        first_order_epochs: int = 0,
        checkpoint_inner_loop: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(backbone, **kwargs)
        if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 0:
            raise ConfigError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")
        if inner_steps == 0:
            if eval_inner_steps is None:
                raise ConfigError("inner_steps: 0 pre-trains without adaptation: give eval_inner_steps, the fine-tuning steps at test")
            for name, value in (("multi_step_loss", multi_step_loss), ("lslr", lslr)):
                if value:
                    raise ConfigError(f"{name} weights or learns the inner steps of training, and inner_steps is 0: turn {name} off")
        eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        require_positive(eval_inner_steps=eval_inner_steps, msl_epochs=msl_epochs)
        if not isinstance(first_order_epochs, int) or first_order_epochs < 0:
            raise ConfigError(f"first_order_epochs must be a non-negative integer, got {first_order_epochs!r}")
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order
        refuse_fused_norm_for_second_order(self.inner_loop_module(), not first_order, self.vectorize, type(self).__name__)
        self.multi_step_loss = multi_step_loss
        self.msl_epochs = msl_epochs
        self.lslr = lslr
        self.first_order_epochs = first_order_epochs
        self.checkpoint_inner_loop = checkpoint_inner_loop
        if lslr:
            # One rate per parameter tensor and training step. Only training steps get a rate of their own: every
            # one is then used in every training step (DDP needs no unused-parameter search).
            self.inner_lrs = nn.ParameterDict(
                {
                    parameter_key(name): nn.Parameter(torch.full((inner_steps,), float(inner_lr), dtype=p.dtype))
                    for name, p in self.fast_parameters().items()
                }
            )

    def head_outputs(self) -> int | None:
        head = getattr(self.backbone, "head", None)
        return head.out_features if isinstance(head, nn.Linear) else None

    # What a subclass varies: which parameters adapt, their step sizes, and the order of the meta-gradient.
    def inner_loop_module(self) -> nn.Module:
        """The module the inner loop differentiates through: its layers get second-order terms in the
        meta-gradient, so a fused norm (wrong second derivatives under vmap) is refused there and allowed elsewhere."""
        return self.backbone

    def fast_parameters(self) -> Params:
        """The parameters adapted in the inner loop (all of them for MAML)."""
        return dict(self.backbone.named_parameters())

    def step_size(self, training: bool) -> StepSize | Callable[[int], StepSize]:
        """The inner learning rate: ``inner_lr``, or with LSLR a function ``step -> {name: rate}``."""
        if not self.lslr:
            return self.inner_lr
        rates = {name: self.inner_lrs[parameter_key(name)] for name in self.fast_parameters()}
        if not training:
            rates = {name: r.detach() for name, r in rates.items()}

        def per_step(step: int) -> dict[str, Tensor]:
            return {name: r[min(step, r.shape[0] - 1)] for name, r in rates.items()}

        return per_step

    def use_first_order(self, training: bool) -> bool:
        return self.first_order or (training and self.current_epoch < self.first_order_epochs)

    def steps(self, training: bool) -> int:
        return self.inner_steps if training else self.eval_inner_steps

    def use_multi_step_loss(self, training: bool) -> bool:
        return training and self.multi_step_loss and self.current_epoch < self.msl_epochs

    def step_weights(self) -> list[float]:
        """The MSL importance weights of the current epoch (one per training inner step)."""
        return multi_step_loss_weights(self.inner_steps, self.current_epoch, self.msl_epochs)

    # ----------------------------------------------------------------------------------------------------- task
    def adapt_task(self, support_x: Tensor, support_y: Tensor, training: bool, steps: int | None = None) -> tuple[list[Params], Params]:
        """Adapt to one support set; returns the parameter trajectory and the parameters that were held fixed."""
        fast = self.fast_parameters()
        context = {k: v for k, v in self.backbone.named_parameters() if k not in fast}
        context.update(dict(self.backbone.named_buffers()))
        if not training:
            # Evaluation needs no meta-gradient: keep the inner loop's graph off the meta-parameters.
            fast = {k: v.detach() for k, v in fast.items()}
            context = {k: v.detach() for k, v in context.items()}
        trajectory = adapt(
            self.backbone,
            fast,
            support_x,
            support_y,
            loss_fn=task_loss,
            steps=self.steps(training) if steps is None else steps,
            step_size=self.step_size(training),
            first_order=self.use_first_order(training) or not training,
            context=context,
            loss_scale=self.inner_loss_scale() if training else 1.0,
            checkpoint=self.checkpoint_inner_loop and training,
        )
        return trajectory, context

    def query_objective(
        self, trajectory: list[Params], predict: Callable[[Params], Tensor], query_y: Tensor, training: bool
    ) -> tuple[Tensor, Tensor]:
        """``(objective, query predictions)`` of one task from its inner-loop trajectory.

        ``predict(params)`` gives the query predictions under ``params``. The objective is the query loss of the
        adapted parameters or, with the multi-step loss, the weighted sum over every step's parameters.
        """
        predictions = predict(trajectory[-1])
        if not self.use_multi_step_loss(training):
            return task_loss(predictions, query_y), predictions
        weights = self.step_weights()
        losses = [task_loss(predict(p), query_y) for p in trajectory[1:-1]] + [task_loss(predictions, query_y)]
        objective = sum(w * loss for w, loss in zip(weights, losses))
        return objective, predictions

    def task_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        trajectory, context = self.adapt_task(support_x, support_y, training)

        def forward(params: Params, x: Tensor) -> Tensor:
            return functional_call(self.backbone, {**context, **params}, (x,))

        def predict(params: Params) -> Tensor:
            return query_outputs(lambda x: forward(params, x), support_x, query_x, self.protocol(training), self.vectorize)

        return self.query_objective(trajectory, predict, query_y, training)

    def task_metrics(self, batch: TaskBatch) -> dict[str, Tensor]:
        values = super().task_metrics(batch)
        # Before adaptation: how much of the result the inner loop is responsible for.

        def unadapted(sx: Tensor, qx: Tensor) -> Tensor:
            return query_outputs(self.backbone, sx, qx, self.normalization, self.vectorize)

        before = map_tasks(unadapted, batch.support_x, batch.query_x, vectorize=self.vectorize, chunk_size=self.chunk_size)
        name = self.metric_name(batch)
        values[f"{name}_pre"] = self._per_task(task_metric, before, batch.query_y)
        if batch.is_classification:
            values["loss_pre"] = self._per_task(task_loss, before, batch.query_y)
        return values
