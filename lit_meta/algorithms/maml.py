"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), second and first order.

For a task with support set ``S`` and query set ``Q``, MAML adapts all parameters by ``k`` gradient steps

    theta_0 = theta,   theta_{j+1} = theta_j - alpha * grad L_S(theta_j)

and trains the initialization ``theta`` on the query loss after adaptation, ``L_Q(theta_k)``, averaged over the
tasks of a meta-batch. ``first_order=True`` drops the second-order terms (FOMAML): the inner gradients are treated
as constants.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call

from datamodules.errors import require_positive
from datamodules.task_batch import TaskBatch
from lit_meta.adaptation import Params, StepSize, adapt, map_tasks
from lit_meta.algorithms.base import MetaLearner, task_loss, task_metric


class MAML(MetaLearner):
    """MAML / FOMAML.

    Args:
        backbone: the network being meta-learned.
        inner_lr: the inner learning rate alpha.
        inner_steps: inner gradient steps during meta-training.
        eval_inner_steps: inner gradient steps at validation and test (often more than in training).
        first_order: FOMAML.
        **kwargs: see :class:`~lit_meta.algorithms.base.MetaLearner` (optimizer, scheduler, vectorize, chunk_size).
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(backbone, **kwargs)
        eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        require_positive(inner_steps=inner_steps, eval_inner_steps=eval_inner_steps)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order
        self.save_hyperparameters()

    # What a subclass varies: which parameters adapt, their step sizes, and the order of the meta-gradient.
    def fast_parameters(self) -> Params:
        """The parameters adapted in the inner loop (all of them for MAML)."""
        return dict(self.backbone.named_parameters())

    def step_size(self, training: bool) -> StepSize | callable:
        return self.inner_lr

    def use_first_order(self, training: bool) -> bool:
        return self.first_order

    def steps(self, training: bool) -> int:
        return self.inner_steps if training else self.eval_inner_steps

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
        )
        return trajectory, context

    def task_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        trajectory, context = self.adapt_task(support_x, support_y, training)
        predictions = functional_call(self.backbone, {**context, **trajectory[-1]}, (query_x,))
        return task_loss(predictions, query_y), predictions

    def task_metrics(self, batch: TaskBatch) -> dict[str, Tensor]:
        values = super().task_metrics(batch)
        # Before adaptation: how much of the result the inner loop is responsible for.
        before = map_tasks(self.backbone, batch.query_x, vectorize=self.vectorize, chunk_size=self.chunk_size)
        name = self.metric_name(batch)
        values[f"{name}_pre"] = self._per_task(task_metric, before, batch.query_y)
        if batch.is_classification:
            values["loss_pre"] = self._per_task(task_loss, before, batch.query_y)
        return values
