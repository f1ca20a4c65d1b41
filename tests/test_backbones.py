"""Backbones: shapes of Finn et al.'s networks and ResNet-12, and exact second-order meta-gradients under vmap.

Every backbone is checked three ways on the same tasks (float64, tiny shapes): MAML's ``meta_loss`` vectorized
(``torch.func.vmap``), MAML's per-task loop, and an independent reference written here with
``torch.autograd.grad(create_graph=True)``. Native BatchNorm fails the first comparison (under vmap its
second-order meta-gradient is silently wrong); these must not.

Also: ResNet-12's DropBlock (its drop pattern and rate against a direct count, the identity in evaluation, exact
under vmap), and ``TimmBackbone`` (a tiny timm test model: trains under ProtoNet, exact under vmapped second-order
MAML with its normalization replaced, refused where timm's own normalization cannot run, weights from a local file).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import cpu_trainer, random_images
from datamodules import TaskBatch
from lit_meta import MAML, BatchStatNorm, ConfigError, Conv4, DropBlock, ProtoNet, ResNet12, SinusoidMLP, TimmBackbone
from lit_meta.backbones import backbone_spec, build_backbone


# ------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors on a 2-core machine: intra-op threads only contend (measured ~20x slower with 2 threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image_tasks(tasks: int, ways: int, shots: int, queries: int, channels: int, size: int, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, ways * shots, channels, size, size, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, ways * queries, channels, size, size, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(sx, sy, qx, qy)


def reference_maml_gradient(model: nn.Module, batch: TaskBatch, lr: float, steps: int) -> list[torch.Tensor]:
    """Second-order MAML meta-gradient, one task at a time, with plain ``torch.autograd.grad``."""
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    total = None
    for t in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
            fast = {n: fast[n] - lr * g for n, g in zip(names, grads)}
        query = F.cross_entropy(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
        g = torch.autograd.grad(query, [params[n] for n in names])
        total = list(g) if total is None else [a + b for a, b in zip(total, g)]
    return [g / batch.num_tasks for g in total]


def library_gradient(learner: MAML, batch: TaskBatch) -> list[torch.Tensor]:
    return list(torch.autograd.grad(learner.meta_loss(batch), list(learner.backbone.parameters())))


def assert_rel_close(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float = 1e-5) -> None:
    """``||a - e|| <= rtol ||e||`` over all gradients together, and per tensor relative to the largest entry.

    (Per tensor relative to its own norm would be ill-posed: a conv bias before a normalization has an exactly zero
    meta-gradient, up to rounding.)
    """
    a, e = torch.cat([x.flatten() for x in actual]), torch.cat([x.flatten() for x in expected])
    assert float(e.norm()) > 0
    assert float((a - e).norm() / e.norm()) < rtol
    scale = float(e.abs().max())
    for x, y in zip(actual, expected):
        assert float((x - y).abs().max()) / scale < rtol


# ------------------------------------------------------------------------------------------------------- shapes
def test_conv4_omniglot_is_finn_network():
    """Finn et al. Omniglot: 64 filters, stride-2 convs (no pooling), spatial mean -> 64 features."""
    net = Conv4(in_channels=1, hidden=64, out_features=20, pool="stride", image_size=28, embedding="mean")
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert all(m.stride == (2, 2) for m in net.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(6, 1, 28, 28)
    assert net.features(x).shape == (6, 64, 2, 2)  # 28 -> 14 -> 7 -> 4 -> 2, as TF's "SAME" padding
    assert net.embed(x).shape == (6, 64) and net(x).shape == (6, 20)
    assert net.head.in_features == 64
    # Finn et al.'s parameter count: 4 convs with biases, 4 norms, the head.
    expected = (9 * 1 * 64 + 64) + 3 * (9 * 64 * 64 + 64) + 4 * 2 * 64 + 64 * 20 + 20
    assert sum(p.numel() for p in net.parameters()) == expected


def test_conv4_miniimagenet_is_finn_network():
    """Finn et al. mini-ImageNet: 32 filters, max-pool, 84x84 -> 32x5x5 flattened = 800 features."""
    net = Conv4(in_channels=3, hidden=32, out_features=5, pool="max", image_size=84, embedding="flatten")
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 4
    x = torch.randn(2, 3, 84, 84)
    assert net.features(x).shape == (2, 32, 5, 5)
    assert net.embed(x).shape == (2, 800) and net(x).shape == (2, 5)


@torch.no_grad()
def test_conv4_maml_initialization():
    torch.manual_seed(0)
    net = Conv4(hidden=64, out_features=5, pool="stride", embedding="mean")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(float(c.bias.abs().max()) == 0 for c in convs)
    bound = (6 / (64 * 9 + 64 * 9)) ** 0.5  # Glorot-uniform of a 64 -> 64 3x3 conv
    assert float(convs[1].weight.abs().max()) <= bound
    assert 0.8 < float(net.head.weight.std()) < 1.2  # Omniglot head: standard normal
    assert float(net.head.bias.abs().max()) == 0
    mini = Conv4(in_channels=3, hidden=32, out_features=5, image_size=84, embedding="flatten")
    assert float(mini.head.weight.abs().max()) <= (6 / (800 + 5)) ** 0.5  # Glorot-uniform head
    torch_init = Conv4(init="torch")
    assert float(torch_init.features[0][0].bias.abs().max()) > 0


def test_conv4_and_resnet12_without_head_return_embeddings():
    assert Conv4(out_features=None, image_size=28)(torch.randn(3, 1, 28, 28)).shape == (3, 64)
    net = ResNet12(in_channels=3, widths=(4, 5, 6, 7), out_features=None, image_size=32)
    assert net.head is None and net(torch.randn(3, 3, 32, 32)).shape == (3, 7)


def test_resnet12_structure_and_shapes():
    net = ResNet12(in_channels=3, out_features=5, image_size=84)
    blocks = list(net.features)
    assert len(blocks) == 4
    assert [b.conv3.out_channels for b in blocks] == [64, 160, 320, 640]
    for b in blocks:
        assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in b.modules()) == 3
        assert isinstance(b.act, nn.LeakyReLU) and b.act.negative_slope == 0.1
        assert isinstance(b.pool, nn.MaxPool2d)
        assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in b.modules())
    assert isinstance(net.head, nn.Linear) and net.head.in_features == 640
    params = sum(p.numel() for p in net.features.parameters())
    assert 12.3e6 < params < 12.5e6  # the usual "12.4M" ResNet-12
    small = ResNet12(in_channels=3, widths=(4, 5, 6, 7), out_features=5, image_size=84)
    x = torch.randn(2, 3, 84, 84)
    assert small.features(x).shape == (2, 7, 5, 5)  # 84 -> 42 -> 21 -> 10 -> 5
    assert small.embed(x).shape == (2, 7) and small(x).shape == (2, 5)
    flat = ResNet12(widths=(4, 5, 6, 7), out_features=5, image_size=84, embedding="flatten")
    assert flat.embedding_dim == 7 * 5 * 5 and flat(torch.randn(2, 3, 84, 84)).shape == (2, 5)


def test_batch_stat_norm_equals_batchnorm_without_running_stats():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 6, 6, dtype=torch.float64)
    ours = BatchStatNorm(5).double()
    ref = nn.BatchNorm2d(5, track_running_stats=False).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))  # batch statistics in evaluation too


def test_invalid_backbone_arguments():
    with pytest.raises(ValueError, match="pool"):
        Conv4(pool="avg")
    with pytest.raises(ValueError, match="too small"):
        Conv4(image_size=8, pool="max")
    with pytest.raises(ValueError, match="embedding"):
        ResNet12(embedding="max")


# ------------------------------------------------------------------------------ exact meta-gradients under vmap
BACKBONES = {
    # Finn et al.'s Omniglot network (stride, mean) and mini-ImageNet network (max-pool, flatten), shrunk.
    "conv4-stride-mean": (lambda: Conv4(1, hidden=4, out_features=3, pool="stride", image_size=8, embedding="mean"), 1, 8),
    "conv4-max-flatten": (lambda: Conv4(3, hidden=4, out_features=3, pool="max", image_size=16, embedding="flatten"), 3, 16),
    "resnet12-mean": (lambda: ResNet12(3, widths=(3, 4, 4, 5), out_features=3, image_size=16, embedding="mean"), 3, 16),
    # Three blocks keep a 2x2 map to flatten at 16x16 (four would need 32x32: several times slower).
    "resnet12-flatten": (lambda: ResNet12(1, widths=(2, 3, 4), out_features=3, image_size=16, embedding="flatten"), 1, 16),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_vmapped_second_order_meta_gradient_is_exact(name):
    build, channels, size = BACKBONES[name]
    torch.manual_seed(0)
    backbone = build().double()
    batch = image_tasks(tasks=3, ways=3, shots=2, queries=2, channels=channels, size=size)
    lr, steps = 0.3, 2
    expected = reference_maml_gradient(backbone, batch, lr, steps)
    vmapped = library_gradient(MAML(backbone, inner_lr=lr, inner_steps=steps, vectorize=True), batch)
    looped = library_gradient(MAML(backbone, inner_lr=lr, inner_steps=steps, vectorize=False), batch)
    assert_rel_close(looped, expected)
    assert_rel_close(vmapped, expected)
    assert_rel_close(vmapped, looped)


def test_sinusoid_mlp_vmapped_meta_gradient_is_exact():
    torch.manual_seed(0)
    backbone = SinusoidMLP(in_features=4, hidden=(8, 8), out_features=3).double()
    g = torch.Generator().manual_seed(0)
    sy = torch.arange(3).repeat(2).expand(4, -1).contiguous()
    batch = TaskBatch(torch.randn(4, 6, 4, generator=g, dtype=torch.float64), sy, torch.randn(4, 6, 4, generator=g, dtype=torch.float64), sy)
    expected = reference_maml_gradient(backbone, batch, 0.5, 3)
    assert_rel_close(library_gradient(MAML(backbone, inner_lr=0.5, inner_steps=3, vectorize=True), batch), expected)
    assert_rel_close(library_gradient(MAML(backbone, inner_lr=0.5, inner_steps=3, vectorize=False), batch), expected)


def test_fused_norm_matches_batchstat_norm_and_is_refused_for_second_order():
    import pytest
    import torch

    from lit_meta import MAML, ConfigError, Conv4, ProtoNet

    torch.manual_seed(0)
    plain = Conv4(hidden=8, out_features=None).double()
    fused = Conv4(hidden=8, out_features=None, fused_norm=True).double()
    fused.load_state_dict(plain.state_dict())
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(fused(x), plain(x))
    ProtoNet(fused)  # first-order methods may use it
    MAML(Conv4(hidden=8, out_features=5, fused_norm=True), first_order=True)
    with pytest.raises(ConfigError, match="fused_norm"):
        MAML(Conv4(hidden=8, out_features=5, fused_norm=True))


class UserNet(nn.Module):
    """A backbone a user writes with native normalization (not a lit_meta Backbone)."""

    def __init__(self, norm: nn.Module, head: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = norm
        self.head = nn.Linear(4 * 8 * 8, 5) if head else None

    def embed(self, x):
        return torch.relu(self.norm(self.conv(x))).flatten(1)

    def forward(self, x):
        return self.head(self.embed(x)) if self.head is not None else self.embed(x)


@pytest.mark.parametrize(
    "norm, layer",
    [
        (lambda: nn.BatchNorm2d(4), "BatchNorm2d layer norm"),
        (lambda: nn.BatchNorm2d(4, track_running_stats=False), "BatchNorm2d layer norm"),
        (lambda: nn.InstanceNorm2d(4, affine=True), "InstanceNorm2d layer norm"),
        (lambda: nn.LayerNorm([4, 8, 8]), "LayerNorm layer norm"),
    ],
    ids=["batchnorm", "batchnorm-batch-stats", "instancenorm-affine", "layernorm-affine"],
)
def test_native_norms_are_refused_where_vmapped_second_order_gradients_would_be_wrong(norm, layer):
    from lit_meta import ANIL, MAML, ConfigError, MetaBGD

    with pytest.raises(ConfigError, match=f"MAML: the backbone's {layer} gives wrong second-order gradients under vmap; normalize with lit_meta.BatchStatNorm instead, or set vectorize: false or first_order: true"):
        MAML(UserNet(norm()))
    # Each fix is accepted: a per-task loop, first-order gradients, or the norm outside the module the inner loop
    # differentiates through (ANIL and MetaBGD adapt only a head; the norm is in the body).
    MAML(UserNet(norm()), vectorize=False)
    MAML(UserNet(norm()), first_order=True)
    ANIL(UserNet(norm()))
    MetaBGD(UserNet(norm(), head=False), embedding_dim=4 * 8 * 8)


@pytest.mark.parametrize(
    "norm",
    [lambda: nn.BatchNorm2d(4, track_running_stats=False), lambda: nn.InstanceNorm2d(4, affine=True), lambda: nn.LayerNorm([4, 8, 8])],
    ids=["batchnorm", "instancenorm-affine", "layernorm-affine"],
)
def test_head_only_inner_loop_is_exact_with_native_norms(norm):
    """Why MetaBGD accepts native affine norms: its inner loop differentiates the head alone, so the backbone is
    differentiated once, and the vmapped second-order meta-gradient equals the per-task loop's."""
    from datamodules.task_batch import TaskBatch
    from lit_meta import MetaBGD

    torch.manual_seed(0)
    batch = TaskBatch(
        torch.randn(3, 10, 1, 8, 8, dtype=torch.float64), torch.arange(5).repeat(2).expand(3, -1).clone(),
        torch.randn(3, 15, 1, 8, 8, dtype=torch.float64), torch.arange(5).repeat(3).expand(3, -1).clone(),
    )
    grads = []
    for vectorize in (True, False):
        torch.manual_seed(1)
        model = MetaBGD(UserNet(norm(), head=False), embedding_dim=4 * 8 * 8, generator_hidden=16, inner_steps=3, vectorize=vectorize).double()
        with torch.no_grad():
            model.generator.decoder[-1].weight.normal_(std=0.1)  # zero-initialised: no gradient would reach the rest
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(model.meta_loss(batch), list(model.parameters()))]))
    assert (grads[0] - grads[1]).norm() <= 1e-10 * grads[1].norm()
    assert grads[1].norm() > 0


