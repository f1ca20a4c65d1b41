"""Implicit MAML: the meta-gradient against the closed-form implicit gradient of a linear least-squares problem and
against finite differences on a Conv-4; vectorized equals looped."""

from __future__ import annotations

import copy

import torch
from torch import nn

from datamodules.task_batch import TaskBatch
from lit_meta import IMAML
from lit_meta.algorithms.imaml import conjugate_gradient
from lit_meta.backbones import BatchStatNorm, Conv4


def regression_tasks(tasks: int = 3, n: int = 8, dim: int = 4) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(tasks, dim, 1, generator=g, dtype=torch.float64)
    sx = torch.randn(tasks, n, dim, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, n, dim, generator=g, dtype=torch.float64)
    return TaskBatch(sx, sx @ w, qx, qx @ w + 0.1)


def meta_gradient(model: nn.Module, batch: TaskBatch) -> list[torch.Tensor]:
    model.zero_grad()
    model.meta_loss(batch).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def test_conjugate_gradient_solves_a_symmetric_system():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: {"v": a @ v["v"]}, {"v": b}, steps=6)["v"]
    torch.testing.assert_close(x, torch.linalg.solve(a, b))


def test_meta_gradient_equals_the_closed_form_implicit_gradient():
    """Linear model, squared loss: phi* = (H + lambda I)^{-1} (lambda theta + (2/n) X^T y) with H = (2/n) X^T X, and
    the meta-gradient of L_Q(phi*) is lambda (H + lambda I)^{-1} grad L_Q(phi*), averaged over the tasks."""
    torch.manual_seed(0)
    batch = regression_tasks()
    net = nn.Linear(4, 1, bias=False).double()
    lam = 2.0
    # Enough inner steps to reach the inner optimum (to float64 precision), CG steps = the dimension (exact).
    model = IMAML(net, inner_lr=0.1, inner_steps=400, lam=lam, cg_steps=4, vectorize=True)
    (grad,) = meta_gradient(model, batch)
    theta = net.weight.detach().reshape(-1)
    expected = torch.zeros(4, dtype=torch.float64)
    for t in range(batch.num_tasks):
        x, y = batch.support_x[t], batch.support_y[t].reshape(-1)
        qx, qy = batch.query_x[t], batch.query_y[t].reshape(-1)
        h = 2.0 / len(x) * x.T @ x
        phi = torch.linalg.solve(h + lam * torch.eye(4, dtype=torch.float64), lam * theta + 2.0 / len(x) * x.T @ y)
        query_grad = 2.0 / len(qx) * qx.T @ (qx @ phi - qy)
        expected += lam * torch.linalg.solve(h + lam * torch.eye(4, dtype=torch.float64), query_grad) / batch.num_tasks
        adapted, _ = model.solve_inner(batch.support_x[t], batch.support_y[t], 400)
        torch.testing.assert_close(adapted["weight"].reshape(-1), phi)
    torch.testing.assert_close(grad.reshape(-1), expected, rtol=1e-8, atol=1e-10)
    # Not the first-order answer (the plain query gradient at phi*): the implicit correction matters here.
    assert not torch.allclose(grad.reshape(-1), expected * 0 + query_grad, atol=1e-3)


def test_cg_damping_solves_the_damped_system():
    """With ``cg_damping = d`` the meta-gradient is ``(I + H / (lambda + d))^{-1} grad L_Q(phi*)`` (the inner problem,
    and so phi*, keep lambda); a very large d gives the first-order answer ``grad L_Q(phi*)``."""
    batch = regression_tasks()
    lam, damping = 2.0, 3.0
    grads = {}
    for d in (damping, 1e12):
        net = nn.Linear(4, 1, bias=False).double()
        torch.nn.init.constant_(net.weight, 0.1)
        model = IMAML(net, inner_lr=0.1, inner_steps=400, lam=lam, cg_steps=4, cg_damping=d, vectorize=True)
        (grads[d],) = meta_gradient(model, batch)
    theta = torch.full((4,), 0.1, dtype=torch.float64)
    damped = torch.zeros(4, dtype=torch.float64)
    first_order = torch.zeros(4, dtype=torch.float64)
    for t in range(batch.num_tasks):
        x, y = batch.support_x[t], batch.support_y[t].reshape(-1)
        qx, qy = batch.query_x[t], batch.query_y[t].reshape(-1)
        h = 2.0 / len(x) * x.T @ x
        eye = torch.eye(4, dtype=torch.float64)
        phi = torch.linalg.solve(h + lam * eye, lam * theta + 2.0 / len(x) * x.T @ y)
        query_grad = 2.0 / len(qx) * qx.T @ (qx @ phi - qy)
        damped += torch.linalg.solve(eye + h / (lam + damping), query_grad) / batch.num_tasks
        first_order += query_grad / batch.num_tasks
    torch.testing.assert_close(grads[damping].reshape(-1), damped, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grads[1e12].reshape(-1), first_order, rtol=1e-8, atol=1e-10)


