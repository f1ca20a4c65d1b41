"""MAML, FOMAML, ANIL, Meta-SGD, MAML++ and Reptile: exact meta-gradients, learning, chunked accumulation, configs.

* Meta-gradients: the references are written with plain ``torch.autograd.grad`` loops over tasks
  (``create_graph=True`` for second order) or ``torch.optim`` on a copy of the network (Reptile), never with
  :mod:`lit_meta.adaptation`. Every comparison runs in float64 on tiny shapes, for ``vectorize=True`` (vmap) and
  ``vectorize=False`` (loop), to 1e-5 relative.
* Learning: a few dozen meta-updates through Lightning's ``Trainer`` on a tiny synthetic problem raise accuracy.
* ``chunk_size``: accumulating the meta-gradient chunk by chunk gives the same update as the whole batch.
* Configs: every paper-row config instantiates through the CLI with the paper's settings; checkpoints round-trip.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from datamodules import TaskBatch
from datamodules.base import EpisodicDataModule
from datamodules.errors import ConfigError
from lit_meta import ANIL, MAML, Conv4, MetaSGD, Reptile, SinusoidMLP
from lit_meta.algorithms.maml import multi_step_loss_weights
from lit_meta.backbones import uses_fused_norm
from lit_meta.normalization import recording, update_running_statistics

from conftest import cpu_trainer as trainer

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 3


# ------------------------------------------------------------------------------------------------ fixtures/data
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors on a 2-core machine: intra-op threads only contend (measured ~20x slower with 2 threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available|LitLogger|TPU available|LeafSpec).*")
        yield


def labels(tasks: int, ways: int, per_class: int) -> torch.Tensor:
    return torch.arange(ways).repeat_interleave(per_class).expand(tasks, -1).contiguous()


def vector_tasks(tasks=TASKS, ways=WAYS, shots=SHOTS, queries=QUERIES, dim=5, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, ways * shots, dim, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, ways * queries, dim, generator=g, dtype=torch.float64)
    return TaskBatch(sx, labels(tasks, ways, shots), qx, labels(tasks, ways, queries))


def image_tasks(tasks=TASKS, ways=WAYS, shots=SHOTS, queries=QUERIES, size=8, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, ways * shots, 1, size, size, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, ways * queries, 1, size, size, generator=g, dtype=torch.float64)
    return TaskBatch(sx, labels(tasks, ways, shots), qx, labels(tasks, ways, queries))


def mlp() -> nn.Module:
    return SinusoidMLP(in_features=5, hidden=(7, 6), out_features=WAYS).double()


def conv() -> nn.Module:
    # Finn et al.'s Omniglot network in miniature: stride-2 convs, batch-statistics norm, spatial mean, head.
    return Conv4(1, hidden=3, out_features=WAYS, pool="stride", image_size=8, embedding="mean").double()


NETWORKS = {"mlp": (mlp, vector_tasks), "conv4": (conv, image_tasks)}


# -------------------------------------------------------------------------------------------------- references
def reference_meta_loss(
    backbone: nn.Module,
    batch: TaskBatch,
    *,
    steps: int,
    lr: Callable[[str, int], torch.Tensor | float],
    adapted: Callable[[str], bool] = lambda name: True,
    first_order: bool = False,
    step_weights: list[float] | None = None,
) -> torch.Tensor:
    """Mean over tasks of the outer objective, one task at a time, with ``torch.autograd.grad``.

    ``lr(name, step)`` is the inner rate of a parameter at a step (a float, a scalar tensor, or a tensor shaped like
    the parameter); ``adapted`` selects the parameters of the inner loop; ``step_weights`` gives the multi-step loss.
    """
    params = dict(backbone.named_parameters())
    total = 0.0
    for t in range(batch.num_tasks):
        fast = {n: p for n, p in params.items() if adapted(n)}
        query_losses = []
        for step in range(steps):
            out = functional_call(backbone, {**params, **fast}, (batch.support_x[t],))
            loss = F.cross_entropy(out, batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - lr(n, step) * g for (n, p), g in zip(fast.items(), grads)}
            query = functional_call(backbone, {**params, **fast}, (batch.query_x[t],))
            query_losses.append(F.cross_entropy(query, batch.query_y[t]))
        if step_weights is None:
            total = total + query_losses[-1]
        else:
            total = total + sum(w * q for w, q in zip(step_weights, query_losses))
    return total / batch.num_tasks


def gradients(loss: torch.Tensor, module: nn.Module) -> list[torch.Tensor]:
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_rel_close(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float = 1e-5) -> None:
    """``||a - e|| <= rtol ||e||`` over all gradients, and per tensor relative to the largest entry overall."""
    assert len(actual) == len(expected)
    a, e = torch.cat([x.flatten() for x in actual]), torch.cat([x.flatten() for x in expected])
    assert float(e.norm()) > 0
    err = float((a - e).norm() / e.norm())
    assert err < rtol, f"relative error {err:.2e}"
    scale = float(e.abs().max())
    for x, y in zip(actual, expected):
        assert float((x - y).abs().max()) / scale < rtol


def check_against_reference(make: Callable[[bool], MAML], batch: TaskBatch, reference: Callable[[MAML], torch.Tensor]) -> None:
    """The learner's meta-gradient (vmap and loop) equals the reference's, over every learner parameter."""
    for vectorize in (True, False):
        learner = make(vectorize)
        expected = gradients(reference(learner), learner)
        actual = gradients(learner.meta_loss(batch), learner)
        assert_rel_close(actual, expected)


def build(cls, backbone_fn, vectorize, **kwargs):
    torch.manual_seed(0)  # the same initialization for both vectorize settings
    return cls(backbone_fn(), vectorize=vectorize, **kwargs).double()


# ------------------------------------------------------------------------------------------------ MAML / FOMAML
@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient(network, first_order):
    backbone_fn, data = NETWORKS[network]
    batch = data()
    check_against_reference(
        lambda v: build(MAML, backbone_fn, v, inner_lr=0.4, inner_steps=2, first_order=first_order),
        batch,
        lambda m: reference_meta_loss(m.backbone, batch, steps=2, lr=lambda n, s: 0.4, first_order=first_order),
    )


def test_first_and_second_order_differ():
    """Guards the tests: on these tasks the two orders give clearly different meta-gradients."""
    batch = vector_tasks()
    learner = build(MAML, mlp, True, inner_lr=0.4, inner_steps=2)
    second = gradients(learner.meta_loss(batch), learner)
    learner.first_order = True
    first = gradients(learner.meta_loss(batch), learner)
    a, b = torch.cat([x.flatten() for x in second]), torch.cat([x.flatten() for x in first])
    assert float((a - b).norm() / a.norm()) > 1e-3


# ------------------------------------------------------------------------------------------------------- ANIL
@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_meta_gradient(network, first_order):
    """The feature-caching inner loop equals adapting ``head.*`` inside the full network, as the reference does."""
    backbone_fn, data = NETWORKS[network]
    batch = data()
    check_against_reference(
        lambda v: build(ANIL, backbone_fn, v, inner_lr=0.4, inner_steps=3, first_order=first_order),
        batch,
        lambda m: reference_meta_loss(
            m.backbone, batch, steps=3, lr=lambda n, s: 0.4, adapted=lambda n: n.startswith("head."), first_order=first_order
        ),
    )


# ------------------------------------------------------------------------------------------------- fused norm
def fused_conv() -> nn.Module:
    return Conv4(1, hidden=3, out_features=WAYS, pool="stride", image_size=8, embedding="mean", fused_norm=True).double()


@pytest.mark.parametrize(
    "cls,first_order", [(MAML, True), (ANIL, False), (ANIL, True)], ids=["fomaml", "anil", "anil-first_order"]
)
def test_fused_norm_is_exact_where_it_is_allowed(cls, first_order):
    """Where the norm needs only first derivatives (FOMAML; ANIL, whose second-order terms stay in the head), the
    native batch-norm kernel gives the meta-gradient of the per-task reference on the plain network."""
    batch = image_tasks()
    adapted = (lambda n: n.startswith("head.")) if cls is ANIL else (lambda n: True)
    for vectorize in (True, False):
        learner = build(cls, fused_conv, vectorize, inner_lr=0.4, inner_steps=2, first_order=first_order)
        plain = conv()
        plain.load_state_dict(learner.backbone.state_dict())
        expected = gradients(reference_meta_loss(plain, batch, steps=2, lr=lambda n, s: 0.4, adapted=adapted, first_order=first_order), plain)
        assert_rel_close(gradients(learner.meta_loss(batch), learner.backbone), expected)


def test_fused_norm_is_refused_where_its_second_derivatives_are_used():
    with pytest.raises(ConfigError, match="fused_norm"):
        MAML(fused_conv())
    with pytest.raises(ConfigError, match="fused_norm"):
        MAML(fused_conv(), first_order_epochs=3)  # MAML++'s derivative-order annealing: second order later
    MAML(fused_conv(), vectorize=False)  # outside vmap the native kernel's second derivatives are right


def test_anil_adapts_only_the_head_and_body_still_learns():
    learner = build(ANIL, conv, True, inner_lr=0.4, inner_steps=2)
    assert set(learner.fast_parameters()) == {"head.weight", "head.bias"}
    grads = dict(zip([n for n, _ in learner.named_parameters()], gradients(learner.meta_loss(image_tasks()), learner)))
    assert float(grads["backbone.features.0.0.weight"].abs().max()) > 0  # meta-gradient reaches the body


def test_anil_without_embed_falls_back_to_full_forward():
    class NoEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
            self.head = nn.Linear(6, WAYS)

        def forward(self, x):
            return self.head(self.body(x))

    batch = vector_tasks()
    check_against_reference(
        lambda v: build(ANIL, lambda: NoEmbed().double(), v, inner_lr=0.4, inner_steps=2),
        batch,
        lambda m: reference_meta_loss(m.backbone, batch, steps=2, lr=lambda n, s: 0.4, adapted=lambda n: n.startswith("head.")),
    )


def test_anil_needs_a_head():
    with pytest.raises(ConfigError, match="head"):
        ANIL(Conv4(out_features=None))


# ----------------------------------------------------------------------------------------------------- MetaSGD
@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (2, True)])
def test_metasgd_meta_gradient(network, steps, first_order):
    backbone_fn, data = NETWORKS[network]
    batch = data()

    def make(vectorize):
        learner = build(MetaSGD, backbone_fn, vectorize, inner_lr=0.3, inner_steps=steps, first_order=first_order)
        with torch.no_grad():  # distinct rates per entry, so a mix-up of entries would show
            for rate in learner.inner_lrs.values():
                rate.uniform_(0.1, 0.5, generator=torch.Generator().manual_seed(rate.numel()))
        return learner

    def reference(m):
        return reference_meta_loss(
            m.backbone, batch, steps=steps, lr=lambda n, s: m.inner_lrs[n.replace(".", "-")], first_order=first_order
        )

    check_against_reference(make, batch, reference)


def test_metasgd_rates_are_parameters_shaped_like_the_weights():
    learner = MetaSGD(mlp(), inner_lr=0.25)
    for name, p in learner.backbone.named_parameters():
        rate = learner.inner_lrs[name.replace(".", "-")]
        assert isinstance(rate, nn.Parameter) and rate.shape == p.shape and bool((rate == 0.25).all())
    assert {id(r) for r in learner.inner_lrs.values()} <= {id(p) for p in learner.parameters()}
    grads = gradients(learner.meta_loss(vector_tasks()), learner.inner_lrs)
    assert all(float(g.abs().max()) > 0 for g in grads)
    with pytest.raises(ConfigError, match="lslr"):
        MetaSGD(mlp(), lslr=True)


# ------------------------------------------------------------------------------------------------------- MAML++
def test_multi_step_loss_weights_follow_the_paper():
    # HowToTrainYourMAMLPytorch's get_per_step_loss_importance_vector, steps=5, multi_step_loss_num_epochs=10.
    assert multi_step_loss_weights(5, 0, 10) == pytest.approx([0.2] * 5)
    assert multi_step_loss_weights(5, 5, 10) == pytest.approx([0.1] * 4 + [0.6])
    assert multi_step_loss_weights(5, 10, 10) == pytest.approx([0.006] * 4 + [0.976])
    for epoch in range(12):
        weights = multi_step_loss_weights(5, epoch, 10)
        assert sum(weights) == pytest.approx(1.0)
        assert weights[-1] >= weights[0]
    assert multi_step_loss_weights(1, 3, 10) == pytest.approx([1.0])


def set_epoch(monkeypatch, epoch: int) -> None:
    """``current_epoch`` without a Trainer (the property reads the trainer's)."""
    monkeypatch.setattr(MAML, "current_epoch", property(lambda self: epoch))


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("epoch", [0, 4])
def test_mamlpp_multi_step_loss_and_lslr_meta_gradient(monkeypatch, network, epoch):
    backbone_fn, data = NETWORKS[network]
    batch = data()
    steps, msl_epochs = 3, 6
    set_epoch(monkeypatch, epoch)
    weights = multi_step_loss_weights(steps, epoch, msl_epochs)
    assert len(set(weights)) > 1 or epoch == 0

    def make(vectorize):
        learner = build(MAML, backbone_fn, vectorize, inner_lr=0.3, inner_steps=steps, multi_step_loss=True, msl_epochs=msl_epochs, lslr=True)
        with torch.no_grad():
            for i, rate in enumerate(learner.inner_lrs.values()):
                rate.copy_(torch.tensor([0.2, 0.35, 0.5], dtype=rate.dtype) + 0.01 * i)
        return learner

    def reference(m):
        return reference_meta_loss(
            m.backbone, batch, steps=steps, lr=lambda n, s: m.inner_lrs[n.replace(".", "-")][s], step_weights=weights
        )

    check_against_reference(make, batch, reference)


def test_mamlpp_multi_step_loss_ends_after_msl_epochs(monkeypatch):
    batch = vector_tasks()
    set_epoch(monkeypatch, 6)
    check_against_reference(
        lambda v: build(MAML, mlp, v, inner_lr=0.3, inner_steps=3, multi_step_loss=True, msl_epochs=6),
        batch,
        lambda m: reference_meta_loss(m.backbone, batch, steps=3, lr=lambda n, s: 0.3),
    )


@pytest.mark.parametrize("epoch,first_order", [(0, True), (1, True), (2, False), (5, False)])
def test_mamlpp_derivative_order_annealing(monkeypatch, epoch, first_order):
    batch = vector_tasks()
    set_epoch(monkeypatch, epoch)
    check_against_reference(
        lambda v: build(MAML, mlp, v, inner_lr=0.3, inner_steps=2, first_order_epochs=2),
        batch,
        lambda m: reference_meta_loss(m.backbone, batch, steps=2, lr=lambda n, s: 0.3, first_order=first_order),
    )
    assert build(MAML, mlp, True, first_order_epochs=2).use_first_order(training=True) is first_order


def test_anil_with_mamlpp_options(monkeypatch):
    batch = image_tasks()
    set_epoch(monkeypatch, 1)
    weights = multi_step_loss_weights(2, 1, 3)

    def make(vectorize):
        learner = build(ANIL, conv, vectorize, inner_lr=0.3, inner_steps=2, multi_step_loss=True, msl_epochs=3, lslr=True)
        assert set(learner.inner_lrs) == {"head-weight", "head-bias"}
        with torch.no_grad():
            learner.inner_lrs["head-weight"].copy_(torch.tensor([0.2, 0.4]))
        return learner

    check_against_reference(
        make,
        batch,
        lambda m: reference_meta_loss(
            m.backbone,
            batch,
            steps=2,
            lr=lambda n, s: m.inner_lrs[n.replace(".", "-")][s],
            adapted=lambda n: n.startswith("head."),
            step_weights=weights,
        ),
    )


def test_lslr_rates_and_defaults():
    learner = MAML(mlp(), inner_lr=0.1, inner_steps=4, eval_inner_steps=6, lslr=True)
    names = [n for n, _ in learner.backbone.named_parameters()]
    assert sorted(learner.inner_lrs) == sorted(n.replace(".", "-") for n in names)
    assert all(r.shape == (4,) and bool((r == 0.1).all()) for r in learner.inner_lrs.values())
    rates = learner.step_size(training=False)
    assert all(float(v) == pytest.approx(0.1) for v in rates(5).values())  # beyond training steps: the last rate
    plain = MAML(mlp())
    assert not hasattr(plain, "inner_lrs") and plain.step_size(True) == 0.01
    assert not plain.use_multi_step_loss(True) and not plain.use_first_order(True)


# ------------------------------------------------------------------------------------------------------ Reptile
def reptile_reference(
    learner: Reptile, batch: TaskBatch, *, steps: int, inner_lr: float, adam: bool, inner_batch: int | None = None
) -> torch.Tensor:
    """``0.5 * mean_t ||theta - phi_t||^2`` with ``phi_t`` trained by ``torch.optim`` on a copy of the network."""
    total = 0.0
    for t in range(batch.num_tasks):
        net = copy.deepcopy(learner.backbone)
        opt = torch.optim.Adam(net.parameters(), lr=inner_lr, betas=(0.0, 0.999), eps=1e-8) if adam else torch.optim.SGD(net.parameters(), lr=inner_lr)
        x, y = batch.support_x[t], batch.support_y[t]
        if inner_batch is not None:
            # Shot-major order of a class-ordered support set: every class's first example, then every second...
            ways, shots = int(y.max()) + 1, x.shape[0] // (int(y.max()) + 1)
            order = [c * shots + s for s in range(shots) for c in range(ways)]
            x, y = x[order], y[order]
        for step in range(steps):
            if inner_batch is None:
                xb, yb = x, y
            else:
                idx = [(step * inner_batch + i) % x.shape[0] for i in range(inner_batch)]
                xb, yb = x[idx], y[idx]
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
        for p, phi in zip(learner.backbone.parameters(), net.parameters()):
            total = total + 0.5 * ((p - phi.detach()) ** 2).sum()
    return total / batch.num_tasks


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("adam", [False, True])
def test_reptile_meta_gradient(network, adam):
    backbone_fn, data = NETWORKS[network]
    batch = data()
    lr = 0.01 if adam else 0.3
    check_against_reference(
        lambda v: build(Reptile, backbone_fn, v, inner_lr=lr, inner_steps=3, inner_optimizer="adam" if adam else "sgd"),
        batch,
        lambda m: reptile_reference(m, batch, steps=3, inner_lr=lr, adam=adam),
    )


def test_reptile_minibatch_inner_loop():
    batch = vector_tasks(ways=3, shots=4)  # 12 support examples, batches of 5 wrap around
    check_against_reference(
        lambda v: build(Reptile, mlp, v, inner_lr=0.01, inner_steps=4, inner_batch_size=5),
        batch,
        lambda m: reptile_reference(m, batch, steps=4, inner_lr=0.01, adam=True, inner_batch=5),
    )


def reptile_carried_reference(backbone: nn.Module, batches: list[TaskBatch], *, steps: int, lr: float, eps: float) -> tuple:
    """Reptile meta-steps with torch.optim.Adam in the inner loop whose state carries over: every task of a
    meta-batch starts from the shared state, which then becomes the mean of the tasks' final states."""
    theta = copy.deepcopy(backbone)
    shared: list[dict] | None = None
    for batch in batches:
        phis, finals = [], []
        for t in range(batch.num_tasks):
            net = copy.deepcopy(theta)
            opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
            if shared is not None:
                for p, state in zip(net.parameters(), shared):
                    opt.state[p] = {k: v.clone() for k, v in state.items()}
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(net(batch.support_x[t]), batch.support_y[t]).backward()
                opt.step()
            phis.append([p.detach() for p in net.parameters()])
            finals.append([opt.state[p] for p in net.parameters()])
        with torch.no_grad():
            for i, p in enumerate(theta.parameters()):
                p += eps * (torch.stack([phi[i] for phi in phis]).mean(0) - p)
        shared = [
            {k: torch.stack([f[i][k] for f in finals]).mean(0) for k in ("step", "exp_avg", "exp_avg_sq")}
            for i in range(len(finals[0]))
        ]
    return [p.detach() for p in theta.parameters()], shared


@pytest.mark.parametrize("vectorize", [True, False])
def test_reptile_carries_adams_state_across_meta_steps(vectorize):
    """Three meta-steps equal the reference with a carried torch.optim.Adam, weights and state; starting each task's
    Adam fresh instead gives other weights from the second step on (so the carried state is what is tested)."""
    batches = [vector_tasks(seed=s) for s in range(3)]
    eps, lr = 0.7, 0.05
    final = {}
    for state in ("carried", "per_task"):
        learner = build(Reptile, mlp, vectorize, inner_lr=lr, inner_steps=3, adam_state=state)
        expected, shared = reptile_carried_reference(learner.backbone, batches, steps=3, lr=lr, eps=eps)
        opt = torch.optim.SGD(learner.parameters(), lr=eps)
        for batch in batches:
            opt.zero_grad()
            with recording() as scope:
                loss = learner.meta_loss(batch)
            loss.backward()
            opt.step()
            update_running_statistics(scope.modules, scope.tensors)
        final[state] = [p.detach() for p in learner.backbone.parameters()]
    # The first step agrees to 1e-16; the recorded moments are averaged in float32 (as normalization statistics are),
    # which leaves about 1e-9 relative in the float64 weights of the later steps.
    assert_rel_close(final["carried"], expected, rtol=1e-6)
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(final["per_task"], expected, rtol=1e-3)


def test_reptile_carried_state_is_saved_and_used_at_evaluation():
    """The moments are buffers (in the state dict, so checkpoints resume them) and evaluation adapts from them."""
    batch = vector_tasks()
    learner = build(Reptile, mlp, True, inner_lr=0.05, inner_steps=3)
    _, shared = reptile_carried_reference(learner.backbone, [batch], steps=3, lr=0.05, eps=0.0)
    with recording() as scope:
        learner.meta_loss(batch)
    update_running_statistics(scope.modules, scope.tensors)
    state = learner.state_dict()
    names = [n for n, _ in learner.backbone.named_parameters()]
    for name, reference in zip(names, shared):
        key = f"inner_adam.per_parameter.{name.replace('.', '-')}"
        torch.testing.assert_close(state[f"{key}.v"], reference["exp_avg_sq"])
        assert int(state[f"{key}.t"]) == 3 == int(reference["step"])
    before = learner.task_outputs(batch, training=False)[1]
    fresh = build(Reptile, mlp, True, inner_lr=0.05, inner_steps=3).task_outputs(batch, training=False)[1]
    assert not torch.allclose(before, fresh)  # the same weights, another Adam state: other predictions


def test_reptile_checkpoint_without_carried_moments_adapts_as_before(tmp_path):
    """A checkpoint written before Adam's moments were carried loads with a zero state: a fresh Adam per task, as
    it was trained, so its predictions are those of ``adam_state="per_task"``."""
    batch = vector_tasks()
    learner = build(Reptile, mlp, True, inner_lr=0.05, inner_steps=3)
    with recording() as scope:
        learner.meta_loss(batch)
    update_running_statistics(scope.modules, scope.tensors)  # a nonzero state, which the old checkpoint lacks
    checkpoint = {"state_dict": {k: v for k, v in learner.state_dict().items() if not k.startswith("inner_adam")}}
    learner.on_load_checkpoint(checkpoint)
    learner.load_state_dict(checkpoint["state_dict"])
    per_task = build(Reptile, mlp, True, inner_lr=0.05, inner_steps=3, adam_state="per_task")
    torch.testing.assert_close(learner.task_outputs(batch, training=False)[1], per_task.task_outputs(batch, training=False)[1])


def test_reptile_gradient_is_difference_to_adapted_weights():
    """With SGD(lr=eps) as outer optimizer one step is theta <- theta + eps * mean_t(phi_t - theta)."""
    batch = vector_tasks()
    learner = build(Reptile, mlp, True, inner_lr=0.3, inner_steps=2, inner_optimizer="sgd")
    theta = [p.detach().clone() for p in learner.backbone.parameters()]
    phis = []
    for t in range(batch.num_tasks):
        net = copy.deepcopy(learner.backbone)
        opt = torch.optim.SGD(net.parameters(), lr=0.3)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(net(batch.support_x[t]), batch.support_y[t]).backward()
            opt.step()
        phis.append([p.detach() for p in net.parameters()])
    eps = 0.7
    opt = torch.optim.SGD(learner.parameters(), lr=eps)
    opt.zero_grad()
    learner.meta_loss(batch).backward()
    opt.step()
    for i, p in enumerate(learner.backbone.parameters()):
        mean_phi = torch.stack([phi[i] for phi in phis]).mean(0)
        torch.testing.assert_close(p.detach(), theta[i] + eps * (mean_phi - theta[i]))


@pytest.mark.parametrize("algorithm", ["maml", "reptile", "anil"])
def test_non_transductive_evaluation(algorithm):
    """Each query prediction equals the adapted network applied to the support set plus that query example."""
    batch = image_tasks(queries=3)
    cls = {"maml": MAML, "reptile": Reptile, "anil": ANIL}[algorithm]
    kwargs = {"inner_lr": 0.01, "inner_steps": 2} if cls is Reptile else {"inner_lr": 0.3, "inner_steps": 2}
    results = {}
    for transductive in (True, False):
        for vectorize in (True, False):
            protocol = "transductive" if transductive else "per_query"
            learner = build(cls, conv, vectorize, normalization=protocol, **kwargs)
            with torch.enable_grad():
                _, predictions = learner.task_outputs(batch, training=False)
            results[transductive, vectorize] = predictions
    torch.testing.assert_close(results[False, True], results[False, False])
    torch.testing.assert_close(results[True, True], results[True, False])
    # Reference: adapt on task 0's support set (full-network inner loop, also for ANIL), then predict query i from
    # the batch cat(support, query_i) and take its last row.
    learner = build(cls, conv, False, normalization="per_query", **kwargs)
    t, sx, sy = 0, batch.support_x[0], batch.support_y[0]
    trajectory, context = learner.adapt_task(sx, sy, training=False)
    params = {**context, **trajectory[-1]}
    for i in range(batch.query_x.shape[1]):
        out = functional_call(learner.backbone, params, (torch.cat([sx, batch.query_x[t, i : i + 1]]),))[-1]
        torch.testing.assert_close(results[False, False][t, i], out.detach())
    assert not torch.allclose(results[True, False], results[False, False])  # the protocols do differ


def test_reptile_rejects_query_loss_options():
    with pytest.raises(ConfigError):
        Reptile(mlp(), multi_step_loss=True)
    with pytest.raises(ConfigError):
        Reptile(mlp(), inner_optimizer="rmsprop")
    Reptile(mlp(), multi_step_loss=False, lslr=False, first_order=False, first_order_epochs=0, msl_epochs=10)  # CLI defaults


# ------------------------------------------------------------------------------------- learning with a Trainer
class GaussianTasks(EpisodicDataModule):
    """Tiny few-shot problem: each task draws ``ways`` class means on the first ``informative`` of ``dim`` inputs;
    the other inputs are large noise. A network must learn to ignore the noise to adapt from one shot per class."""

    def __init__(self, dim: int = 12, informative: int = 3, noise: float = 1.0, dtype: torch.dtype = torch.float32, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dim, self.informative, self.noise, self.dtype = dim, informative, noise, dtype

    def sample_task(self, split, generator):
        shape = self.shape(split)
        means = torch.zeros(shape.ways, self.dim)
        means[:, : self.informative] = 1.5 * torch.randn(shape.ways, self.informative, generator=generator)
        scale = torch.cat([torch.full((self.informative,), 0.3), torch.full((self.dim - self.informative,), self.noise)])

        def draw(per_class):
            x = means.repeat_interleave(per_class, 0)
            x = x + scale * torch.randn(x.shape, generator=generator)
            return x.to(self.dtype), torch.arange(shape.ways).repeat_interleave(per_class)

        return (*draw(shape.shots), *draw(shape.queries))


def mlp_classifier() -> nn.Module:
    return SinusoidMLP(in_features=12, hidden=(32, 32), out_features=5)


def adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr)


def sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


LEARNERS = {
    "maml": lambda: MAML(mlp_classifier(), inner_lr=0.5, inner_steps=1, optimizer=adam(3e-3)),
    "fomaml": lambda: MAML(mlp_classifier(), inner_lr=0.5, inner_steps=1, first_order=True, optimizer=adam(3e-3)),
    "anil": lambda: ANIL(mlp_classifier(), inner_lr=0.5, inner_steps=1, optimizer=adam(3e-3)),
    "metasgd": lambda: MetaSGD(mlp_classifier(), inner_lr=0.5, inner_steps=1, optimizer=adam(3e-3)),
    "mamlpp": lambda: MAML(
        mlp_classifier(), inner_lr=0.5, inner_steps=2, multi_step_loss=True, msl_epochs=2, lslr=True, first_order_epochs=1,
        optimizer=adam(3e-3), lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3, eta_min=1e-4),
    ),
    "reptile": lambda: Reptile(mlp_classifier(), inner_lr=0.5, inner_steps=5, inner_optimizer="sgd", optimizer=sgd(1.0)),
    "reptile-adam": lambda: Reptile(mlp_classifier(), inner_lr=0.01, inner_steps=5, optimizer=sgd(1.0), normalization="per_query"),
}


