r"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018).

For each task, Reptile trains a copy of the initialization ``theta`` with ``k`` steps of SGD or Adam on the task's
training data (no query loss), ``phi = U^k_S(theta)``, and moves the initialization toward the adapted weights:

    theta <- theta + epsilon * (1/T) sum_t (phi_t - theta).

Here the outer step goes through the shared manual-optimization skeleton (one ``manual_backward`` per step, so
gradient accumulation over chunks and DDP's all-reduce work unchanged): the per-task objective is

    J_t(theta) = 1/2 || theta - stopgrad(phi_t) ||^2,    grad J_t = theta - phi_t,

and with the outer optimizer ``SGD(lr=epsilon)`` the step ``theta - epsilon * mean_t(theta - phi_t)`` is exactly
Reptile's update. The paper anneals ``epsilon`` linearly to 0 (``LinearLR`` scheduler, see
``configs/omniglot_reptile_*.yaml``).

**Inner loop.** ``inner_optimizer="adam"`` is the paper's Adam with ``beta1 = 0``. The reference code runs one Adam
optimizer for the whole of training: its moments carry over from task to task, so an inner step is scaled by the
running size of the gradients seen so far, not by the current task's alone, and evaluation adapts with the state
training left (then restores it). ``adam_state="carried"`` (the default) does the same with the tasks of a meta-batch
adapting in parallel: each starts from the shared state, and after the outer step the state becomes the mean of the
tasks' final states (as the weights become the mean of the tasks' weights, for an outer step size of 1), over every
process under DDP. Evaluation starts from the state and leaves it unchanged. ``adam_state="per_task"`` starts every
task's Adam fresh, where a first step moves every weight by about ``inner_lr`` whatever its gradient's size.
With ``inner_batch_size`` each step uses a mini-batch of the support set: the support set is put in shot-major
order (one example of every class, then the next...) and steps take consecutive, wrapping slices of it, so every
mini-batch is class-balanced and every example is used before any is repeated; this is deterministic where the
reference code shuffled. To train on more examples per class than the evaluation shot count, as the paper did
(e.g. 10 on Omniglot), set the datamodule's ``train_shots``.

