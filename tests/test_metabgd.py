"""MetaBGD: meta-gradient against a per-task autograd reference, vmap == loop, and what the generator buys."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.base import EpisodicDataModule
from datamodules.errors import ConfigError
from datamodules.task_batch import TaskBatch
from lit_meta.algorithms.metabgd import MetaBGD, _top_eigenvalue, head_hessian_product
from lit_meta.backbones import BatchStatNorm

FEATURES, HIDDEN, DIM, WAYS = 12, 16, 8, 4


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: on a 2-core machine intra-op threads cost far more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyEmbedding(nn.Module):
    """Linear -> BatchStatNorm -> ReLU -> Linear embedding network."""

    def __init__(self, in_features: int = FEATURES, hidden: int = HIDDEN, embedding_dim: int = DIM) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.net = nn.Sequential(nn.Linear(in_features, hidden), BatchStatNorm(hidden), nn.ReLU(), nn.Linear(hidden, embedding_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def random_batch(tasks: int = 3, shots: int = 2, queries: int = 3, dtype=torch.float64) -> TaskBatch:
    support_y = torch.arange(WAYS).repeat_interleave(shots).expand(tasks, -1).clone()
    query_y = torch.stack([torch.randperm(WAYS * queries) % WAYS for _ in range(tasks)])
    return TaskBatch(
        torch.randn(tasks, WAYS * shots, FEATURES, dtype=dtype), support_y, torch.randn(tasks, WAYS * queries, FEATURES, dtype=dtype), query_y
    )


# ------------------------------------------------------------------------------------------- the reference, by hand
def reference_embed(p: dict[str, Tensor], x: Tensor, gamma: Tensor | None = None, beta: Tensor | None = None) -> Tensor:
    """TinyEmbedding written out, with batch-statistics normalization and optional FiLM on its affine map."""
    h = x @ p["net.0.weight"].T + p["net.0.bias"]
    normed = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
    weight, bias = p["net.1.weight"], p["net.1.bias"]
    if gamma is not None:
        weight, bias = weight * (1 + gamma), bias + beta
    return torch.relu(normed * weight + bias) @ p["net.3.weight"].T + p["net.3.bias"]


def reference_generator(model: MetaBGD, means: Tensor) -> tuple[Tensor, Tensor]:
    g = dict(model.generator.named_parameters())
    e = torch.relu(means @ g["set_encoder.encoder.0.weight"].T + g["set_encoder.encoder.0.bias"])
    if model.generator.set_encoder.set_context:
        e = torch.cat([e, e.mean(0).expand_as(e)], dim=1)
    h = torch.relu(e @ g["decoder.0.weight"].T + g["decoder.0.bias"])
    out = h @ g["decoder.2.weight"].T
    if model.generator_kind == "residual":
        w = means + out[:, :-1]
        return w / w.norm(dim=1, keepdim=True), out[:, -1]
    return out[:, :-1], out[:, -1]


def reference_meta_loss(model: MetaBGD, batch: TaskBatch, steps: int, first_order: bool, step: int = 0) -> Tensor:
    """Per-task loop with ``torch.autograd.grad(create_graph=True)``: no vmap, no torch.func, no adapt().

    Only the curvature that normalizes the rates comes from the model (a detached constant; its power iteration is
    checked against an explicit Hessian below).
    """
    backbone = dict(model.backbone.named_parameters())
    tau = model.log_temperature.exp()
    weight_pre = model.pre_loss_weight_at(step)
    losses = []
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        n = len(sx)
        gamma = beta = None
        if model.film is not None:
            z0 = reference_embed(backbone, torch.cat([sx, qx]))[:n]
            means0 = torch.stack([z0[sy == c].mean(0) for c in range(WAYS)])
            f = dict(model.film.named_parameters())
            context = torch.relu(means0 @ f["encoder.0.weight"].T + f["encoder.0.bias"]).mean(0)
            gamma, beta = (context @ f["out.weight"].T + f["out.bias"]).split(HIDDEN)
        z = reference_embed(backbone, torch.cat([sx, qx]), gamma, beta)
        zs, zq = z[:n], z[n:]
        if model.features == "normalized":
            centre = zs.mean(0)
            zs = (zs - centre) / (zs - centre).norm(dim=1, keepdim=True)
            zq = (zq - centre) / (zq - centre).norm(dim=1, keepdim=True)
        means = torch.stack([zs[sy == c].mean(0) for c in range(WAYS)])
        if model.generator_kind == "prototype":
            weight, bias = 2 * means, -(means**2).sum(1)
        elif model.generator_kind == "zero":
            # Leaves that require grad, so the inner autograd.grad can differentiate with respect to them.
            weight, bias = torch.zeros_like(means).requires_grad_(), torch.zeros(WAYS, dtype=means.dtype, requires_grad=True)
        else:
            weight, bias = reference_generator(model, means)
        scale = model.curvature(zs, sy, {"weight": weight, "bias": bias}) if model.precondition and steps else 1.0
        start = (weight, bias)
        middle = []
        for j in range(steps):
            if 0 < j:
                middle.append(F.cross_entropy(tau * (zq @ weight.T + bias), qy))
            loss = F.cross_entropy(tau * (zs @ weight.T + bias), sy)
            gw, gb = torch.autograd.grad(loss, (weight, bias), create_graph=not first_order)
            if model.inner_lr_logits is None:
                rw = rb = model.inner_lr
            else:
                rate = model.max_inner_lr * torch.sigmoid(model.inner_lr_logits[min(j, model.inner_steps - 1)])
                rw, rb = rate[:-1], rate[-1]
            weight, bias = weight - rw / scale * gw, bias - rb / scale * gb
        loss = F.cross_entropy(tau * (zq @ weight.T + bias), qy)
        if steps and weight_pre > 0:
            loss = loss + weight_pre * F.cross_entropy(tau * (zq @ start[0].T + start[1]), qy)
        if middle and model.step_loss_weight > 0:
            loss = loss + model.step_loss_weight * sum(middle) / len(middle)
        losses.append(loss)
    return torch.stack(losses).mean()


def gradients(model: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=False)))


def assert_relative_close(actual: dict[str, Tensor], expected: dict[str, Tensor], rtol: float = 1e-5) -> None:
    """Each parameter's gradient within ``rtol`` (relative, in norm) of the reference.

    A bias right before a batch-statistics normalization has an exactly zero gradient (the mean is subtracted); both
    sides give round-off (1e-18) there, so such a parameter is checked against the whole gradient's norm instead.
    """
    assert actual.keys() == expected.keys()
    total = torch.sqrt(sum(g.pow(2).sum() for g in expected.values()))
    for name in expected:
        scale = expected[name].norm()
        if scale < 1e-12 * total:
            assert actual[name].norm() < 1e-12 * total, name
            continue
        assert (actual[name] - expected[name]).norm() <= rtol * scale, name
    for name in expected:
        if name.startswith(("generator.", "film.", "inner_lr_logits", "log_temperature")):
            assert expected[name].norm() > 1e-6 * total, f"no gradient reaches {name}: the test would prove nothing"


CONFIGS = {
    "residual": dict(),
    "residual-first-order": dict(first_order=True),
    "residual-no-context": dict(set_context=False),
    "residual-film": dict(film=True),
    "residual-annealed-pre-loss": dict(pre_loss_weight=2.0, pre_loss_weight_end=0.5, pre_loss_anneal_steps=10),
    "residual-step-losses": dict(step_loss_weight=0.7),
    "generator-only": dict(inner_steps=0, eval_inner_steps=3),
    "prototype": dict(generator="prototype"),
    "zero": dict(generator="zero"),
    "mlp-raw-fixed-rate": dict(generator="mlp", features="raw", temperature=1.0, learn_temperature=False, precondition=False, learn_inner_lr=False),
}


def randomize_zero_layers(model: MetaBGD) -> None:
    """Zero-initialised output layers (residual, FiLM) would leave the layers before them without a gradient."""
    with torch.no_grad():
        if model.generator_kind == "residual":
            model.generator.decoder[-1].weight.normal_(std=0.1)
        if model.film is not None:
            model.film.out.weight.normal_(std=0.1)
            model.film.out.bias.normal_(std=0.1)


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_meta_gradient_equals_per_task_autograd_reference(config: str) -> None:
    kwargs = {"inner_steps": 3, **CONFIGS[config]}
    torch.manual_seed(0)
    batch = random_batch()
    grads = {}
    for vectorize in (True, False):
        torch.manual_seed(1)
        model = MetaBGD(TinyEmbedding(), inner_lr=0.3, generator_hidden=16, vectorize=vectorize, **kwargs).double()
        randomize_zero_layers(model)
        grads[vectorize] = gradients(model, model.meta_loss(batch))
    reference = gradients(model, reference_meta_loss(model, batch, model.inner_steps, model.first_order))
    assert_relative_close(grads[True], reference)
    assert_relative_close(grads[False], reference)


def test_first_order_differs_from_second_order() -> None:
    # Guards the reference test: the two orders must give different generator gradients here.
    batch = random_batch()
    out = []
    for first_order in (False, True):
        torch.manual_seed(1)
        model = MetaBGD(TinyEmbedding(), inner_lr=0.3, inner_steps=3, generator_hidden=16, first_order=first_order).double()
        randomize_zero_layers(model)
        out.append(gradients(model, model.meta_loss(batch))["generator.decoder.2.weight"])
    assert (out[0] - out[1]).norm() > 1e-3 * out[0].norm()


def explicit_hessian(model: MetaBGD, zs: Tensor, sy: Tensor, head: dict[str, Tensor]) -> Tensor:
    """The support loss's Hessian in the flattened ``(weight, bias)`` of the head, by double autograd."""
    tau = model.log_temperature.exp().detach()
    shape = head["weight"].shape

    def loss(flat: Tensor) -> Tensor:
        w, b = flat[: shape.numel()].view(shape), flat[shape.numel():]
        return F.cross_entropy(tau * (zs @ w.T + b), sy)

    return torch.autograd.functional.hessian(loss, torch.cat([head["weight"].flatten(), head["bias"]]))


