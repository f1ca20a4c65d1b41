"""The checkpointed inner loop (``checkpoint_inner_loop``): the same second-order meta-gradient as the stored one, for
every optimization-based algorithm and option, vectorized and looped, with running statistics recorded alike."""

from __future__ import annotations

import pytest
import torch

from datamodules.task_batch import TaskBatch
from lit_meta import ANIL, MAML, MetaSGD
from lit_meta.backbones import Conv4
from lit_meta.normalization import recording


def tasks(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2, size: int = 10) -> TaskBatch:
    g = torch.Generator().manual_seed(3)
    labels = lambda n: torch.arange(ways).repeat_interleave(n).expand(tasks, -1).clone()  # noqa: E731
    draw = lambda n: torch.randn(tasks, ways * n, 1, size, size, generator=g, dtype=torch.float64)  # noqa: E731
    return TaskBatch(draw(shots), labels(shots), draw(queries), labels(queries))


VARIANTS = {
    "maml": lambda **kw: MAML(net(), inner_lr=0.3, inner_steps=3, **kw),
    "maml-first-order": lambda **kw: MAML(net(), inner_lr=0.3, inner_steps=3, first_order=True, **kw),
    "anil": lambda **kw: ANIL(net(), inner_lr=0.3, inner_steps=3, **kw),
    "metasgd": lambda **kw: MetaSGD(net(), inner_lr=0.3, inner_steps=2, **kw),
    "maml++": lambda **kw: MAML(net(), inner_lr=0.3, inner_steps=3, multi_step_loss=True, lslr=True, **kw),
}


def net() -> Conv4:
    return Conv4(in_channels=1, hidden=6, out_features=3, image_size=10, blocks=2, pool="stride", embedding="mean").double()


def meta_gradient(name: str, vectorize: bool, checkpoint: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = VARIANTS[name](vectorize=vectorize, checkpoint_inner_loop=checkpoint)
    model.double()
    with recording() as scope:
        loss = model.meta_loss(tasks())
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return {n: g for (n, _), g in zip(model.named_parameters(), grads)}, [t.reshape(-1) for t in scope.tensors]


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_checkpointed_meta_gradient_equals_the_stored_one(name, vectorize):
    stored, stats_stored = meta_gradient(name, vectorize, checkpoint=False)
    checkpointed, stats_checkpointed = meta_gradient(name, vectorize, checkpoint=True)
    scale = max(float(g.abs().max()) for g in stored.values())
    assert scale > 0
    for key, g in stored.items():
        torch.testing.assert_close(checkpointed[key], g, rtol=1e-10, atol=1e-10 * scale, msg=key)
    assert len(stats_checkpointed) == len(stats_stored)
    for a, b in zip(stats_checkpointed, stats_stored):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_comparison_can_tell_first_from_second_order():
    """Guard: the two orders' meta-gradients differ here, so equality above is not an accident of the setup."""
    second, _ = meta_gradient("maml", True, checkpoint=True)
    first, _ = meta_gradient("maml-first-order", True, checkpoint=True)
    assert max(float((second[k] - first[k]).abs().max()) for k in second) > 1e-4