@pytest.mark.parametrize(
    "norm",
    [lambda: nn.BatchNorm2d(4, affine=False, track_running_stats=False), lambda: nn.InstanceNorm2d(4), lambda: nn.GroupNorm(2, 4), lambda: nn.LayerNorm([4, 8, 8], elementwise_affine=False)],
    ids=["batchnorm-no-affine", "instancenorm", "groupnorm", "layernorm-no-affine"],
)
def test_exact_native_norms_are_accepted(norm):
    from lit_meta import MAML

    MAML(UserNet(norm()))


def test_the_refused_norms_are_the_inexact_ones():
    """The refusal rests on a measurement: vmapped second-order MAML gradients against the per-task loop (float64)."""
    from datamodules import SinusoidDataModule
    from lit_meta import MAML

    dm = SinusoidDataModule(shots=5, queries=5, meta_batch_size=4)
    b = dm.train_dataloader().batch(0)
    batch = type(b)(b.support_x.double(), b.support_y.double(), b.query_x.double(), b.query_y.double())

    def meta_gradient(norm, vectorize):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(1, 8), norm, nn.Tanh(), nn.Linear(8, 1)).double()
        model = MAML(net, inner_lr=0.1, inner_steps=2, vectorize=False).double()
        model.vectorize = vectorize  # past the refusal, to measure what it guards against
        grads = torch.autograd.grad(model.meta_loss(batch), list(model.backbone.parameters()))
        return torch.cat([g.flatten() for g in grads])

    def error(make):
        loop, vmapped = meta_gradient(make(), False), meta_gradient(make(), True)
        return float((loop - vmapped).abs().max() / loop.abs().max())

    assert error(lambda: nn.BatchNorm1d(8, track_running_stats=False)) > 1e-2
    assert error(lambda: nn.LayerNorm(8)) > 1e-4
    assert error(lambda: nn.LayerNorm(8, elementwise_affine=False)) < 1e-12
    assert error(lambda: nn.BatchNorm1d(8, affine=False, track_running_stats=False)) < 1e-12
    assert error(lambda: nn.GroupNorm(2, 8)) < 1e-12


