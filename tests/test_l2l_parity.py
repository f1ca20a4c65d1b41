"""lit_meta's meta-gradients equal learn2learn's on the same network, parameters and tasks.

learn2learn (0.2.0, ``scripts/install_learn2learn.sh``) is the oracle: its MAML clones the module and steps it with
``torch.autograd.grad``, one task at a time, which shares no code with lit_meta's ``torch.func`` inner loop (vmapped
or looped). Both sides start from the same state dict and see the same float64 tasks; lit_meta takes the mean over
tasks, so the learn2learn side accumulates one ``backward`` per task and divides by ``T``, as its examples do.
Gradients must agree to 1e-5 relative to the largest gradient entry (conv biases before a normalization have a
numerically zero gradient, so a per-entry relative error would be meaningless there).

Covered: MAML second and first order (SinusoidMLP on sinusoid tasks; a small Conv4, stride-2 and max-pool variants,
on classification tasks), ANIL (learn2learn's recipe: MAML on the head, fed features from the body) and MetaSGD
(``l2l.algorithms.MetaSGD`` with its per-entry rates set to ours). A guard checks that learn2learn's
``first_order=True`` is FOMAML by definition and differs from second order, so an order mix-up cannot pass.

learn2learn is optional: without it these tests skip, unless ``LIT_META_REQUIRE_L2L=1`` (CI), where they fail.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules import SinusoidDataModule, TaskBatch
from lit_meta import ANIL, MAML, Conv4, MetaSGD, SinusoidMLP
from lit_meta.algorithms.maml import parameter_key

from conftest import import_learn2learn

RTOL = 1e-5
Grads = dict[str, Tensor]


@pytest.fixture(scope="module")
def l2l() -> Any:
    """The learn2learn module (see :func:`conftest.import_learn2learn`)."""
    return import_learn2learn()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Run single-threaded: these shapes are tiny, and on a busy machine OpenMP threads that spin-wait for a core
    made this file 10-50x slower (measured: 0.05 s vs 1-6 s for one Conv4 meta-gradient under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ networks/tasks
WAYS, SHOTS, QUERIES, TASKS = 4, 2, 3, 3


def sinusoid_net() -> nn.Module:
    return SinusoidMLP().double()


def conv_stride() -> nn.Module:
    # Finn et al.'s Omniglot network in miniature: stride-2 convs, batch-statistics norm, spatial mean, head.
    return Conv4(1, hidden=8, out_features=WAYS, pool="stride", image_size=14, embedding="mean").double()


def conv_max() -> nn.Module:
    # Their mini-ImageNet network's layout: stride-1 conv + 2x2 max-pool, flattened features (28 -> 14 -> 7 -> 3 -> 1).
    return Conv4(1, hidden=8, out_features=WAYS, pool="max", image_size=28, embedding="flatten").double()


def sinusoid_tasks() -> TaskBatch:
    """Four 5-shot sinusoid tasks (Finn et al.'s distribution) with 7 query points each."""
    batch = next(iter(SinusoidDataModule(shots=5, queries=7, meta_batch_size=4, seed=3).train_dataloader()))
    return batch.to(torch.float64)


def image_tasks(size: int) -> TaskBatch:
    """``TASKS`` N-way K-shot tasks of noisy class prototypes (learnable, unlike pure noise), class-ordered labels."""
    g = torch.Generator().manual_seed(size)

    def draw(prototypes: Tensor, per_class: int) -> Tensor:
        x = prototypes.repeat_interleave(per_class, dim=1)
        return x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)

    prototypes = torch.rand(TASKS, WAYS, 1, size, size, generator=g, dtype=torch.float64)
    labels = lambda per_class: torch.arange(WAYS).repeat_interleave(per_class).expand(TASKS, -1).contiguous()  # noqa: E731
    return TaskBatch(draw(prototypes, SHOTS), labels(SHOTS), draw(prototypes, QUERIES), labels(QUERIES))


# name -> (network factory, tasks, inner learning rate)
SETTINGS: dict[str, tuple[Callable[[], nn.Module], Callable[[], TaskBatch], float]] = {
    "sinusoid": (sinusoid_net, sinusoid_tasks, 0.01),
    "conv4-stride": (conv_stride, lambda: image_tasks(14), 0.4),
    "conv4-maxpool": (conv_max, lambda: image_tasks(28), 0.4),
}


