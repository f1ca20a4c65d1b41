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
from lit_meta.algorithms.metabgd import MetaBGD
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
    e = torch.relu(means @ g["encoder.0.weight"].T + g["encoder.0.bias"])
    if model.generator.set_context:
        e = torch.cat([e, e.mean(0).expand_as(e)], dim=1)
    h = torch.relu(e @ g["decoder.0.weight"].T + g["decoder.0.bias"])
    out = h @ g["decoder.2.weight"].T
    return out[:, :-1], out[:, -1]


def reference_meta_loss(model: MetaBGD, batch: TaskBatch, steps: int, first_order: bool) -> Tensor:
    """Per-task loop with ``torch.autograd.grad(create_graph=True)``: no vmap, no torch.func, no adapt()."""
    backbone = dict(model.backbone.named_parameters())
    lr = model.inner_lr
    losses = []
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        n = len(sx)
        gamma = beta = None
        if model.film is not None:
            z0 = reference_embed(backbone, torch.cat([sx, qx]) if model.joint_embedding else sx)[:n]
            means0 = torch.stack([z0[sy == c].mean(0) for c in range(WAYS)])
            f = dict(model.film.named_parameters())
            context = torch.relu(means0 @ f["encoder.0.weight"].T + f["encoder.0.bias"]).mean(0)
            gamma, beta = (context @ f["out.weight"].T + f["out.bias"]).split(HIDDEN)
        if model.finetune == "head":
            z = reference_embed(backbone, torch.cat([sx, qx]), gamma, beta)
            zs, zq = z[:n], z[n:]
        else:
            zs = reference_embed(backbone, sx, gamma, beta)
        weight, bias = reference_generator(model, torch.stack([zs[sy == c].mean(0) for c in range(WAYS)]))
        if model.finetune == "head":
            for _ in range(steps):
                loss = F.cross_entropy(zs @ weight.T + bias, sy)
                gw, gb = torch.autograd.grad(loss, (weight, bias), create_graph=not first_order)
                weight, bias = weight - lr * gw, bias - lr * gb
            losses.append(F.cross_entropy(zq @ weight.T + bias, qy))
        else:  # every parameter of the task model adapts, starting from the modulated backbone
            # Clones: the inner gradient is the partial derivative in each task-model parameter. The generated head
            # also depends on the shared backbone parameters, and autograd.grad with respect to those leaves would
            # add that path too.
            fast = {k: v.clone() for k, v in backbone.items()}
            if gamma is not None:
                fast["net.1.weight"], fast["net.1.bias"] = fast["net.1.weight"] * (1 + gamma), fast["net.1.bias"] + beta
            fast["weight"], fast["bias"] = weight, bias
            names = list(fast)
            for _ in range(steps):
                loss = F.cross_entropy(reference_embed(fast, sx) @ fast["weight"].T + fast["bias"], sy)
                grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=not first_order)
                fast = {k: fast[k] - lr * g for k, g in zip(names, grads)}
            losses.append(F.cross_entropy(reference_embed(fast, qx) @ fast["weight"].T + fast["bias"], qy))
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
        if name.startswith(("generator.", "film.")):
            assert expected[name].norm() > 1e-6 * total, f"no gradient reaches {name}: the test would prove nothing"


CONFIGS = {
    "head": dict(),
    "head-first-order": dict(first_order=True),
    "head-no-context": dict(set_context=False),
    "head-film": dict(film=True),
    "all-film": dict(finetune="all", film=True),
    "all-first-order": dict(finetune="all", first_order=True),
}


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_meta_gradient_equals_per_task_autograd_reference(config: str) -> None:
    kwargs = CONFIGS[config]
    steps = 2 if kwargs.get("finetune") == "all" else 3
    torch.manual_seed(0)
    batch = random_batch()
    grads = {}
    for vectorize in (True, False):
        torch.manual_seed(1)
        model = MetaBGD(TinyEmbedding(), inner_lr=0.3, inner_steps=steps, generator_hidden=16, vectorize=vectorize, **kwargs).double()
        if model.film is not None:
            # Its output layer starts at zero (identity modulation), which would leave the encoder's gradient zero.
            with torch.no_grad():
                model.film.out.weight.normal_(std=0.1)
                model.film.out.bias.normal_(std=0.1)
        grads[vectorize] = gradients(model, model.meta_loss(batch))
    reference = gradients(model, reference_meta_loss(model, batch, steps, kwargs.get("first_order", False)))
    assert any(k.startswith("generator.") for k in reference)
    assert_relative_close(grads[True], reference)
    assert_relative_close(grads[False], reference)