# ------------------------------------------------------------------------------------------------------ DropBlock
def expected_drop_fraction(rate: float, size: int, h: int, w: int) -> float:
    """The expected dropped fraction of an ``h x w`` map: a unit survives when none of the block corners that cover
    it is drawn (each with probability gamma), counted position by position."""
    gamma = rate / size**2 * h * w / ((h - size + 1) * (w - size + 1))

    def corners(n: int, p: int) -> int:  # top-left corners in 0..n-size whose block covers row (column) p
        return min(p, n - size) - max(0, p - size + 1) + 1

    kept = [(1 - gamma) ** (corners(h, i) * corners(w, j)) for i in range(h) for j in range(w)]
    return 1 - sum(kept) / len(kept)


@pytest.mark.parametrize("size, side", [(5, 10), (3, 5), (5, 1)], ids=["rfs-10x10", "3x3-on-5x5", "capped-at-1x1"])
def test_dropblock_drops_whole_blocks_at_the_expected_rate(size, side):
    torch.manual_seed(0)
    block = DropBlock(0.1, size).train()
    x = torch.rand(64, 32, side, side) + 0.5  # positive: a zero in the output is a dropped unit
    out = block(x)
    dropped = (out == 0).float()
    kept = dropped == 0
    # The kept units are rescaled by units / kept units.
    torch.testing.assert_close(out[kept], x[kept] * (dropped.numel() / kept.sum()))
    # The dropped units are a union of whole blocks: a morphological opening by the block leaves them unchanged.
    capped = min(size, side)
    whole = -F.max_pool2d(-dropped, capped, stride=1)  # 1 where every unit of the window is dropped
    assert torch.equal(F.max_pool2d(F.pad(whole, [capped - 1] * 4), capped, stride=1), dropped)
    # The rate: the fraction dropped per map, averaged, within four standard errors of the expectation.
    per_map = dropped.mean(dim=(2, 3)).flatten()
    expected = expected_drop_fraction(0.1, capped, side, side)
    assert 0.05 < expected <= 0.1
    assert abs(float(per_map.mean()) - expected) < 4 * float(per_map.std()) / len(per_map) ** 0.5