@pytest.mark.parametrize("name", list(LEARNERS))
def test_learning_happens(name):
    """A few dozen meta-updates with Lightning's Trainer: evaluation accuracy after adaptation rises well above
    where it started and above chance (20%)."""
    torch.manual_seed(0)
    reptile = name.startswith("reptile")
    # MAML++ runs 3 short epochs so the epoch-driven schedules (MSL, derivative order, cosine LR) all move.
    epochs, batches = (3, 20) if name == "mamlpp" else (1, 60)
    dm = GaussianTasks(
        ways=5, shots=1, queries=5, meta_batch_size=8, train_batches=batches, val_episodes=64, eval_meta_batch_size=64,
        train_shots=5 if reptile else None,  # Reptile trains on more examples per class, as in the paper
    )
    learner = LEARNERS[name]()
    learner.vectorize = False  # faster than vmap for a tiny MLP on CPU; equality is tested above
    before = trainer().validate(learner, datamodule=dm, verbose=False)[0]["val/acc"]
    fit = trainer(max_epochs=epochs, limit_val_batches=0)
    fit.fit(learner, datamodule=dm)
    assert fit.global_step == epochs * batches and learner.skipped_steps == 0
    after = trainer().validate(learner, datamodule=dm, verbose=False)[0]["val/acc"]
    assert after > before + 0.1, (before, after)
    assert after > 0.45, (before, after)
    if name == "mamlpp":
        assert fit.optimizers[0].param_groups[0]["lr"] < 3e-3  # cosine annealing stepped per epoch
        assert not torch.allclose(learner.inner_lrs["head-weight"], torch.full((2,), 0.5))  # LSLR rates learned