def loss_fn(batch: TaskBatch) -> Callable[[Tensor, Tensor], Tensor]:
    return F.mse_loss if torch.is_floating_point(batch.support_y) else F.cross_entropy


def same_network(factory: Callable[[], nn.Module], source: nn.Module) -> nn.Module:
    """A fresh instance of the network with ``source``'s parameters (the learn2learn side's own copy)."""
    net = factory()
    net.load_state_dict(source.state_dict())
    return net


# -------------------------------------------------------------------------------------------------- both sides
def lit_meta_gradients(learner: nn.Module, batch: TaskBatch) -> Grads:
    """Meta-gradient of every parameter of the learner (backbone and any learned rates), by name."""
    learner.zero_grad()
    learner.meta_loss(batch).backward()
    return {name: p.grad.clone() for name, p in learner.named_parameters()}


def l2l_meta_gradients(
    meta: nn.Module,
    batch: TaskBatch,
    steps: int,
    params: dict[str, nn.Parameter],
    features: Callable[[Tensor], Tensor] | None = None,
) -> Grads:
    """learn2learn's training loop: per task ``clone``, ``steps`` x ``adapt(support loss)``, ``query_loss.backward()``.

    ``meta`` is an ``l2l.algorithms.MAML`` or ``MetaSGD`` wrapper; ``features`` (ANIL) maps inputs to the head's input,
    once per task and set. Gradients are summed by the per-task backwards and divided by ``T``, like learn2learn's
    examples; returned for ``params`` (name in lit_meta's naming -> the learn2learn-side parameter).
    """
    for p in params.values():
        p.grad = None
    loss = loss_fn(batch)
    features = features or (lambda x: x)
    for t in range(batch.num_tasks):
        learner = meta.clone()
        support, query = features(batch.support_x[t]), features(batch.query_x[t])
        for _ in range(steps):
            learner.adapt(loss(learner(support), batch.support_y[t]))
        loss(learner(query), batch.query_y[t]).backward()
    return {name: p.grad / batch.num_tasks for name, p in params.items()}


def assert_same_gradients(ours: Grads, theirs: Grads) -> None:
    """Same parameters, every entry within ``RTOL`` of the largest gradient entry."""
    assert set(ours) == set(theirs)
    scale = max(float(g.abs().max()) for g in theirs.values())
    assert scale > 0
    errors = {name: float((ours[name] - theirs[name]).abs().max()) / scale for name in theirs}
    worst = max(errors, key=errors.get)
    assert errors[worst] < RTOL, f"{worst}: relative error {errors[worst]:.2e}"


def backbone_params(net: nn.Module) -> dict[str, nn.Parameter]:
    return {f"backbone.{name}": p for name, p in net.named_parameters()}


# -------------------------------------------------------------------------------------------------------- MAML
def l2l_maml(l2l: Any, factory: Callable[[], nn.Module], source: nn.Module, batch: TaskBatch, lr: float, steps: int, first_order: bool) -> Grads:
    net = same_network(factory, source)
    maml = l2l.algorithms.MAML(net, lr=lr, first_order=first_order)
    return l2l_meta_gradients(maml, batch, steps, backbone_params(net))


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize(
    "setting,steps", [("sinusoid", 1), ("sinusoid", 3), ("conv4-stride", 2), ("conv4-maxpool", 2)]
)
def test_maml_matches_learn2learn(l2l, setting, steps, first_order):
    factory, tasks, lr = SETTINGS[setting]
    batch = tasks()
    torch.manual_seed(0)
    net = factory()
    theirs = l2l_maml(l2l, factory, net, batch, lr, steps, first_order)
    for vectorize in (True, False):
        learner = MAML(net, inner_lr=lr, inner_steps=steps, first_order=first_order, vectorize=vectorize)
        assert_same_gradients(lit_meta_gradients(learner, batch), theirs)