def image_tasks(tasks: int = 2, size: int = 16) -> TaskBatch:
    g = torch.Generator().manual_seed(2)
    draw = lambda n: torch.rand(tasks, 3 * n, 1, size, size, generator=g, dtype=torch.float64)  # noqa: E731
    labels = lambda n: torch.arange(3).repeat_interleave(n).expand(tasks, -1).clone()  # noqa: E731
    return TaskBatch(draw(5), labels(5), draw(2), labels(2))


def conv_model(vectorize: bool = True, inner_steps: int = 20) -> IMAML:
    torch.manual_seed(0)
    net = Conv4(in_channels=1, hidden=4, out_features=3, image_size=16, blocks=2, pool="stride", embedding="mean", init="torch")
    return IMAML(net.double(), inner_lr=0.01, inner_steps=inner_steps, lam=5.0, cg_steps=10, vectorize=vectorize)


def smooth_model() -> IMAML:
    """Conv -> BatchStatNorm -> tanh, twice, then a linear head: smooth, so inner gradient descent reaches the inner
    optimum to the precision finite differences need (with ReLU's kinks it stalls about 1e-2 short of it)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), BatchStatNorm(4), nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), BatchStatNorm(4), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).double()
    return IMAML(net, inner_lr=0.05, inner_steps=300, lam=5.0, cg_steps=40)


def test_meta_gradient_agrees_with_finite_differences():
    """At a converged inner solution the implicit meta-gradient is the gradient of theta -> L_Q(phi*(theta)):
    central differences along a random direction agree with it (a convolutional network with batch statistics)."""
    model = smooth_model()
    batch = image_tasks()
    grads = meta_gradient(model, batch)
    g = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))

    def objective(sign: float) -> float:
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for p, d in zip(shifted.parameters(), direction):
                p.add_(sign * 1e-4 * d)
        with torch.enable_grad():
            return float(shifted.task_outputs(batch, training=True)[0].mean())

    numeric = (objective(1.0) - objective(-1.0)) / 2e-4
    assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(analytic)), (numeric, analytic)
    assert abs(analytic) > 1e-3


def test_vectorized_equals_looped():
    batch = image_tasks()
    a = meta_gradient(conv_model(vectorize=True, inner_steps=20), batch)
    b = meta_gradient(conv_model(vectorize=False, inner_steps=20), batch)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)


def test_solver_residuals_measure_the_inner_optimum_and_the_linear_solve():
    """On the least-squares problem: a converged inner loop and an exact CG give residuals at rounding level; one
    inner step leaves most of the stationarity gap and one CG step most of the linear residual."""
    batch = regression_tasks()
    net = nn.Linear(4, 1, bias=False).double()
    converged = IMAML(copy.deepcopy(net), inner_lr=0.1, inner_steps=400, lam=2.0, cg_steps=4).solver_residuals(batch)
    assert converged["inner_residual"].max() < 1e-10 and converged["cg_residual"].max() < 1e-8
    rough = IMAML(copy.deepcopy(net), inner_lr=0.01, inner_steps=1, lam=2.0, cg_steps=1).solver_residuals(batch)
    assert (rough["inner_residual"] > 0.5).all() and (rough["cg_residual"] > 1e-3).all()