# ------------------------------------------------------------------------------------------------- chunk_size
CHUNKED = {
    "maml": lambda **kw: MAML(mlp_classifier(), inner_lr=0.5, inner_steps=2, **kw),
    "anil": lambda **kw: ANIL(mlp_classifier(), inner_lr=0.5, inner_steps=2, **kw),
    "metasgd": lambda **kw: MetaSGD(mlp_classifier(), inner_lr=0.5, **kw),
    "mamlpp": lambda **kw: MAML(mlp_classifier(), inner_lr=0.5, inner_steps=2, multi_step_loss=True, lslr=True, **kw),
    "reptile": lambda **kw: Reptile(mlp_classifier(), inner_lr=0.01, inner_steps=3, inner_batch_size=4, **kw),
}


@pytest.mark.parametrize("name", list(CHUNKED))
@pytest.mark.parametrize("vectorize", [True, False])
def test_chunked_training_step_gives_the_same_update(name, vectorize):
    """``chunk_size=2`` over 5 tasks (chunks 2+2+1) accumulates exactly the gradient of the whole meta-batch."""
    dm = GaussianTasks(ways=5, shots=1, queries=3, meta_batch_size=5, train_batches=1, train_shots=2, dtype=torch.float64)
    updated = {}
    for chunk_size in (None, 2):
        torch.manual_seed(0)
        learner = CHUNKED[name](chunk_size=chunk_size, vectorize=vectorize, optimizer=sgd(0.1)).double()
        initial = [p.detach().clone() for p in learner.parameters()]
        trainer(max_steps=1, limit_val_batches=0).fit(learner, datamodule=dm)
        updated[chunk_size] = [p.detach().clone() for p in learner.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(initial, updated[chunk_size]))
    for whole, chunked in zip(updated[None], updated[2]):
        torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- configs
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# config -> (algorithm, ways, shots, inner_lr, inner_steps, eval_inner_steps, meta_batch_size, first_order)
PAPER_ROWS = {
    "omniglot_maml_5w1s.yaml": ("MAML", 5, 1, 0.4, 1, 3, 32, False),
    "omniglot_maml_20w1s.yaml": ("MAML", 20, 1, 0.1, 5, 5, 16, False),
    "omniglot_fomaml_5w1s.yaml": ("MAML", 5, 1, 0.4, 1, 3, 32, True),
    "omniglot_fomaml_20w1s.yaml": ("MAML", 20, 1, 0.1, 5, 5, 16, True),
    "omniglot_anil_5w1s.yaml": ("ANIL", 5, 1, 0.4, 1, 3, 32, False),
    "omniglot_anil_20w1s.yaml": ("ANIL", 20, 1, 0.1, 5, 5, 16, False),
    "omniglot_metasgd_5w1s.yaml": ("MetaSGD", 5, 1, 0.4, 1, 1, 32, False),
    "omniglot_metasgd_20w1s.yaml": ("MetaSGD", 20, 1, 0.1, 1, 1, 16, False),
    "omniglot_mamlpp_5w1s.yaml": ("MAML", 5, 1, 0.1, 5, 5, 8, False),
    "omniglot_mamlpp_20w1s.yaml": ("MAML", 20, 1, 0.1, 5, 5, 8, False),
    "omniglot_reptile_5w1s.yaml": ("Reptile", 5, 1, 0.001, 5, 50, 5, True),
    "omniglot_reptile_5w5s.yaml": ("Reptile", 5, 5, 0.001, 5, 50, 5, True),
    "omniglot_reptile_20w1s.yaml": ("Reptile", 20, 1, 0.0005, 10, 50, 5, True),
    "miniimagenet_maml_5w1s.yaml": ("MAML", 5, 1, 0.01, 5, 10, 4, False),
    "miniimagenet_maml_5w5s.yaml": ("MAML", 5, 5, 0.01, 5, 10, 2, False),
    "miniimagenet_fomaml_5w1s.yaml": ("MAML", 5, 1, 0.01, 5, 10, 4, True),
    "miniimagenet_anil_5w1s.yaml": ("ANIL", 5, 1, 0.01, 5, 10, 4, False),
}