def test_first_order_differs_from_second_order() -> None:
    # Guards the reference test: the two orders must give different generator gradients here.
    batch = random_batch()
    out = []
    for first_order in (False, True):
        torch.manual_seed(1)
        model = MetaBGD(TinyEmbedding(), inner_lr=0.3, inner_steps=3, generator_hidden=16, first_order=first_order).double()
        out.append(gradients(model, model.meta_loss(batch))["generator.decoder.2.weight"])
    assert (out[0] - out[1]).norm() > 1e-3 * out[0].norm()


def test_learned_inner_lr_gets_the_reference_gradient() -> None:
    batch = random_batch()
    torch.manual_seed(1)
    model = MetaBGD(TinyEmbedding(), inner_lr=0.3, inner_steps=2, generator_hidden=16, learn_inner_lr=True).double()
    actual = gradients(model, model.meta_loss(batch))
    expected = gradients(model, reference_meta_loss(model, batch, 2, first_order=False))
    assert_relative_close(actual, expected)
    assert "inner_lr" in actual


@pytest.mark.parametrize("kwargs", [dict(), dict(film=True, finetune="all")], ids=["head", "all-film"])
def test_vectorized_equals_loop_in_evaluation(kwargs) -> None:
    batch = random_batch(tasks=4)
    metrics = []
    for vectorize in (True, False):
        torch.manual_seed(2)
        model = MetaBGD(TinyEmbedding(), inner_steps=2, eval_inner_steps=4, generator_hidden=16, vectorize=vectorize, **kwargs).double()
        metrics.append(model.task_metrics(batch))
    assert set(metrics[0]) == {"acc", "loss", "acc_pre", "loss_pre"}
    for key in metrics[0]:
        torch.testing.assert_close(metrics[0][key], metrics[1][key], rtol=1e-9, atol=1e-12)


def test_evaluation_builds_no_graph_to_the_meta_parameters() -> None:
    model = MetaBGD(TinyEmbedding(), inner_steps=2)
    objectives, logits = model.task_outputs(random_batch(dtype=torch.float32), training=False)
    assert not logits.requires_grad and not objectives.requires_grad


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="joint_embedding"):
        MetaBGD(TinyEmbedding(), finetune="all", joint_embedding=True)
    with pytest.raises(ConfigError, match="finetune"):
        MetaBGD(TinyEmbedding(), finetune="body")
    with pytest.raises(ConfigError, match="BatchStatNorm"):
        MetaBGD(nn.Sequential(nn.Linear(4, 4)), embedding_dim=4, film=True)
    with pytest.raises(ConfigError, match="embedding_dim"):
        MetaBGD(nn.Sequential(nn.Linear(4, 4)))
    assert not MetaBGD(TinyEmbedding(), finetune="all").joint_embedding
    assert MetaBGD(TinyEmbedding()).joint_embedding


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
    model = MetaBGD(TinyEmbedding(32, 32, 16), inner_lr=1.0, inner_steps=3, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, inference_mode=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", max_epochs=1, limit_val_batches=1,
    )
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    assert result["test/acc"] > 0.5 > 0.2 + 3 * result["test/acc_ci95"]  # chance is 0.2

    batch = next(iter(data.test_dataloader()))  # 200 fixed test episodes, 25 queries each
    generated = model.metrics_by_step(batch, steps=3, init="generated")
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
    # The generated initialization stays ahead of fine-tuning from a zero head with the same steps.
    assert accuracy[3] > zero[3] + 0.03
    # The evaluation path is the same one the trainer's test loop used.
    assert float(accuracy[3]) == pytest.approx(result["test/acc"], abs=1e-6)
    assert float(accuracy[0]) == pytest.approx(result["test/acc_pre"], abs=1e-6)