def test_dropblock_is_the_identity_in_evaluation_and_ramps_with_the_training_step():
    x = torch.rand(4, 3, 10, 10)
    block = DropBlock(0.2, 5, ramp_steps=100)
    assert block.eval()(x) is x
    block.train()
    assert torch.equal(block(x), x) and block.rate() == 0.0  # step 0 of the ramp
    block.step = 50
    assert block.rate() == pytest.approx(0.1) and not torch.equal(block(x), x)
    block.step = 500
    assert block.rate() == 0.2
    assert block.eval()(x) is x
    # A ResNet-12 with dropout and DropBlock computes in evaluation what the one without computes, from the same
    # state dict: the option adds no entry, so checkpoints of either load into the other.
    torch.manual_seed(0)
    plain = ResNet12(in_channels=3, widths=(4, 5, 6, 7), image_size=32)
    regularized = ResNet12(in_channels=3, widths=(4, 5, 6, 7), image_size=32, drop_rate=0.1, drop_block_size=5)
    regularized.load_state_dict(plain.state_dict())
    images = torch.rand(6, 3, 32, 32)
    assert torch.equal(plain.eval()(images), regularized.eval()(images))
    assert not torch.equal(plain.train()(images), regularized.train()(images))
    drops = [type(b.drop).__name__ for b in regularized.features]
    assert drops == ["Dropout", "Dropout", "DropBlock", "DropBlock"]  # MetaOptNet's and RFS's placement
    assert all(b.drop is None for b in plain.features)


