"""MAML's meta-gradient against an independent per-task reference written with plain autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from datamodules import SinusoidDataModule, TaskBatch
from lit_meta import MAML, Conv4, SinusoidMLP


def reference_meta_gradient(model, batch, inner_lr, steps, first_order):
    """Mean over tasks of d L_query(theta_k) / d theta, one task at a time, with torch.autograd.grad."""
    params = dict(model.named_parameters())
    names = list(params)
    loss_fn = F.mse_loss if torch.is_floating_point(batch.support_y) else F.cross_entropy
    total = None
    for t in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(steps):
            loss = loss_fn(functional_call(model, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order)
            fast = {n: fast[n] - inner_lr * g for n, g in zip(names, grads)}
        query = loss_fn(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
        g = torch.autograd.grad(query, [params[n] for n in names])
        total = g if total is None else [a + b for a, b in zip(total, g)]
    return [g / batch.num_tasks for g in total]


def library_meta_gradient(learner, batch):
    learner.zero_grad()
    learner.meta_loss(batch).backward()
    return [p.grad.clone() for p in learner.backbone.parameters()]


def assert_close(actual, expected, rtol=1e-5):
    """Relative to the largest gradient entry overall: conv biases before a norm have (numerically) zero gradient."""
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 0
    for a, e in zip(actual, expected):
        err = float((a - e).abs().max()) / scale
        assert err < rtol, f"relative error {err:.2e}"


def sinusoid_batch(tasks=4):
    dm = SinusoidDataModule(shots=5, queries=7, meta_batch_size=tasks)
    batch = next(iter(dm.train_dataloader()))
    return batch.to(torch.float64)


def omniglot_like_batch(tasks=3, ways=3, shots=2, queries=2, size=14):
    g = torch.Generator().manual_seed(1)
    x_s = torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=torch.float64)
    x_q = torch.rand(tasks, ways * queries, 1, size, size, generator=g, dtype=torch.float64)
    y_s = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    y_q = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(x_s, y_s, x_q, y_q)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_sinusoid_meta_gradient_matches_per_task_reference(first_order, steps):
    torch.manual_seed(0)
    backbone = SinusoidMLP().double()
    batch = sinusoid_batch()
    expected = reference_meta_gradient(backbone, batch, 0.01, steps, first_order)
    for vectorize in (True, False):
        learner = MAML(backbone, inner_lr=0.01, inner_steps=steps, first_order=first_order, vectorize=vectorize)
        assert_close(library_meta_gradient(learner, batch), expected)


@pytest.mark.parametrize("first_order", [False, True])
def test_conv4_meta_gradient_matches_per_task_reference(first_order):
    torch.manual_seed(0)
    backbone = Conv4(in_channels=1, hidden=8, out_features=3, pool="stride", image_size=14, embedding="mean").double()
    batch = omniglot_like_batch()
    expected = reference_meta_gradient(backbone, batch, 0.4, 2, first_order)
    looped = library_meta_gradient(MAML(backbone, inner_lr=0.4, inner_steps=2, first_order=first_order, vectorize=False), batch)
    vmapped = library_meta_gradient(MAML(backbone, inner_lr=0.4, inner_steps=2, first_order=first_order, vectorize=True), batch)
    assert_close(looped, expected)
    assert_close(vmapped, expected)


def test_second_order_differs_from_first_order():
    """Guards the comparison above: the two orders must not coincide, or the tests could not tell them apart."""
    torch.manual_seed(0)
    backbone = SinusoidMLP().double()
    batch = sinusoid_batch()
    second = reference_meta_gradient(backbone, batch, 0.01, 3, first_order=False)
    first = reference_meta_gradient(backbone, batch, 0.01, 3, first_order=True)
    diff = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(second, first))
    assert diff > 1e-4


def test_meta_loss_is_mean_of_per_task_losses():
    torch.manual_seed(0)
    learner = MAML(SinusoidMLP().double(), inner_lr=0.01)
    batch = sinusoid_batch()
    per_task = torch.stack([learner.meta_loss(batch.task(i)) for i in range(batch.num_tasks)])
    torch.testing.assert_close(learner.meta_loss(batch), per_task.mean())


def test_inference_mode_gives_clear_error():
    learner = MAML(SinusoidMLP(), inner_lr=0.01)
    batch = SinusoidDataModule(meta_batch_size=2).val_dataloader().batch(0)
    with torch.inference_mode(), pytest.raises(Exception, match="inference mode"):
        learner.validation_step(batch, 0)
