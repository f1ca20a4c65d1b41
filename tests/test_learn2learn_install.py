"""learn2learn 0.2.0, as installed by scripts/install_learn2learn.sh, is present and correct.

learn2learn is optional: without it these tests skip, unless LIT_META_REQUIRE_L2L=1,
in which case a missing or broken learn2learn makes them fail.

The MAML check is numerical: the gradients that learn2learn's MAML clone/adapt/backward
produces must equal a hand-written one-step MAML computed with torch.autograd in float64,
and that hand-written meta-gradient is itself checked against finite differences.
"""

from __future__ import annotations

from importlib import metadata

import pytest
import torch
import torch.nn.functional as F

from conftest import import_learn2learn

L2L_VERSION = "0.2.0"


def test_learn2learn_version():
    l2l = import_learn2learn()
    assert l2l.__version__ == L2L_VERSION
    assert metadata.version("learn2learn") == L2L_VERSION
    # The Cython extensions were compiled (not some pure-Python fallback or stale build).
    import learn2learn.data.meta_dataset as md
    import learn2learn.data.task_dataset as td
    import learn2learn.data.transforms as tr

    for mod in (md, td, tr):
        assert mod.__file__.endswith((".so", ".pyd")), mod.__file__


# ---------------------------------------------------------------------------- MAML

LR = 0.3


def _model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()


def _data():
    g = torch.Generator().manual_seed(99)
    xs = torch.randn(7, 3, generator=g, dtype=torch.float64)
    ys = torch.randn(7, 2, generator=g, dtype=torch.float64)
    xq = torch.randn(9, 3, generator=g, dtype=torch.float64)
    yq = torch.randn(9, 2, generator=g, dtype=torch.float64)
    return xs, ys, xq, yq


def _forward(params, x):
    w1, b1, w2, b2 = params
    return F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)


def _manual_maml(params, xs, ys, xq, yq, first_order: bool):
    """One inner SGD step on the support set, then the query loss at the adapted params."""
    inner = F.mse_loss(_forward(params, xs), ys)
    grads = torch.autograd.grad(inner, params, create_graph=not first_order)
    if first_order:
        grads = [g.detach() for g in grads]
    adapted = [p - LR * g for p, g in zip(params, grads)]
    return F.mse_loss(_forward(adapted, xq), yq), adapted


def _l2l_maml(l2l, first_order: bool):
    model = _model()
    xs, ys, xq, yq = _data()
    maml = l2l.algorithms.MAML(model, lr=LR, first_order=first_order)
    learner = maml.clone()
    learner.adapt(F.mse_loss(learner(xs), ys))
    loss = F.mse_loss(learner(xq), yq)
    loss.backward()
    grads = [p.grad for p in maml.parameters()]
    assert all(g is not None for g in grads), "MAML left parameters without gradient"
    adapted = [p.detach() for p in learner.parameters()]
    return loss.detach(), grads, adapted


def _manual(first_order: bool):
    params = [p.detach().clone().requires_grad_(True) for p in _model().parameters()]
    xs, ys, xq, yq = _data()
    loss, adapted = _manual_maml(params, xs, ys, xq, yq, first_order)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), list(grads), [a.detach() for a in adapted]


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_maml_step_matches_manual_float64(first_order):
    l2l = import_learn2learn()
    l2l_loss, l2l_grads, l2l_adapted = _l2l_maml(l2l, first_order)
    ref_loss, ref_grads, ref_adapted = _manual(first_order)

    assert all(g.dtype == torch.float64 for g in l2l_grads)
    torch.testing.assert_close(l2l_loss, ref_loss, rtol=1e-12, atol=1e-14)
    for a, b in zip(l2l_adapted, ref_adapted):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(l2l_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_manual_meta_gradient_is_the_true_derivative():
    """Guards the reference itself: second-order meta-gradient == finite differences,
    and it differs from the first-order one (so the MAML check above can tell them apart)."""
    import_learn2learn()
    xs, ys, xq, yq = _data()
    params = tuple(p.detach().clone().requires_grad_(True) for p in _model().parameters())

    def meta_objective(*ps):
        return _manual_maml(list(ps), xs, ys, xq, yq, first_order=False)[0]

    assert torch.autograd.gradcheck(meta_objective, params, eps=1e-6, atol=1e-7, rtol=1e-5)

    second = torch.cat([g.flatten() for g in _manual(first_order=False)[1]])
    first = torch.cat([g.flatten() for g in _manual(first_order=True)[1]])
    assert (second - first).abs().max() > 1e-4


# ----------------------------------------------------------------------------- data


def test_taskdataset_samples_valid_nway_kshot_task():
    l2l = import_learn2learn()
    from learn2learn.data.transforms import ConsecutiveLabels, KShots, LoadData, NWays, RemapLabels

    n_classes, per_class, n, k = 6, 4, 3, 2
    idx = torch.arange(n_classes * per_class)
    x = idx.double().unsqueeze(1)  # each sample carries its own index
    y = idx % n_classes
    ds = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x, y))
    assert sorted(ds.labels) == list(range(n_classes))

    transforms = [NWays(ds, n=n), KShots(ds, k=k), LoadData(ds), RemapLabels(ds), ConsecutiveLabels(ds)]
    tasks = l2l.data.TaskDataset(ds, task_transforms=transforms, num_tasks=5)
    assert len(tasks) == 5
    for _ in range(3):
        xb, yb = tasks.sample()
        assert xb.shape == (n * k, 1) and yb.shape == (n * k,)
        src = xb.squeeze(1).long()
        assert len(set(src.tolist())) == n * k, "KShots without replacement repeated a sample"
        assert sorted(yb.tolist()) == sorted(list(range(n)) * k)
        # RemapLabels is a bijection between the n sampled classes and 0..n-1.
        orig = y[src]
        mapping = {}
        for new, old in zip(yb.tolist(), orig.tolist()):
            assert mapping.setdefault(new, old) == old
        assert len(set(mapping.values())) == n
    # Cached task descriptions: the same index gives the same task.
    a, b = tasks[2], tasks[2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
