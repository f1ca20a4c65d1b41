"""Evaluation protocols of the normalization layers: running statistics against nn.BatchNorm, query independence,
and the protocols differing where they should."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import cpu_trainer
from datamodules.base import EpisodicDataModule
from datamodules.errors import ConfigError
from datamodules.task_batch import TaskBatch
from lit_meta import ANIL, MAML, MatchingNet, MetaSGD, ProtoNet, Reptile
from lit_meta.backbones import BatchStatNorm, Conv4
from lit_meta.normalization import PROTOCOLS, recording, update_running_statistics


def image_tasks(tasks: int = 2, ways: int = 3, shots: int = 2, queries: int = 3, size: int = 12) -> TaskBatch:
    g = torch.Generator().manual_seed(7)

    def draw(n: int) -> Tensor:
        return torch.rand(tasks, ways * n, 1, size, size, generator=g)

    labels = lambda n: torch.arange(ways).repeat_interleave(n).expand(tasks, -1).clone()  # noqa: E731
    return TaskBatch(draw(shots), labels(shots), draw(queries), labels(queries))


def conv(out_features: int | None = 3, fused: bool = False) -> Conv4:
    return Conv4(in_channels=1, hidden=8, out_features=out_features, image_size=12, blocks=2, fused_norm=fused)


def algorithms(vectorize: bool, normalization: str) -> dict[str, nn.Module]:
    common = dict(vectorize=vectorize, normalization=normalization)
    return {
        "maml": MAML(conv(), inner_lr=0.3, inner_steps=2, **common),
        "metasgd": MetaSGD(conv(), inner_lr=0.3, inner_steps=1, **common),
        "anil": ANIL(conv(), inner_lr=0.3, inner_steps=2, **common),
        "reptile": Reptile(conv(), inner_lr=0.3, inner_steps=2, inner_optimizer="sgd", **common),
        "protonet": ProtoNet(conv(None), **common),
        "matchingnet": MatchingNet(conv(None), **common),
    }


NAMES = list(algorithms(True, "transductive"))


def build(name: str, vectorize: bool = True, normalization: str = "transductive") -> nn.Module:
    torch.manual_seed(0)
    return algorithms(vectorize, normalization)[name]


def trained(name: str, steps: int = 3) -> nn.Module:
    """A model after a few meta-steps (plain SGD on ``meta_loss``, running statistics updated as in training_step)."""
    model = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        with recording() as scope:
            model.meta_loss(image_tasks()).backward()
        update_running_statistics(scope.modules, scope.tensors)
        opt.step()
    return model


def evaluate(model: nn.Module, batch: TaskBatch, protocol: str) -> Tensor:
    model.normalization = protocol
    with torch.enable_grad():
        return model.task_outputs(batch, training=False)[1].detach()


def test_running_statistics_follow_nn_batchnorm():
    """One ProtoNet step: each layer's running mean/var equal nn.BatchNorm2d's after one train-mode forward of the
    same input (momentum 0.1, unbiased variance), for the plain and the fused norm."""
    batch = image_tasks(tasks=1)
    for fused in (False, True):
        torch.manual_seed(0)
        model = ProtoNet(conv(None, fused=fused), vectorize=True)
        before = copy.deepcopy(model.backbone)
        with recording() as scope:
            model.meta_loss(batch)
        update_running_statistics(scope.modules, scope.tensors)
        x = torch.cat([batch.support_x[0], batch.query_x[0]])
        for block, trained_block in zip(before.features, model.backbone.features):
            reference = nn.BatchNorm2d(8, momentum=0.1, eps=block[1].eps)
            h = block[0](x)
            reference.train()(h)
            torch.testing.assert_close(trained_block[1].running_mean, reference.running_mean)
            torch.testing.assert_close(trained_block[1].running_var, reference.running_var)
            assert int(trained_block[1].num_batches_tracked) == 1
            x = block[3](block[2](block[1](h)))


@pytest.mark.parametrize("name", ["maml", "reptile", "anil"])
def test_running_statistics_same_vectorized_and_looped(name):
    """Statistics recorded inside vmap and torch.func.grad (the inner loop) equal the per-task loop's, and every
    training pass is recorded: MAML's and Reptile's two inner steps and the query pass, ANIL's support and query."""
    results = []
    for vectorize in (True, False):
        model = build(name, vectorize)
        with recording() as scope:
            model.meta_loss(image_tasks())
        update_running_statistics(scope.modules, scope.tensors)
        results.append([b.clone() for n, b in model.named_buffers() if "running" in n])
        calls = len(scope.modules)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    layers = sum(isinstance(m, BatchStatNorm) for m in model.modules())
    passes = {"maml": 3, "reptile": 3, "anil": 2}[name]
    assert calls == layers * passes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("protocol", ["support", "per_query", "running"])