def test_closed_form_hessian_product_equals_autograd() -> None:
    g = torch.Generator().manual_seed(5)
    z, y, tau = torch.randn(12, 7, generator=g, dtype=torch.float64), torch.arange(4).repeat(3), torch.tensor(3.0, dtype=torch.float64)
    head = {"weight": torch.randn(4, 7, generator=g, dtype=torch.float64), "bias": torch.randn(4, generator=g, dtype=torch.float64)}
    v = {"weight": torch.randn(4, 7, generator=g, dtype=torch.float64), "bias": torch.randn(4, generator=g, dtype=torch.float64)}
    loss = lambda p: F.cross_entropy(tau * (z @ p["weight"].T + p["bias"]), y)  # noqa: E731
    expected = torch.func.jvp(torch.func.grad(loss), (head,), (v,))[1]
    product = head_hessian_product(z, tau, head)(v)
    for k in head:
        torch.testing.assert_close(product[k], expected[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("features", ["normalized", "raw"])
def test_stability_monitor_equals_the_explicit_hessian_eigenvalue(features: str) -> None:
    torch.manual_seed(3)
    model = MetaBGD(TinyEmbedding(), inner_steps=2, features=features, generator_hidden=16).double()
    randomize_zero_layers(model)
    with torch.no_grad():
        model.inner_lr_logits.normal_()  # different rates per dimension
    batch = random_batch(tasks=1)
    with model.episode_ways(batch):
        zs, _ = model.task_features(batch.support_x[0], batch.support_y[0], batch.query_x[0], training=True)
        zs, sy = zs.detach(), batch.support_y[0]
        head = {k: v.detach() for k, v in model.initial_head(zs, sy).items()}
    hessian = explicit_hessian(model, zs, sy, head)
    top = torch.linalg.eigvalsh(hessian)[-1]
    product = head_hessian_product(zs, model.log_temperature.exp().detach(), head)
    # Power iteration converges to the top eigenvalue from below (a Rayleigh quotient); the default count gets close.
    assert float(_top_eigenvalue(product, head, None, iterations=2000)) == pytest.approx(float(top), rel=1e-8)
    curvature = float(model.curvature(zs, sy, head))
    assert float(top) * 0.97 <= curvature <= float(top) * (1 + 1e-9)
    assert float(top) <= float(model.curvature_bound(zs))  # the bound C of the module docstring
    # alpha * lambda_max with per-entry rates: the top eigenvalue of P^1/2 H P^1/2.
    rates = model.step_sizes(zs, model.curvature(zs, sy, head))(1)
    p = torch.cat([torch.as_tensor(rates["weight"]).expand_as(head["weight"]).flatten(), torch.as_tensor(rates["bias"]).expand_as(head["bias"])])
    expected = torch.linalg.eigvalsh(p.sqrt().unsqueeze(1) * hessian * p.sqrt().unsqueeze(0))[-1]
    sqrt_p = {k: torch.as_tensor(rates[k]).sqrt().expand_as(v) for k, v in head.items()}
    assert float(_top_eigenvalue(product, head, sqrt_p, iterations=2000)) == pytest.approx(float(expected), rel=1e-8)
    assert float(expected) * 0.97 <= float(model.stability(zs, sy, head, rates)) <= float(expected) * (1 + 1e-9)
    # At the initial head, dividing the rates by the curvature keeps alpha * lambda_max below the largest rate.
    assert float(expected) <= float(model.rate(1).max()) / 0.97


def test_curvature_bound_holds_for_random_heads() -> None:
    torch.manual_seed(4)
    model = MetaBGD(TinyEmbedding(), inner_steps=1, features="raw", temperature=3.0, generator_hidden=16).double()
    for _ in range(5):
        zs, sy = torch.randn(8, DIM, dtype=torch.float64) * 2, torch.arange(WAYS).repeat(2)
        head = {"weight": torch.randn(WAYS, DIM, dtype=torch.float64), "bias": torch.randn(WAYS, dtype=torch.float64)}
        top = torch.linalg.eigvalsh(explicit_hessian(model, zs, sy, head))[-1]
        assert 0 < float(top) <= float(model.curvature_bound(zs))


def test_curvature_floor_caps_the_steps_of_a_confident_head() -> None:
    torch.manual_seed(5)
    zs, sy = F.normalize(torch.randn(WAYS * 3, DIM, dtype=torch.float64), dim=-1), torch.arange(WAYS).repeat(3)
    means = torch.stack([zs[sy == c].mean(0) for c in range(WAYS)])
    # A head that fits the support set with near-certainty: its curvature almost vanishes.
    head = {"weight": 1000 * means, "bias": torch.zeros(WAYS, dtype=torch.float64)}
    curvatures = {}
    for floor in (1e-3, 0.1):
        model = MetaBGD(TinyEmbedding(), inner_steps=1, generator_hidden=16, curvature_floor=floor).double()
        top = torch.linalg.eigvalsh(explicit_hessian(model, zs, sy, head))[-1]
        bound = float(model.curvature_bound(zs))
        curvatures[floor] = float(model.curvature(zs, sy, head))
        assert float(top) < 1e-3 * bound
        assert curvatures[floor] == pytest.approx(max(float(top), floor * bound), rel=0.03)
    assert curvatures[0.1] > 10 * curvatures[1e-3]  # the floor, not the vanishing curvature, sets the step
    with pytest.raises(ConfigError, match="curvature_floor"):
        MetaBGD(TinyEmbedding(), curvature_floor=0.0)


@pytest.mark.parametrize("kwargs", [dict(), dict(film=True), dict(generator="prototype")], ids=["residual", "film", "prototype"])
def test_vectorized_equals_loop_in_evaluation(kwargs) -> None:
    batch = random_batch(tasks=4)
    metrics = []
    for vectorize in (True, False):
        torch.manual_seed(2)
        model = MetaBGD(TinyEmbedding(), inner_steps=2, eval_inner_steps=4, generator_hidden=16, vectorize=vectorize, **kwargs).double()
        randomize_zero_layers(model)
        metrics.append(model.task_metrics(batch))
    steps = [f"{m}_step{j}" for m in ("acc", "loss") for j in range(1, 5)]
    assert set(metrics[0]) == {"acc", "loss", "acc_pre", "loss_pre", "stability", "drift", *steps}
    for key in metrics[0]:
        torch.testing.assert_close(metrics[0][key], metrics[1][key], rtol=1e-9, atol=1e-12)
    # The last step's values are the reported ones.
    torch.testing.assert_close(metrics[0]["acc"], metrics[0]["acc_step4"])


def test_evaluation_builds_no_graph_to_the_meta_parameters() -> None:
    model = MetaBGD(TinyEmbedding(), inner_steps=2)
    objectives, logits = model.task_outputs(random_batch(dtype=torch.float32), training=False)
    assert not logits.requires_grad and not objectives.requires_grad


def test_pre_loss_weight_is_annealed_linearly() -> None:
    model = MetaBGD(TinyEmbedding(), pre_loss_weight=1.0, pre_loss_weight_end=0.2, pre_loss_anneal_steps=100)
    assert [model.pre_loss_weight_at(s) for s in (0, 50, 100, 500)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert MetaBGD(TinyEmbedding(), pre_loss_weight=0.5).pre_loss_weight_at(10**6) == 0.5


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="generator must be one of"):
        MetaBGD(TinyEmbedding(), generator="hypernet")
    with pytest.raises(ConfigError, match="features must be one of"):
        MetaBGD(TinyEmbedding(), features="whitened")
    with pytest.raises(ConfigError, match="inside \\(0, max_inner_lr\\)"):
        MetaBGD(TinyEmbedding(), inner_lr=1.5)
    with pytest.raises(ConfigError, match="temperature must be a positive number"):
        MetaBGD(TinyEmbedding(), temperature=0)
    with pytest.raises(ConfigError, match="inner_steps must be an integer"):
        MetaBGD(TinyEmbedding(), inner_steps=-1)
    with pytest.raises(ConfigError, match="step_loss_weight must be a number >= 0"):
        MetaBGD(TinyEmbedding(), step_loss_weight=-0.5)
    with pytest.raises(ConfigError, match="BatchStatNorm"):
        MetaBGD(nn.Sequential(nn.Linear(4, 4)), embedding_dim=4, film=True)
    with pytest.raises(ConfigError, match="embedding_dim"):
        MetaBGD(nn.Sequential(nn.Linear(4, 4)))
    # A fixed rate is not bounded by max_inner_lr (it is not a sigmoid), and a generator-only model learns none.
    assert MetaBGD(TinyEmbedding(), inner_lr=1.5, learn_inner_lr=False).inner_lr_logits is None
    assert MetaBGD(TinyEmbedding(), inner_steps=0).inner_lr_logits is None


# ---------------------------------------------------------------------------------------- what the generator buys
class GaussianClasses(EpisodicDataModule):
    """Classes are Gaussian clusters in a 4-d subspace, hidden among 28 high-variance nuisance dimensions."""

    def __init__(self, classes: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        g = torch.Generator().manual_seed(1234)
        self.means = {split: torch.randn(classes, 4, generator=g) for split in ("train", "val", "test")}
        self.rotation = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]

    def num_classes(self, split: str) -> int:
        return self.means[split].shape[0]

    def sample_task(self, split: str, generator: torch.Generator):
        shape = self.shape(split)
        means = self.means[split][torch.randperm(self.num_classes(split), generator=generator)[: shape.ways]]
        n = shape.shots + shape.queries
        x = torch.cat([means.unsqueeze(1) + 0.6 * torch.randn(shape.ways, n, 4, generator=generator), 3.0 * torch.randn(shape.ways, n, 28, generator=generator)], -1)
        x = x @ self.rotation.T
        y = torch.arange(shape.ways).unsqueeze(1).expand(-1, n)
        s = shape.shots
        return x[:, :s].reshape(-1, 32), y[:, :s].reshape(-1), x[:, s:].reshape(-1, 32), y[:, s:].reshape(-1)


def test_generated_initialization_beats_zero_and_random_heads_and_fine_tuning_improves_it() -> None:
    data = GaussianClasses(ways=5, shots=5, queries=5, meta_batch_size=8, train_batches=150, val_episodes=16, test_episodes=200, eval_meta_batch_size=200)
    torch.manual_seed(0)
    model = MetaBGD(TinyEmbedding(32, 32, 16), inner_lr=0.5, inner_steps=3, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, inference_mode=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", max_epochs=1, limit_val_batches=1,
    )
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    assert result["test/acc"] > 0.5 > 0.2 + 3 * result["test/acc_ci95"]  # chance is 0.2

    batch = next(iter(data.test_dataloader()))  # 200 fixed test episodes, 25 queries each
    generated = model.metrics_by_step(batch, steps=3, init=None)
    zero = model.metrics_by_step(batch, steps=3, init="zero")["acc"].mean(1)
    random = model.metrics_by_step(batch, steps=0, init="random")["acc"].mean(1)
    accuracy = generated["acc"].mean(1)
    # Before any fine-tuning step: the generated head classifies; zero and random heads are at chance.
    assert zero[0] == pytest.approx(0.2)  # all logits equal: argmax is class 0
    assert abs(random[0] - 0.2) < 0.05
    assert accuracy[0] > 0.5
    # Fine-tuning improves on the generated initialization: the query loss falls in a paired comparison over the
    # same episodes (by far more than its standard error), and accuracy rises.
    loss_change = generated["loss"][3] - generated["loss"][0]
    assert loss_change.mean() < -4 * loss_change.std() / len(loss_change) ** 0.5
    assert accuracy[3] > accuracy[0]
    # The evaluation path is the same one the trainer's test loop used.
    assert float(accuracy[3]) == pytest.approx(result["test/acc"], abs=1e-6)
    assert float(accuracy[0]) == pytest.approx(result["test/acc_pre"], abs=1e-6)


def test_generated_head_learns_on_real_omniglot(omniglot_root) -> None:
    """Forty 5-way 1-shot meta-batches of real Omniglot lift the generated head, before any fine-tuning step, far
    above chance (20%) and above the cosine-prototype head it starts as."""
    from datamodules import OmniglotDataModule
    from lit_meta import Conv4

    data = OmniglotDataModule(
        root=omniglot_root, split="vinyals", ways=5, shots=1, queries=5, meta_batch_size=2, train_batches=40,
        val_episodes=10, test_episodes=100, eval_meta_batch_size=100, seed=0,
    )
    torch.manual_seed(0)
    backbone = Conv4(in_channels=1, hidden=32, out_features=None, pool="max", image_size=28, fused_norm=True)
    model = MetaBGD(backbone, inner_steps=2, monitor_every=0, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, inference_mode=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", max_epochs=1, limit_val_batches=0,
    )
    before = trainer.test(model, datamodule=data, verbose=False)[0]
    trainer.fit(model, datamodule=data)
    after = trainer.test(model, datamodule=data, verbose=False)[0]
    assert after["test/acc_pre"] > 0.6
    assert after["test/acc_pre"] - before["test/acc_pre"] > 0.15 > 3 * after["test/acc_pre_ci95"]
    assert after["test/stability"] < 1.0