def test_dropblock_draws_its_own_mask_for_each_vmapped_task():
    block = DropBlock(0.3, 2).train()
    x = (torch.rand(1, 8, 4, 6, 6) + 0.5).expand(5, -1, -1, -1, -1)  # five identical tasks
    masks = torch.func.vmap(block, randomness="different")(x) == 0
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 5


def test_vmapped_second_order_maml_is_exact_with_dropblock(monkeypatch):
    # Vmapped tasks and looped tasks draw different masks, so here every mask is a fixed pattern: what is compared is
    # DropBlock's arithmetic (blocks, rescaling) under vmap and second-order differentiation.
    def fixed_mask(self, x, gamma, size):
        n, c, h, w = x.shape
        corners = (torch.arange(n * c * (h - size + 1) * (w - size + 1)).view(n, c, h - size + 1, w - size + 1) % 5 == 0)
        return 1 - F.max_pool2d(F.pad(corners.to(x.dtype), [size - 1] * 4), size, stride=1)

    monkeypatch.setattr(DropBlock, "block_mask", fixed_mask)
    batch = image_tasks(tasks=3, ways=3, shots=2, queries=2, channels=1, size=16)

    def backbone(drop_rate):
        torch.manual_seed(0)
        return ResNet12(1, widths=(3, 4), out_features=3, image_size=16, drop_rate=drop_rate, drop_block_size=3).double()

    net = backbone(0.2)
    expected = reference_maml_gradient(net, batch, 0.3, 2)
    vmapped = library_gradient(MAML(net, inner_lr=0.3, inner_steps=2, vectorize=True), batch)
    assert_rel_close(vmapped, expected, rtol=1e-10)
    assert_rel_close(library_gradient(MAML(net, inner_lr=0.3, inner_steps=2, vectorize=False), batch), expected, rtol=1e-10)
    # Guard: the blocks change the meta-gradient.
    without = library_gradient(MAML(backbone(0.0), inner_lr=0.3, inner_steps=2), batch)
    assert float(torch.cat([(a - b).flatten() for a, b in zip(vmapped, without)]).norm()) > 1e-3 * float(
        torch.cat([b.flatten() for b in without]).norm()
    )