def test_non_transductive_predictions_do_not_depend_on_other_queries(name, protocol):
    """Under support, per_query and running a query's prediction is the same alone or among the others."""
    model = trained(name)
    batch = image_tasks()
    together = evaluate(model, batch, protocol)
    for i in (0, 4):
        alone = TaskBatch(batch.support_x, batch.support_y, batch.query_x[:, i : i + 1], batch.query_y[:, i : i + 1])
        torch.testing.assert_close(evaluate(model, alone, protocol)[:, 0], together[:, i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_protocols_differ_where_they_should(name):
    """Transductive predictions depend on the other queries; the four protocols give four different predictions;
    vectorized equals looped under each."""
    model = trained(name)
    batch = image_tasks()
    outputs = {p: evaluate(model, batch, p) for p in PROTOCOLS}
    alone = TaskBatch(batch.support_x, batch.support_y, batch.query_x[:, :1], batch.query_y[:, :1])
    assert not torch.allclose(evaluate(model, alone, "transductive")[:, 0], outputs["transductive"][:, 0], atol=1e-4)
    for a in PROTOCOLS:
        for b in PROTOCOLS:
            if a < b:
                assert not torch.allclose(outputs[a], outputs[b], atol=1e-4), (a, b)
    looped = copy.deepcopy(model)
    looped.vectorize = False
    for p in PROTOCOLS:
        torch.testing.assert_close(evaluate(looped, batch, p), outputs[p], atol=1e-5, rtol=1e-5)


def test_support_protocol_equals_reference():
    """MAML under support: adapt on the support set, then normalize every query with the support set's statistics
    at every layer (computed here by running the support set and reading its statistics with hooks)."""
    model = trained("maml")
    batch = image_tasks(tasks=1)
    predictions = evaluate(model, batch, "support")[0]
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    trajectory, context = model.adapt_task(sx, sy, training=False)
    net = copy.deepcopy(model.backbone)
    net.load_state_dict({**context, **trajectory[-1]})
    # Replace each norm by nn.BatchNorm2d in eval mode holding the support set's (biased) statistics at that layer.
    h = sx
    for block in net.features:
        h = block[0](h)
        norm = block[1]
        var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0)
        fixed = nn.BatchNorm2d(h.shape[1], eps=norm.eps).eval()
        fixed.load_state_dict({"weight": norm.weight, "bias": norm.bias, "running_mean": mean, "running_var": var, "num_batches_tracked": torch.tensor(0)})
        block[1] = fixed
        h = block[3](block[2](fixed(h)))
    torch.testing.assert_close(net(qx).detach(), predictions, atol=1e-5, rtol=1e-5)


def test_running_protocol_uses_running_statistics_everywhere():
    """MAML under running: the same as nn.BatchNorm2d in eval mode with the recorded statistics, for the inner
    loop (a per-task SGD reference) and the query pass."""
    model = trained("maml")
    batch = image_tasks(tasks=1)
    predictions = evaluate(model, batch, "running")[0]
    net = copy.deepcopy(model.backbone)
    for block in net.features:
        norm = block[1]
        fixed = nn.BatchNorm2d(norm.weight.numel(), eps=norm.eps).eval()
        fixed.load_state_dict({"weight": norm.weight, "bias": norm.bias, "running_mean": norm.running_mean, "running_var": norm.running_var, "num_batches_tracked": torch.tensor(1)})
        block[1] = fixed
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(batch.support_x[0]), batch.support_y[0]).backward()
        opt.step()
    torch.testing.assert_close(net(batch.query_x[0]).detach(), predictions, atol=1e-5, rtol=1e-5)