**Evaluation** adapts on the support set with ``eval_inner_steps`` (and ``eval_inner_batch_size``) and predicts the
query set under the ``normalization`` protocol: ``"transductive"`` (all query examples normalized together, the
paper's "+ Transduction" rows) or ``"per_query"`` (each query example in a batch with the support set alone, the
paper's non-transductive rows); see :mod:`lit_meta.normalization`.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call

from datamodules.errors import ConfigError
from lit_meta.adaptation import Params, adapt
from lit_meta.algorithms.base import task_loss
from lit_meta.algorithms.maml import MAML, parameter_key
from lit_meta.normalization import current_recording, query_outputs


def reptile_optimizer(params) -> torch.optim.Optimizer:
    """Reptile's outer update: SGD with the outer step size ``epsilon = 1`` (the paper's Omniglot value)."""
    return torch.optim.SGD(params, lr=1.0)


class InnerAdam:
    """Functional Adam for the inner loop, an ``update`` for :func:`lit_meta.adaptation.adapt`.

    One instance per task and adaptation; it keeps the moments between calls. Same arithmetic as
    :class:`torch.optim.Adam`: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
    """

    def __init__(
        self, lr: float, betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8, state: "InnerAdamState | None" = None
    ) -> None:
        self.lr, self.betas, self.eps = lr, (float(betas[0]), float(betas[1])), eps
        self.t = 0 if state is None else state.steps_taken()
        self.m: Params = {} if state is None else state.moments("m")
        self.v: Params = {} if state is None else state.moments("v")

    def __call__(self, step: int, params: Params, grads: Params) -> Params:
        self.t += 1
        b1, b2 = self.betas
        bias1, bias2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        new: Params = {}
        for name, p in params.items():
            g = grads[name]
            m = (1.0 - b1) * g if name not in self.m else b1 * self.m[name] + (1.0 - b1) * g
            v = (1.0 - b2) * g * g if name not in self.v else b2 * self.v[name] + (1.0 - b2) * g * g
            self.m[name], self.v[name] = m, v
            new[name] = p - (self.lr / bias1) * m / (v.sqrt() / math.sqrt(bias2) + self.eps)
        return new


class InnerAdamState(nn.Module):
    """The inner Adam's moments and step count, carried from one meta-step to the next (see the module docstring).

    Buffers, so they are saved in checkpoints and restored exactly on resume. Each parameter's moments are a
    :class:`_Moments` of their own: the tasks record their final moments with the training step's normalization
    statistics (:mod:`lit_meta.normalization`), which leave ``vmap`` stacked over the tasks and are averaged over the
    tasks and processes when the outer step is taken.
    """

    def __init__(self, params: Params, steps_per_task: int) -> None:
        super().__init__()
        self.names = list(params)
        self.per_parameter = nn.ModuleDict({parameter_key(n): _Moments(p, steps_per_task) for n, p in params.items()})

    def moments(self, which: str) -> Params:
        return {n: getattr(self.per_parameter[parameter_key(n)], which) for n in self.names}

    def steps_taken(self) -> int:
        return int(next(iter(self.per_parameter.values())).t)

    def record(self, m: Params, v: Params) -> None:
        """Record one task's final moments in the open training scope (none at evaluation)."""
        scope = current_recording()
        if scope is not None:
            for n in self.names:
                scope.add(self.per_parameter[parameter_key(n)], m[n].flatten(), v[n].flatten())


class _Moments(nn.Module):
    """One parameter's carried Adam moments; ``update_running_statistics`` takes the tasks' mean final moments."""

    def __init__(self, param: Tensor, steps_per_task: int) -> None:
        super().__init__()
        self.steps_per_task = steps_per_task
        self.register_buffer("m", torch.zeros_like(param.detach()))
        self.register_buffer("v", torch.zeros_like(param.detach()))
        self.register_buffer("t", torch.zeros((), dtype=torch.long))

    def update_running_statistics(self, m: Tensor, v: Tensor) -> None:
        with torch.no_grad():
            self.m.copy_(m.view_as(self.m))
            self.v.copy_(v.view_as(self.v))
            self.t.add_(self.steps_per_task)


def shot_major_order(labels: Tensor) -> Tensor:
    """A permutation listing the first example of every class, then the second of every class, and so on.

    Written with comparisons and a sort only, so it works per task under ``vmap`` (no data-dependent shapes).
    """
    n = labels.shape[0]
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    earlier = torch.ones(n, n, dtype=torch.bool, device=labels.device).tril(-1)  # earlier[i, j]: j < i
    occurrence = (same & earlier).sum(dim=1)  # how many examples of i's class come before i
    return torch.argsort(occurrence * n + torch.arange(n, device=labels.device))


class Reptile(MAML):
    """Reptile, with SGD or Adam in the inner loop.

    Args:
        backbone: the network being meta-learned.
        inner_lr: the inner learning rate (of Adam or SGD).
        inner_steps: inner steps per training task.
        eval_inner_steps: inner steps at evaluation (the paper: 50 on Omniglot, 50 on mini-ImageNet).
        inner_optimizer: ``"adam"`` (the paper's, with ``adam_betas``) or ``"sgd"``.
        adam_betas: Adam's ``(beta1, beta2)``; the paper uses ``beta1 = 0``.
        adam_eps: Adam's epsilon.
        adam_state: ``"carried"`` (Adam's moments carry over from task to task, as in the reference code) or
            ``"per_task"`` (fresh for every task).
        inner_batch_size: support examples per inner step in training (``None``: the whole support set).
        eval_inner_batch_size: the same at evaluation.
        optimizer: the outer optimizer; ``SGD(lr=epsilon)`` gives Reptile's update exactly (default ``epsilon=1``).
        **kwargs: see :class:`~lit_meta.algorithms.base.MetaLearner`. MAML's second-order and MAML++ options do not
            apply: Reptile is first order and has no query loss.
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.001,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        inner_optimizer: str = "adam",
        adam_betas: tuple[float, float] = (0.0, 0.999),
        adam_eps: float = 1e-8,
        adam_state: str = "carried",
        inner_batch_size: int | None = None,
        eval_inner_batch_size: int | None = None,
        optimizer: OptimizerCallable = reptile_optimizer,
        **kwargs,
    ) -> None:
        # The CLI passes every MAML argument it knows of with its default; only a real request is an error.
        for name in ("multi_step_loss", "lslr", "first_order_epochs"):
            if kwargs.pop(name, None):
                raise ConfigError(f"Reptile has no query loss or inner learning-rate meta-gradient: {name} does not apply")
        kwargs.pop("first_order", None)  # always first order
        kwargs.pop("msl_epochs", None)
        if inner_steps == 0:
            raise ConfigError("Reptile moves toward the weights its inner steps reach: inner_steps must be positive")
        if inner_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"inner_optimizer must be 'adam' or 'sgd', got {inner_optimizer!r}")
        if adam_state not in ("carried", "per_task"):
            raise ConfigError(f"adam_state must be 'carried' or 'per_task', got {adam_state!r}")
        for name, value in (("inner_batch_size", inner_batch_size), ("eval_inner_batch_size", eval_inner_batch_size)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer or null, got {value!r}")
        super().__init__(
            backbone,
            inner_lr,
            inner_steps,
            eval_inner_steps,
            first_order=True,
            optimizer=optimizer,
            **kwargs,
        )
        self.inner_optimizer = inner_optimizer
        self.adam_betas = tuple(adam_betas)
        self.adam_eps = adam_eps
        self.adam_state = adam_state
        carried = inner_optimizer == "adam" and adam_state == "carried"
        self.inner_adam = InnerAdamState(dict(self.backbone.named_parameters()), inner_steps) if carried else None
        self.inner_batch_size = inner_batch_size
        self.eval_inner_batch_size = eval_inner_batch_size

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # A checkpoint written before the moments were carried has none: a zero state with no steps taken is a fresh
        # Adam, which is what that model adapted with.
        state = checkpoint.get("state_dict")
        if self.inner_adam is not None and isinstance(state, dict):
            for name, buffer in self.inner_adam.named_buffers(prefix="inner_adam"):
                state.setdefault(name, torch.zeros_like(buffer))

    def adapt_task(self, support_x: Tensor, support_y: Tensor, training: bool, steps: int | None = None) -> tuple[list[Params], Params]:
        """Train a detached copy of the weights on the support set; returns ``([phi], buffers)``.

        Reptile needs no graph through the inner loop (its objective stops the gradient at ``phi``), so the inner
        loop runs on detached weights and keeps nothing for the backward pass.
        """
        params = {k: v.detach() for k, v in self.backbone.named_parameters()}
        buffers = {k: v.detach() for k, v in self.backbone.named_buffers()}
        steps = self.steps(training) if steps is None else steps
        batch = self.inner_batch_size if training else self.eval_inner_batch_size
        update = None
        if self.inner_optimizer == "adam":
            update = InnerAdam(self.inner_lr, self.adam_betas, self.adam_eps, self.inner_adam)
        options = dict(
            loss_fn=task_loss,
            step_size=self.inner_lr,
            first_order=True,
            context=buffers,
            loss_scale=self.inner_loss_scale() if training else 1.0,
            update=update,
        )
        n = support_x.shape[0]
        if batch is None or batch >= n:
            params = adapt(self.backbone, params, support_x, support_y, steps=steps, **options)[-1]
        else:
            if not torch.is_floating_point(support_y):
                order = shot_major_order(support_y)
                support_x, support_y = support_x[order], support_y[order]
            for step in range(steps):
                index = torch.tensor([(step * batch + i) % n for i in range(batch)], device=support_x.device)
                params = adapt(self.backbone, params, support_x[index], support_y[index], steps=1, **options)[-1]
        if training and self.inner_adam is not None:
            self.inner_adam.record(update.m, update.v)
        return [params], buffers

    def task_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        (phi,), buffers = self.adapt_task(support_x, support_y, training)

        def forward(x: Tensor) -> Tensor:
            return functional_call(self.backbone, {**buffers, **phi}, (x,))

        if training:
            # grad_theta of 1/2 ||theta - stopgrad(phi)||^2 is theta - phi: the outer SGD step is Reptile's.
            theta = dict(self.backbone.named_parameters())
            objective = 0.5 * sum(((theta[k] - phi[k].detach()) ** 2).sum() for k in theta)
            with torch.no_grad():
                predictions = forward(query_x)  # only for the training accuracy
            return objective, predictions
        predictions = query_outputs(forward, support_x, query_x, self.normalization, self.vectorize)
        return task_loss(predictions, query_y), predictions