@pytest.mark.parametrize("name", list(PAPER_ROWS))
def test_paper_configs_instantiate_with_the_papers_settings(name, monkeypatch):
    """Each config builds its model, datamodule, optimizer and scheduler through the CLI (no data is read)."""
    from lit_meta.cli import MetaCLI

    monkeypatch.chdir(CONFIGS.parent)
    path = CONFIGS / name
    header = path.read_text().splitlines()[0]
    assert header.startswith("# ") and "%" in path.read_text().split("seed_everything")[0]  # names the published number
    cli = MetaCLI(args=["--config", str(path), "--trainer.logger", "false", "--trainer.accelerator", "cpu"], run=False)
    model, dm = cli.model, cli.datamodule
    algorithm, ways, shots, inner_lr, steps, eval_steps, meta_batch, first_order = PAPER_ROWS[name]
    assert type(model).__name__ == algorithm
    assert (dm.ways, dm.shots, dm.meta_batch_size) == (ways, shots, meta_batch)
    assert (model.inner_lr, model.inner_steps, model.eval_inner_steps, model.first_order) == (inner_lr, steps, eval_steps, first_order)
    assert model.backbone.head.out_features == ways
    # The faster native norm kernel wherever only its first derivatives are used (the model built, so it is allowed).
    assert uses_fused_norm(model.backbone) == (first_order or algorithm == "ANIL")
    optim = model.configure_optimizers()
    optimizer = optim["optimizer"] if isinstance(optim, dict) else optim
    if name.startswith("omniglot"):
        assert type(dm).__name__ == "OmniglotDataModule" and dm.split == "vinyals"
        assert model.backbone.embedding_dim in (64, 256)  # 64 filters: spatial mean / max-pool to 1x1, or 2x2 flattened
    else:
        # Finn et al.: K + 15 examples a class in training, 2K (K queries) at test
        assert type(dm).__name__ == "MiniImageNetDataModule" and (dm.queries, dm.train_queries) == (shots, 15)
        assert model.backbone.embedding_dim == 800  # 32 filters x 5 x 5
    if algorithm == "Reptile":
        assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 1.0
        assert isinstance(optim["lr_scheduler"], torch.optim.lr_scheduler.LinearLR) and model.scheduler_interval == "step"
        assert dm.train_shots == 10 and model.inner_optimizer == "adam"
        # the paper's --eval-batch: 5 in its 5-way 1-shot command line, 10 in the 5-shot and 20-way ones
        assert model.eval_inner_batch_size == (5 if (ways, shots) == (5, 1) else 10)
    else:
        assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 1e-3
    if "mamlpp" in name:
        assert model.multi_step_loss and model.lslr and model.msl_epochs == 10 and model.first_order_epochs == 50
        assert isinstance(optim["lr_scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)


@pytest.mark.parametrize("name", ["anil", "metasgd", "mamlpp", "reptile"])
def test_checkpoint_round_trip(name, tmp_path):
    """Hyper-parameters and learned rates survive ``save_checkpoint`` / ``MetaLearner.load_from_checkpoint``."""
    from lit_meta import MetaLearner

    dm = GaussianTasks(ways=5, shots=1, queries=2, meta_batch_size=2, train_batches=2, train_shots=2, val_episodes=2)
    torch.manual_seed(0)
    learner = CHUNKED[name](vectorize=False)
    fit = trainer(max_steps=2, limit_val_batches=0)
    fit.fit(learner, datamodule=dm)
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    loaded = MetaLearner.load_from_checkpoint(path)
    assert type(loaded) is type(learner)
    for key in ("inner_lr", "inner_steps", "eval_inner_steps", "multi_step_loss", "lslr", "normalization"):
        assert getattr(loaded, key) == getattr(learner, key)
    state, restored = learner.state_dict(), loaded.state_dict()
    assert state.keys() == restored.keys()
    for key in state:
        torch.testing.assert_close(restored[key], state[key])