@pytest.mark.parametrize("setting", ["sinusoid", "conv4-stride"])
def test_learn2learn_first_order_is_fomaml(l2l, setting):
    """learn2learn's ``first_order=True`` is FOMAML: the mean over tasks of grad L_Q at the adapted parameters.

    The adapted parameters are computed here with detached inner gradients and made leaves, so the gradient is
    exactly ``dL_Q/dtheta_k`` (identity Jacobian ``dtheta_k/dtheta``). Also a guard for the tests above: second
    order differs from first order by far more than the tolerance, so a mix-up of orders would fail them.
    """
    factory, tasks, lr = SETTINGS[setting]
    batch, steps, loss = tasks(), 2, loss_fn(tasks())
    torch.manual_seed(0)
    net = factory()
    first = l2l_maml(l2l, factory, net, batch, lr, steps, first_order=True)
    second = l2l_maml(l2l, factory, net, batch, lr, steps, first_order=False)

    names = [n for n, _ in net.named_parameters()]
    fomaml = {f"backbone.{n}": torch.zeros_like(p) for n, p in net.named_parameters()}
    for t in range(batch.num_tasks):
        fast = {n: p.detach() for n, p in net.named_parameters()}
        for _ in range(steps):
            fast = {n: v.requires_grad_() for n, v in fast.items()}
            inner = loss(torch.func.functional_call(net, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(inner, [fast[n] for n in names])
            fast = {n: (fast[n] - lr * g).detach() for n, g in zip(names, grads)}
        fast = {n: v.requires_grad_() for n, v in fast.items()}
        query = loss(torch.func.functional_call(net, fast, (batch.query_x[t],)), batch.query_y[t])
        for n, g in zip(names, torch.autograd.grad(query, [fast[n] for n in names])):
            fomaml[f"backbone.{n}"] += g / batch.num_tasks
    assert_same_gradients(first, fomaml)

    scale = max(float(g.abs().max()) for g in second.values())
    difference = max(float((first[n] - second[n]).abs().max()) for n in second) / scale
    assert difference > 100 * RTOL, f"first and second order differ by only {difference:.1e}"


# -------------------------------------------------------------------------------------------------------- ANIL
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("setting", ["sinusoid", "conv4-stride"])
def test_anil_matches_learn2learn(l2l, setting, first_order):
    """learn2learn's ANIL recipe: ``MAML(head)`` adapted on features from the body, which learns by the outer loss.

    The features of the support and the query set are computed separately, as lit_meta's ANIL (and MAML) does:
    with batch-statistics normalization a joint forward of support + query (as in learn2learn's example, which embeds
    the whole episode at once) would normalize with different statistics.
    """
    factory, tasks, lr = SETTINGS[setting]
    batch, steps = tasks(), 3
    torch.manual_seed(0)
    net = factory()
    theirs_net = same_network(factory, net)
    head = l2l.algorithms.MAML(theirs_net.head, lr=lr, first_order=first_order)
    theirs = l2l_meta_gradients(head, batch, steps, backbone_params(theirs_net), features=theirs_net.embed)
    for vectorize in (True, False):
        learner = ANIL(net, inner_lr=lr, inner_steps=steps, first_order=first_order, vectorize=vectorize)
        assert_same_gradients(lit_meta_gradients(learner, batch), theirs)


# ----------------------------------------------------------------------------------------------------- MetaSGD
@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (2, True)], ids=["1step", "2steps", "2steps-first_order"])
@pytest.mark.parametrize("setting", ["sinusoid", "conv4-stride"])
def test_metasgd_matches_learn2learn(l2l, setting, steps, first_order):
    """Meta-gradients of the initialization and of every per-entry rate, with distinct rates per entry."""
    factory, tasks, lr = SETTINGS[setting]
    batch = tasks()
    torch.manual_seed(0)
    net = factory()
    rates = {
        name: torch.empty_like(p).uniform_(0.5 * lr, 1.5 * lr, generator=torch.Generator().manual_seed(i))
        for i, (name, p) in enumerate(net.named_parameters())
    }
    theirs_net = same_network(factory, net)
    meta = l2l.algorithms.MetaSGD(theirs_net, lr=lr, first_order=first_order)
    with torch.no_grad():  # learn2learn keeps its rates in model.parameters() order
        for rate, name in zip(meta.lrs, rates):
            rate.copy_(rates[name])
    params = backbone_params(theirs_net)
    params.update({f"inner_lrs.{parameter_key(name)}": rate for name, rate in zip(rates, meta.lrs)})
    theirs = l2l_meta_gradients(meta, batch, steps, params)
    for vectorize in (True, False):
        learner = MetaSGD(net, inner_lr=lr, inner_steps=steps, first_order=first_order, vectorize=vectorize)
        with torch.no_grad():
            for name, rate in rates.items():
                learner.inner_lrs[parameter_key(name)].copy_(rate)
        assert_same_gradients(lit_meta_gradients(learner, batch), theirs)