def test_invalid_dropblock_options():
    for kwargs, message in [
        (dict(drop_rate=1.0), "drop_rate must be in [0, 1), got 1.0"),
        (dict(drop_rate=0.1, drop_block_size=0), "drop_block_size must be a positive integer, got 0"),
        (dict(drop_rate=0.1, drop_ramp_steps=-1), "drop_ramp_steps must be a non-negative integer, got -1"),
        (dict(drop_rate=0.1, drop_block_stages=5), "drop_block_stages must be an integer from 0 to 4 (the blocks), got 5"),
    ]:
        with pytest.raises(ConfigError) as error:
            ResNet12(**kwargs)
        assert str(error.value) == message


# ----------------------------------------------------------------------------------------------------------- timm
TIMM_MODEL = "test_resnet"  # one of timm's own test models: a small ResNet with 15 BatchNorm2d layers


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


def noisy_tasks(tasks: int = 2, ways: int = 3, shots: int = 2, queries: int = 3) -> TaskBatch:
    """Fixed tasks: each class is a random template under as much per-image noise."""
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(tasks, ways, 1, 1, 16, 16, generator=g)

    def images(per_class: int) -> torch.Tensor:
        noise = torch.rand(tasks, ways, per_class, 1, 16, 16, generator=g)
        return (0.5 * templates + 0.5 * noise).flatten(1, 2)

    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1).contiguous()  # noqa: E731
    return TaskBatch(images(shots), labels(shots), images(queries), labels(queries))


def test_timm_backbone_trains_under_protonet(timm):
    torch.manual_seed(0)
    backbone = TimmBackbone(TIMM_MODEL, in_channels=1)
    native = timm.create_model(TIMM_MODEL, num_classes=0, in_chans=1)
    count = sum(isinstance(m, nn.BatchNorm2d) for m in native.modules())
    assert count > 0 and sum(isinstance(m, BatchStatNorm) for m in backbone.modules()) == count
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    assert backbone.embedding_dim == native.num_features and backbone.head is None
    model = ProtoNet(backbone)  # tasks vmapped (vectorize: true, the default)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = noisy_tasks()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model.meta_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_timm_backbone_vmapped_second_order_maml_equals_the_per_task_loop(timm):
    batch = image_tasks(tasks=2, ways=3, shots=1, queries=2, channels=1, size=16)

    def gradient(vectorize, first_order=False):
        torch.manual_seed(1)
        backbone = TimmBackbone(TIMM_MODEL, in_channels=1, out_features=3).double()
        learner = MAML(backbone, inner_lr=0.1, inner_steps=1, vectorize=vectorize, first_order=first_order)
        return library_gradient(learner, batch)

    vmapped, looped = gradient(True), gradient(False)
    assert_rel_close(vmapped, looped, rtol=1e-10)
    # Guard: the second-order terms are there (first order differs).
    first = gradient(True, first_order=True)
    assert float(torch.cat([(a - b).flatten() for a, b in zip(vmapped, first)]).norm()) > 1e-6 * float(
        torch.cat([b.flatten() for b in looped]).norm()
    )


