r"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019): meta-gradients without back-propagating through
the inner loop.

For a task with support set ``S`` and query set ``Q`` the inner problem is regularized towards the initialization,

    phi*(theta) = argmin_phi  L_S(phi) + (lambda / 2) ||phi - theta||^2,

solved approximately by ``inner_steps`` gradient steps from ``phi = theta``. At its optimum
``grad L_S(phi*) + lambda (phi* - theta) = 0``, so the implicit function theorem gives
``d phi* / d theta = (I + H / lambda)^{-1}`` with ``H`` the support loss's Hessian at ``phi*``, and the meta-gradient of
the query loss is

    g = (I + H / lambda)^{-1} grad L_Q(phi*),

found by ``cg_steps`` of conjugate gradient on Hessian-vector products (``torch.func.vjp`` of the support gradient,
linearized once per task). Nothing of the inner loop is kept for the backward pass: memory does not depend on the number of
inner steps. The objective returned per task has the query loss as its value and ``g`` as its gradient with respect
to the meta-parameters, so the outer step, DDP's all-reduce and chunked accumulation work as for every algorithm.

This is iMAML with a gradient-descent inner solver (the paper's "iMAML, GD" rows); its "Hessian-free" rows solve the
inner problem with a second-order method.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from datamodules.errors import ConfigError, require_positive
from datamodules.task_batch import TaskBatch
from lit_meta.adaptation import Params, adapt, map_tasks
from lit_meta.algorithms.base import MetaLearner, task_loss
from lit_meta.backbones import refuse_fused_norm_for_second_order
from lit_meta.normalization import not_recording, query_outputs


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _norm(a: Params) -> Tensor:
    return torch.sqrt(_dot(a, a))


def conjugate_gradient(apply: Callable[[Params], Params], b: Params, steps: int, eps: float = 1e-12) -> Params:
    """``steps`` iterations of conjugate gradient on ``apply(x) = b`` (``apply`` symmetric positive definite), from 0.

    A fixed number of iterations and no data-dependent branches, so it runs under ``torch.func.vmap``.
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = _dot(r, r)
    for _ in range(steps):
        ap = apply(p)
        alpha = rs / (_dot(p, ap) + eps)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = _dot(r, r)
        p = {k: r[k] + (rs_new / (rs + eps)) * p[k] for k in p}
        rs = rs_new
    return x


class IMAML(MetaLearner):
    """Implicit MAML with a gradient-descent inner solver.

    Args:
        backbone: the network being meta-learned (a classifier ``head`` for classification).
        inner_lr: step size of the inner gradient descent on ``L_S(phi) + lambda/2 ||phi - theta||^2``.
        inner_steps: inner steps in meta-training.
        eval_inner_steps: inner steps at validation and test (default ``inner_steps``).
        lam: the proximal regularization ``lambda``.
        cg_steps: conjugate-gradient iterations for the implicit meta-gradient.
        cg_damping: solve ``(I + H / (lam + cg_damping)) g = grad L_Q`` instead of ``(I + H / lam) g = grad L_Q``. The
            support loss of a network is not convex: ``I + H / lam`` can be indefinite, and then conjugate gradient
            is not a solver. Damping shrinks the curvature correction towards the first-order meta-gradient
            ``grad L_Q(phi)`` without changing the inner problem. Rajeswaran et al.'s released Omniglot code solves
            ``2 g + H g / (lam + 10) = grad L_Q``: this system with ``cg_damping = lam + 20``, up to a factor 2.
        monitor_every: every this many training steps, log how well the two solves hold (see
            :meth:`solver_residuals`): ``train/inner_residual`` and ``train/cg_residual``, means over the meta-batch.
            ``0`` turns it off.
        **kwargs: see :class:`~lit_meta.algorithms.base.MetaLearner` (optimizer, scheduler, vectorize, chunk_size,
            normalization).
    """

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.1,
        inner_steps: int = 16,
        eval_inner_steps: int | None = None,
        lam: float = 2.0,
        cg_steps: int = 5,
        cg_damping: float = 0.0,
        monitor_every: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        require_positive(inner_steps=inner_steps, eval_inner_steps=eval_inner_steps, cg_steps=cg_steps)
        if not lam > 0:
            raise ConfigError(f"lam (the proximal regularization) must be positive, got {lam!r}")
        if not cg_damping >= 0:
            raise ConfigError(f"cg_damping must be zero or positive, got {cg_damping!r}")
        if monitor_every < 0:
            raise ConfigError(f"monitor_every must be zero (off) or positive, got {monitor_every!r}")
        self.monitor_every = monitor_every
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.lam = float(lam)
        self.cg_steps = cg_steps
        self.cg_damping = float(cg_damping)
        # The Hessian-vector products are second-order derivatives of the backbone, taken under vmap.
        refuse_fused_norm_for_second_order(self.backbone, True, self.vectorize, type(self).__name__)

    def head_outputs(self) -> int | None:
        head = getattr(self.backbone, "head", None)
        return head.out_features if isinstance(head, nn.Linear) else None

    def steps(self, training: bool) -> int:
        return self.inner_steps if training else self.eval_inner_steps

    def solve_inner(self, support_x: Tensor, support_y: Tensor, steps: int) -> tuple[Params, Params]:
        """``(phi, buffers)``: ``steps`` of proximal gradient descent from the (detached) meta-parameters."""
        theta = {k: v.detach() for k, v in self.backbone.named_parameters()}
        buffers = {k: v.detach() for k, v in self.backbone.named_buffers()}
        lr, lam = self.inner_lr, self.lam

        def proximal_step(step: int, params: Params, grads: Params) -> Params:
            return {k: params[k] - lr * (grads[k] + lam * (params[k] - theta[k])) for k in params}

        trajectory = adapt(
            self.backbone, theta, support_x, support_y, loss_fn=task_loss, steps=steps, step_size=lr,
            first_order=True, context=buffers, update=proximal_step,
        )
        return trajectory[-1], buffers

    def _support_curvature(self, phi: Params, buffers: Params, support_x: Tensor, support_y: Tensor) -> tuple[Params, Callable[[Params], Params]]:
        """``(grad L_S(phi), v -> (I + H / (lam + cg_damping)) v)``, with the support gradient linearized once at phi:
        each application is then one Hessian-vector product (reverse over reverse; H is symmetric, so its
        vector-Jacobian product is H v)."""
        support_grad, hessian_vector = torch.func.vjp(torch.func.grad(self._loss_on(buffers, support_x, support_y)), phi)
        scale = self.lam + self.cg_damping

        def apply(v: Params) -> Params:
            (hv,) = hessian_vector(v)
            return {k: v[k] + hv[k] / scale for k in v}

        return support_grad, apply

    def _loss_on(self, buffers: Params, x: Tensor, y: Tensor) -> Callable[[Params], Tensor]:
        return lambda p: task_loss(functional_call(self.backbone, {**buffers, **p}, (x,)), y)

    def implicit_gradient(self, phi: Params, buffers: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Params:
        """``(I + H / (lambda + cg_damping))^{-1} grad L_Q(phi)`` by conjugate gradient (``H``: the support loss's
        Hessian at phi)."""
        # These passes run inside torch.func transforms: their normalization statistics are not training's.
        with not_recording():
            _, apply = self._support_curvature(phi, buffers, support_x, support_y)
            query_grad = torch.func.grad(self._loss_on(buffers, query_x, query_y))(phi)
            return conjugate_gradient(apply, query_grad, self.cg_steps)

    def solver_residuals(self, batch: TaskBatch) -> dict[str, Tensor]:
        """How well a meta-training step's two approximate solves hold, per task (``[T]`` each).

        The implicit meta-gradient is exact only at the inner optimum and for an exact linear solve:

        - ``inner_residual``: ``|grad L_S(phi) + lam (phi - theta)| / |grad L_S(theta)|``, the inner problem's
          stationarity after ``inner_steps`` (0 at the optimum, 1 for no progress from theta; growing values mean
          the inner step size is too large for the support loss's curvature);
        - ``cg_residual``: ``|A g - grad L_Q(phi)| / |grad L_Q(phi)|`` with ``A = I + H / (lam + cg_damping)`` and
          ``g`` the conjugate-gradient answer (well above 1 when ``A`` is indefinite: raise ``cg_damping``).
        """

        def per_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            phi, buffers = self.solve_inner(sx, sy, self.inner_steps)
            theta = {k: v.detach() for k, v in self.backbone.named_parameters()}
            support_grad, apply = self._support_curvature(phi, buffers, sx, sy)
            start_grad = torch.func.grad(self._loss_on(buffers, sx, sy))(theta)
            stationarity = {k: support_grad[k] + self.lam * (phi[k] - theta[k]) for k in phi}
            query_grad = torch.func.grad(self._loss_on(buffers, qx, qy))(phi)
            g = conjugate_gradient(apply, query_grad, self.cg_steps)
            ag = apply(g)
            miss = {k: ag[k] - query_grad[k] for k in g}
            tiny = 1e-30
            return (_norm(stationarity) / _norm(start_grad).clamp_min(tiny)).detach(), (_norm(miss) / _norm(query_grad).clamp_min(tiny)).detach()

        with not_recording():
            inner, cg = map_tasks(
                per_task, batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                vectorize=self.vectorize, chunk_size=self.chunk_size,
            )
        return {"inner_residual": inner, "cg_residual": cg}

    def task_step(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        phi, buffers = self.solve_inner(support_x, support_y, self.steps(training))

        def forward(x: Tensor) -> Tensor:
            return functional_call(self.backbone, {**buffers, **phi}, (x,))

        predictions = query_outputs(forward, support_x, query_x, self.protocol(training), self.vectorize)
        loss = task_loss(predictions, query_y)
        if not training:
            return loss, predictions
        g = self.implicit_gradient(phi, buffers, support_x, support_y, query_x, query_y)
        # Value: the query loss; gradient with respect to theta: g (phi and g are constants of the outer backward).
        theta = dict(self.backbone.named_parameters())
        surrogate = sum((theta[k] * g[k].detach()).sum() for k in theta)
        return loss.detach() + surrogate - surrogate.detach(), predictions

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.monitor_every and batch_idx % self.monitor_every == 0:
            with self.inner_loop_precision():
                values = self.solver_residuals(batch)
            for key, value in values.items():
                self.log(f"train/{key}", value.mean(), on_step=True, on_epoch=True, batch_size=batch.num_tasks)
        return loss