def test_running_protocol_refuses_a_checkpoint_without_statistics(tmp_path):
    """A checkpoint whose norm layers never recorded statistics loads, evaluates under the other protocols, and is
    refused under running with a one-line error naming the fix."""
    model = build("protonet")
    state = {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    checkpoint = {"state_dict": state}
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    evaluate(model, image_tasks(), "support")
    with pytest.raises(ConfigError, match="no running normalization statistics.*normalization: transductive"):
        evaluate(model, image_tasks(), "running")


def test_unknown_protocol_is_one_line_error():
    with pytest.raises(ConfigError, match="normalization must be one of"):
        ProtoNet(conv(None), normalization="eval")


def test_prediction_is_not_transductive_by_default():
    """adapt() on a model evaluated transductively predicts with support statistics: one image alone or with others
    gets the same probabilities; transductive is there when asked."""
    model = trained("maml")
    batch = image_tasks(tasks=1)
    adapted = model.adapt(batch.support_x[0], batch.support_y[0])
    together = adapted(batch.query_x[0])
    torch.testing.assert_close(adapted(batch.query_x[0, :1])[0], together[0], atol=1e-6, rtol=1e-5)
    transductive = model.adapt(batch.support_x[0], batch.support_y[0], normalization="transductive")
    assert not torch.allclose(transductive(batch.query_x[0, :1])[0], transductive(batch.query_x[0])[0], atol=1e-4)
    assert model.normalization == "transductive"  # prediction leaves the evaluation protocol alone


class Blobs(EpisodicDataModule):
    """3-way tasks of Gaussian blobs in 12 dimensions (new means every task)."""

    def sample_task(self, split: str, generator: torch.Generator):
        shape = self.shape(split)
        n = shape.shots + shape.queries
        x = 2.0 * torch.randn(shape.ways, 1, 12, generator=generator) + torch.randn(shape.ways, n, 12, generator=generator)
        y = torch.arange(shape.ways).unsqueeze(1).expand(-1, n)
        s = shape.shots
        return x[:, :s].reshape(-1, 12), y[:, :s].reshape(-1), x[:, s:].reshape(-1, 12), y[:, s:].reshape(-1)


def test_training_records_one_update_per_step_and_checkpoints_keep_it(tmp_path):
    """Through the Trainer, with the meta-batch in two chunks: one momentum update per optimizer step; the running
    statistics travel in the checkpoint, and the running protocol reads them after loading."""
    from lit_meta import MetaLearner

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), BatchStatNorm(16), nn.ReLU(), nn.Linear(16, 8))
    net.embedding_dim = 8
    model = ProtoNet(net, normalization="running", chunk_size=2)
    dm = Blobs(ways=3, shots=2, queries=3, meta_batch_size=4, train_batches=5, val_episodes=4, test_episodes=8, eval_meta_batch_size=4)
    trainer = cpu_trainer(max_steps=5, limit_val_batches=0)
    trainer.fit(model, dm)
    norm = net[1]
    assert int(norm.num_batches_tracked) == 5
    assert not torch.equal(norm.running_mean, torch.zeros(16))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = MetaLearner.load_from_checkpoint(path, backbone=copy.deepcopy(net))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(loaded.backbone[1], key), getattr(norm, key)), key
    result = cpu_trainer().test(loaded, dm, verbose=False)[0]
    assert result["test/acc"] > 0.5  # chance is 1/3