def test_timm_native_norms_are_refused_where_vmap_cannot_run_them(timm):
    def native(**kwargs):
        return TimmBackbone(TIMM_MODEL, in_channels=1, norm="native", **kwargs)

    layer = "BatchNorm2d layer model.conv1.1 (and 14 more)"
    with pytest.raises(ConfigError, match="^" + re.escape(f"MAML: the backbone's {layer} gives wrong second-order gradients under vmap")):
        MAML(native(out_features=3))
    data = dict(channels=1, size=16)
    with pytest.raises(ConfigError) as error:
        cpu_trainer(max_steps=1, limit_val_batches=0).fit(ProtoNet(native()), random_images(**data))
    assert str(error.value) == (
        f"ProtoNet: the backbone's {layer} updates running statistics in place in training, which vmap cannot do; "
        "normalize with lit_meta.BatchStatNorm instead (TimmBackbone: norm: batch_stat), or set vectorize: false"
    )
    # The refusal rests on what vmap does with these layers in training.
    with pytest.raises(RuntimeError, match="running_mean or running_var, which will be updated in place"):
        torch.func.vmap(native(), randomness="different")(torch.rand(2, 3, 1, 16, 16))
    # The fix it names: the per-task loop trains them (and timm's layers keep their running statistics).
    model = ProtoNet(native(), vectorize=False)
    cpu_trainer(max_steps=2, limit_val_batches=0).fit(model, random_images(**data))
    assert int(model.backbone.model.bn1.num_batches_tracked) > 0


def test_timm_pretrained_weights_come_from_the_given_file_only(timm, tmp_path, monkeypatch):
    import socket

    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = timm.create_model(TIMM_MODEL, num_classes=10)  # 3 channels and a classifier, as published weights are
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(1, 2)
    weights = source.state_dict()
    torch.save(weights, tmp_path / "weights.pth")
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "weights.safetensors")

    def no_network(*args, **kwargs):
        raise AssertionError("TimmBackbone went to the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for name in ("weights.pth", "weights.safetensors"):
        backbone = TimmBackbone(TIMM_MODEL, in_channels=1, pretrained_path=str(tmp_path / name))
        state = backbone.model.state_dict()
        assert not any(k.startswith("fc.") for k in state)  # the classifier is dropped
        # timm adapts the first convolution to one channel by summing over the colour channels.
        torch.testing.assert_close(state["conv1.0.weight"], weights["conv1.0.weight"].sum(dim=1, keepdim=True))
        for key, value in state.items():
            if key != "conv1.0.weight":
                assert torch.equal(value, weights[key]), key
    # A checkpoint records the architecture without the file, and rebuilds without it.
    spec = backbone_spec(backbone)
    assert spec["init_args"]["pretrained_path"] is None and spec["init_args"]["name"] == TIMM_MODEL
    for name in ("weights.pth", "weights.safetensors"):
        (tmp_path / name).unlink()
    rebuilt = build_backbone(spec)
    rebuilt.load_state_dict(backbone.state_dict())
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(rebuilt.eval()(x), backbone.eval()(x))


def test_timm_backbone_errors_are_one_line(timm, tmp_path, monkeypatch):
    other, unrelated = tmp_path / "other.pth", tmp_path / "unrelated.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), other)
    torch.save({"encoder.weight": torch.zeros(3)}, unrelated)
    cases = [
        (dict(name="no_such_model"), f"TimmBackbone: timm {timm.__version__} has no model 'no_such_model'; see timm.list_models()"),
        (dict(name=TIMM_MODEL, norm="group"), "TimmBackbone: norm must be one of batch_stat, native, got 'group'"),
        (dict(name=TIMM_MODEL, pretrained_path=str(tmp_path / "missing.pth")), f"TimmBackbone: no weights file at {tmp_path / 'missing.pth'}; give pretrained_path the path of a local file"),
        (dict(name=TIMM_MODEL, model_args={"num_classes": 5}), "TimmBackbone: model_args may not set num_classes; it is TimmBackbone's to set"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as error:
            TimmBackbone(**kwargs)
        assert str(error.value) == message
    # Entries of the same name and another shape; no entry of the model at all (which timm would load silently).
    with pytest.raises(ConfigError, match=rf"^TimmBackbone: the weights in {other} do not fit timm's {TIMM_MODEL}: Error\(s\) in loading state_dict for ResNet: size mismatch for \S+: copying a param with shape"):
        TimmBackbone(TIMM_MODEL, pretrained_path=str(other))
    with pytest.raises(ConfigError, match=rf"^TimmBackbone: the weights in {unrelated} lack \d+ of the entries of timm's {TIMM_MODEL}, e\.g\. conv1\.0\.weight; give a file of that model's weights$"):
        TimmBackbone(TIMM_MODEL, pretrained_path=str(unrelated))
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ConfigError, match=r"^TimmBackbone needs the timm package: pip install lit_meta\[timm\]$"):
        TimmBackbone(TIMM_MODEL)
