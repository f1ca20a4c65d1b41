"""ProtoNet and MatchingNet: logits and attention against independent computations, FCE, gradients, short training."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.base import EpisodicDataModule
from datamodules.errors import ConfigError
from datamodules.task_batch import TaskBatch
from lit_meta.algorithms.matchingnet import MatchingNet
from lit_meta.algorithms.metabgd import MetaBGD
from lit_meta.algorithms.protonet import ProtoNet
from lit_meta.backbones import BatchStatNorm, Conv4

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: on a 2-core machine, intra-op threads cost far more than they save (30x here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyEmbedding(nn.Module):
    """Linear -> BatchStatNorm -> ReLU -> Linear: an embedding network with batch statistics, fast on CPU."""

    def __init__(self, in_features: int = 12, hidden: int = 24, embedding_dim: int = 8) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.net = nn.Sequential(nn.Linear(in_features, hidden), BatchStatNorm(hidden), nn.ReLU(), nn.Linear(hidden, embedding_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GaussianClasses(EpisodicDataModule):
    """Few-shot tasks whose classes are Gaussian clusters hidden among high-variance nuisance dimensions.

    A class is a mean in a ``signal``-dimensional subspace; inputs are ``[mean + spread * noise, nuisance * noise]``
    rotated by a fixed random orthogonal matrix. A random embedding mixes the nuisance into every feature, so
    accuracy above the untrained model's means the embedding was learned. Train, validation and test classes are
    disjoint (fresh means).
    """

    def __init__(self, signal: int = 4, nuisance: int = 28, classes: int = 64, spread: float = 0.6, nuisance_scale: float = 3.0, **kwargs) -> None:
        super().__init__(**kwargs)
        g = torch.Generator().manual_seed(1234)
        self.in_features = signal + nuisance
        self.means = {split: torch.randn(classes, signal, generator=g) for split in ("train", "val", "test")}
        self.rotation = torch.linalg.qr(torch.randn(self.in_features, self.in_features, generator=g))[0]
        self.spread, self.nuisance, self.nuisance_scale = spread, nuisance, nuisance_scale

    def num_classes(self, split: str) -> int:
        return self.means[split].shape[0]

    def sample_task(self, split: str, generator: torch.Generator):
        shape = self.shape(split)
        means = self.means[split][torch.randperm(self.num_classes(split), generator=generator)[: shape.ways]]
        n = shape.shots + shape.queries
        signal = means.unsqueeze(1) + self.spread * torch.randn(shape.ways, n, means.shape[1], generator=generator)
        nuisance = self.nuisance_scale * torch.randn(shape.ways, n, self.nuisance, generator=generator)
        x = torch.cat([signal, nuisance], -1) @ self.rotation.T
        y = torch.arange(shape.ways).unsqueeze(1).expand(-1, n)
        s = shape.shots
        return x[:, :s].reshape(-1, self.in_features), y[:, :s].reshape(-1), x[:, s:].reshape(-1, self.in_features), y[:, s:].reshape(-1)


def random_batch(tasks: int = 3, ways: int = 4, shots: int = 2, queries: int = 3, features: int = 12, dtype=torch.float64) -> TaskBatch:
    """Support ordered by class, query shuffled (so nothing relies on the query order)."""
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    query_y = torch.stack([torch.randperm(ways * queries) % ways for _ in range(tasks)])
    return TaskBatch(
        torch.randn(tasks, ways * shots, features, dtype=dtype), support_y, torch.randn(tasks, ways * queries, features, dtype=dtype), query_y
    )


def reference_class_means(z: Tensor, y: Tensor, ways: int) -> Tensor:
    return torch.stack([z[y == c].mean(0) for c in range(ways)])


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        inference_mode=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        max_epochs=1,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------------- ProtoNet
@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("vectorize", [True, False])
def test_protonet_logits_are_negative_squared_distances_to_class_means(joint: bool, vectorize: bool) -> None:
    model = ProtoNet(TinyEmbedding(), joint_embedding=joint, vectorize=vectorize).double()
    batch = random_batch()
    objectives, logits = model.task_outputs(batch, training=True)
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        if joint:  # one batch through the batch-statistics backbone
            z = model.backbone(torch.cat([sx, qx]))
            zs, zq = z[: len(sx)], z[len(sx) :]
        else:
            zs, zq = model.backbone(sx), model.backbone(qx)
        prototypes = reference_class_means(zs, sy, 4)
        expected = torch.stack([torch.stack([-((q - p) ** 2).sum() for p in prototypes]) for q in zq])
        torch.testing.assert_close(logits[t], expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(objectives[t], F.cross_entropy(expected, qy), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("learn", [False, True])
def test_protonet_cosine_logits(learn: bool) -> None:
    model = ProtoNet(TinyEmbedding(), distance="cosine", temperature=0.2, learn_temperature=learn).double()
    batch = random_batch()
    _, logits = model.task_outputs(batch, training=False)
    for t in range(batch.num_tasks):
        z = model.backbone(torch.cat([batch.support_x[t], batch.query_x[t]]))
        zs, zq = z[:8], z[8:]
        prototypes = reference_class_means(zs, batch.support_y[t], 4)
        temperature = model.temperature.log_value.exp() if learn else 0.2
        expected = F.cosine_similarity(zq.unsqueeze(1), prototypes.unsqueeze(0), dim=-1) / temperature
        torch.testing.assert_close(logits[t], expected, rtol=1e-10, atol=1e-10)
    assert ("temperature.log_value" in dict(model.named_parameters())) == learn
    assert model.temperature.value == pytest.approx(0.2)
    if learn:
        model.meta_loss(batch).backward()
        assert model.temperature.log_value.grad is not None and model.temperature.log_value.grad != 0


def test_protonet_default_temperatures_and_bad_arguments() -> None:
    assert ProtoNet(TinyEmbedding()).temperature.value == pytest.approx(1.0)
    assert ProtoNet(TinyEmbedding(), distance="cosine").temperature.value == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="distance"):
        ProtoNet(TinyEmbedding(), distance="manhattan")
    with pytest.raises(ConfigError, match="temperature"):
        ProtoNet(TinyEmbedding(), temperature=0.0)
    with pytest.raises(ConfigError, match="out_features: null"):
        ProtoNet(Conv4(out_features=5))


def test_protonet_conv4_omniglot_embedding_and_wider_training_episodes() -> None:
    backbone = Conv4(in_channels=1, hidden=64, out_features=None, pool="max", image_size=28)
    assert backbone.embedding_dim == 64
    model = ProtoNet(backbone)
    wide = random_batch(tasks=1, ways=12, shots=1, queries=2, features=1, dtype=torch.float32)
    wide = TaskBatch(torch.rand(1, 12, 1, 28, 28), wide.support_y, torch.rand(1, 24, 1, 28, 28), wide.query_y)
    narrow = TaskBatch(wide.support_x[:, :5], wide.support_y[:, :5], wide.query_x[:, :10], wide.query_y[:, :10] % 5)
    assert model.task_outputs(wide, training=True)[1].shape == (1, 24, 12)  # training: 12-way
    assert model.task_outputs(narrow, training=False)[1].shape == (1, 10, 5)  # evaluation: 5-way


def test_task_step_outside_vmap_reads_the_ways_from_the_labels() -> None:
    model = ProtoNet(TinyEmbedding()).double()
    batch = random_batch()
    _, logits = model.task_step(batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0], training=False)
    torch.testing.assert_close(logits, model.task_outputs(batch, training=False)[1][0])


def test_regression_batches_are_rejected() -> None:
    batch = TaskBatch(torch.randn(2, 5, 12), torch.randn(2, 5), torch.randn(2, 5, 12), torch.randn(2, 5))
    with pytest.raises(ConfigError, match="classification"):
        ProtoNet(TinyEmbedding()).meta_loss(batch)


# ------------------------------------------------------------------------------------------------------ MatchingNet
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_matchingnet_attention_is_a_softmax_over_cosines_and_predicts_the_weighted_labels(temperature: float) -> None:
    model = MatchingNet(TinyEmbedding(), temperature=temperature).double()
    batch = random_batch()
    objectives, log_probs = model.task_outputs(batch, training=True)
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        z = model.backbone(torch.cat([sx, qx]))
        zs, zq = z[: len(sx)], z[len(sx) :]
        cosines = torch.stack([torch.stack([q @ s / (q.norm() * s.norm()) for s in zs]) for q in zq])
        expected_attention = torch.softmax(cosines / temperature, dim=-1)
        attention = model.attention(sx, qx)
        torch.testing.assert_close(attention.sum(-1), torch.ones(len(qx), dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(attention, expected_attention, rtol=1e-10, atol=1e-12)
        probabilities = expected_attention @ F.one_hot(sy, 4).double()
        torch.testing.assert_close(log_probs[t], probabilities.log(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(objectives[t], F.nll_loss(probabilities.log(), qy), rtol=1e-10, atol=1e-10)


def test_fce_support_lstm_equals_torch_bidirectional_lstm() -> None:
    model = MatchingNet(TinyEmbedding(), fce=True).double()
    fce, dim = model.fce, 8
    lstm = nn.LSTM(dim, dim, bidirectional=True).double()
    with torch.no_grad():
        for suffix, cell in (("", fce.support_forward), ("_reverse", fce.support_backward)):
            getattr(lstm, f"weight_ih_l0{suffix}").copy_(cell.weight_ih)
            getattr(lstm, f"weight_hh_l0{suffix}").copy_(cell.weight_hh)
            getattr(lstm, f"bias_ih_l0{suffix}").copy_(cell.bias)
            getattr(lstm, f"bias_hh_l0{suffix}").zero_()
    z = torch.randn(7, dim, dtype=torch.float64)
    out, _ = lstm(z.unsqueeze(1))  # [S, 1, 2D]: forward and backward hidden states
    expected = out[:, 0, :dim] + out[:, 0, dim:] + z
    torch.testing.assert_close(fce.support(z), expected, rtol=1e-10, atol=1e-12)


def test_fce_attention_lstm_equals_a_reference_built_on_torch_lstm_cell() -> None:
    model = MatchingNet(TinyEmbedding(), fce=True, fce_steps=3).double()
    cell, dim = model.fce.query_lstm, 8
    # LSTM(x, [h, r], c) == LSTMCell(input=[x, h, r], hidden=0, c) with the recurrent weights folded into the input.
    torch_cell = nn.LSTMCell(3 * dim, dim).double()
    with torch.no_grad():
        torch_cell.weight_ih.copy_(torch.cat([cell.weight_ih, cell.weight_hh], dim=1))
        torch_cell.bias_ih.copy_(cell.bias)
        torch_cell.weight_hh.zero_()
        torch_cell.bias_hh.zero_()
    zq, g = torch.randn(5, dim, dtype=torch.float64), torch.randn(6, dim, dtype=torch.float64)
    h, c = zq, torch.zeros_like(zq)
    for _ in range(3):
        read = torch.stack([sum(a * gi for a, gi in zip(torch.softmax(g @ hq, 0), g)) for hq in h])
        h_hat, c = torch_cell(torch.cat([zq, h, read], dim=1), (torch.zeros_like(zq), c))
        h = h_hat + zq
    torch.testing.assert_close(model.fce.query(zq, g), h, rtol=1e-10, atol=1e-12)


def test_fce_runs_under_vmap_and_its_gradient_reaches_every_lstm_parameter() -> None:
    batch = random_batch()
    results = []
    for vectorize in (True, False):
        torch.manual_seed(3)
        model = MatchingNet(TinyEmbedding(), fce=True, fce_steps=2, vectorize=vectorize).double()
        loss = model.meta_loss(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        lstm_params = dict(model.fce.named_parameters())
        assert len(lstm_params) == 9  # 3 cells x (weight_ih, weight_hh, bias)
        for name, p in lstm_params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    (loss_v, grads_v), (loss_l, grads_l) = results
    torch.testing.assert_close(loss_v, loss_l, rtol=1e-10, atol=1e-12)
    for name in grads_v:
        torch.testing.assert_close(grads_v[name], grads_l[name], rtol=1e-8, atol=1e-10)


def test_fce_needs_the_embedding_size() -> None:
    class NoDim(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x

    with pytest.raises(ConfigError, match="embedding_dim"):
        MatchingNet(NoDim(), fce=True)
    assert MatchingNet(NoDim(), fce=True, embedding_dim=12).fce is not None


# ------------------------------------------------------------------------------------------ DDP: no unused parameter
@pytest.mark.parametrize(
    "make",
    [
        lambda: ProtoNet(TinyEmbedding()),
        lambda: ProtoNet(TinyEmbedding(), distance="cosine", learn_temperature=True),
        lambda: MatchingNet(TinyEmbedding()),
        lambda: MatchingNet(TinyEmbedding(), fce=True, learn_temperature=True),
        lambda: MetaBGD(TinyEmbedding(), inner_steps=1),
        lambda: MetaBGD(TinyEmbedding(), inner_steps=1, first_order=True, learn_inner_lr=True, set_context=False),
        lambda: MetaBGD(TinyEmbedding(), inner_steps=1, film=True),
        lambda: MetaBGD(TinyEmbedding(), inner_steps=1, generator="prototype"),
    ],
    ids=["proto", "proto-cosine-learned", "matching", "matching-fce", "metabgd", "metabgd-fo-lr", "metabgd-film", "metabgd-prototype"],
)
def test_every_parameter_receives_a_gradient_in_every_step(make) -> None:
    # So DDP runs with find_unused_parameters=False (the default strategy) for every configuration.
    model = make()
    model.meta_loss(random_batch(dtype=torch.float32)).backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused


# ------------------------------------------------------------------------------------------------- short training
@pytest.mark.parametrize(
    "make",
    [lambda: ProtoNet(TinyEmbedding(32, 32, 16)), lambda: MatchingNet(TinyEmbedding(32, 32, 16))],
    ids=["protonet", "matchingnet"],
)
def test_short_training_learns_above_chance(make, tmp_path) -> None:
    # 10-way training episodes, 5-way evaluation: training and test shapes are independent.
    data = GaussianClasses(ways=5, shots=1, queries=5, train_ways=10, meta_batch_size=8, train_batches=120, val_episodes=16, test_episodes=200, eval_meta_batch_size=100)
    torch.manual_seed(0)
    model = make()
    model.optimizer = lambda params: torch.optim.Adam(params, lr=3e-3)
    run = trainer(limit_val_batches=1)
    before = run.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    run.fit(model, datamodule=data)
    result = run.test(model, datamodule=data, verbose=False)[0]
    assert result["test/acc"] > 0.4 > 0.2 + 3 * result["test/acc_ci95"]  # chance is 0.2
    assert result["test/acc"] > before + 0.15
    # The checkpoint restores the trained model (the test backbone is not a recorded Backbone: pass it again).
    path = tmp_path / "model.ckpt"
    run.save_checkpoint(path)
    restored = type(model).load_from_checkpoint(path, backbone=TinyEmbedding(32, 32, 16))
    batch = next(iter(data.test_dataloader()))
    torch.testing.assert_close(restored.task_outputs(batch, training=False)[1], model.task_outputs(batch, training=False)[1])


def test_matchingnet_fce_short_training_learns_above_chance() -> None:
    data = GaussianClasses(ways=5, shots=1, queries=5, train_ways=10, meta_batch_size=8, train_batches=120, val_episodes=8, test_episodes=200, eval_meta_batch_size=100)
    torch.manual_seed(0)
    model = MatchingNet(TinyEmbedding(32, 32, 16), fce=True, fce_steps=2, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    run = trainer(limit_val_batches=0)
    run.fit(model, datamodule=data)
    result = run.test(model, datamodule=data, verbose=False)[0]
    assert result["test/acc"] > 0.4 > 0.2 + 3 * result["test/acc_ci95"]
    assert not math.isnan(result["test/loss"])


# ------------------------------------------------------------------------------------------------------ real data
def test_protonet_learns_on_real_omniglot_and_runs_on_lake_runs(omniglot_root) -> None:
    from datamodules import OmniglotDataModule

    root = omniglot_root
    data = OmniglotDataModule(root=root, ways=5, shots=1, queries=5, train_ways=10, train_queries=5, meta_batch_size=1, train_batches=40, val_episodes=10, test_episodes=100, eval_meta_batch_size=50)
    torch.manual_seed(0)
    model = ProtoNet(Conv4(hidden=16, out_features=None), vectorize=False, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    run = trainer(limit_val_batches=0)
    before = run.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    run.fit(model, datamodule=data)
    after = run.test(model, datamodule=data, verbose=False)[0]
    assert after["test/acc"] > before + 0.1  # 0.42 -> 0.70 here
    with pytest.warns(UserWarning, match="Lake's runs"):  # the Vinyals split overlaps the runs' characters
        runs = OmniglotDataModule(root=root, ways=20, test_set="lake_runs", eval_meta_batch_size=20)
    lake = run.test(model, datamodule=runs, verbose=False)[0]
    assert lake["test/acc"] > 0.05 + 3 * lake["test/acc_ci95"]  # 20-way: chance is 0.05


# --------------------------------------------------------------------------------------------------------- configs
CONFIGS = sorted(
    p for pattern in ("*protonet*.yaml", "*matchingnet*.yaml", "*metabgd*.yaml") for p in (REPO / "configs").glob(pattern)
)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_model_and_data_and_cites_the_paper(path) -> None:
    from lit_meta.cli import MetaCLI

    text = path.read_text()
    assert "Published:" in text or "No published number" in text
    cli = MetaCLI(args=["--config", str(path), "--trainer.logger", "false"], run=False)
    model, data = cli.model, cli.datamodule
    expected = {"protonet": ProtoNet, "matchingnet": MatchingNet, "metabgd": MetaBGD}
    assert type(model) is next(cls for key, cls in expected.items() if key in path.stem)
    ways, shots = (int(s) for s in re.search(r"_(\d+)w(\d+)s(?:_|$)", path.stem).groups())
    assert (data.ways, data.shots, data.train_shots) == (ways, shots, shots)
    if isinstance(model, ProtoNet):
        assert data.train_ways > data.ways  # Snell et al.: wider training episodes
    assert model.backbone.head is None
    # The embedding has the size the config's comment claims.
    assert f"# {model.backbone.embedding_dim}-d embeddings" in text
