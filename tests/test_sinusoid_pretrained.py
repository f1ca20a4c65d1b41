"""Pre-training on all tasks (MAML with ``inner_steps: 0``), Finn et al.'s "pretrained" sinusoid baseline.

* Training optimises the regression loss pooled over the tasks of a batch: one SGD step equals a hand computation.
* Test-time fine-tuning is plain SGD on the K support points: per-task MSE equals an independent loop of ``k`` steps.
* ``configs/sinusoid_pretrained.yaml`` is the paper's baseline; options that need training inner steps are refused.

The references use plain ``torch.autograd`` in float64, never :mod:`lit_meta.adaptation`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from datamodules import SinusoidDataModule, TaskBatch
from datamodules.errors import ConfigError
from lit_meta import ANIL, MAML, MetaSGD, Reptile, SinusoidMLP

from conftest import cpu_trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sinusoid_pretrained.yaml"
STEP_SIZE = 0.01  # Finn et al.'s fine-tuning step size of the baseline for K = 5 (Fig. 2 and 3)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available|LitLogger|TPU available|LeafSpec|precision).*")
        yield


def double(batch: TaskBatch) -> TaskBatch:
    return TaskBatch(batch.support_x.double(), batch.support_y.double(), batch.query_x.double(), batch.query_y.double())


def first_batch(split: str, **kwargs) -> TaskBatch:
    dm = SinusoidDataModule(**kwargs)
    dm.setup("fit" if split == "train" else split)
    loader = dm.train_dataloader() if split == "train" else dm.test_dataloader()
    return next(iter(loader))


def reference_finetuned_mse(net: torch.nn.Module, batch: TaskBatch, steps: int, lr: float) -> torch.Tensor:
    """Per-task query MSE after ``steps`` SGD steps of ``lr`` on the task's support MSE, one task at a time."""
    values = []
    for t in range(batch.num_tasks):
        params = {n: p.detach().clone() for n, p in net.named_parameters()}
        for _ in range(steps):
            params = {n: p.requires_grad_() for n, p in params.items()}
            loss = F.mse_loss(functional_call(net, params, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads)}
        with torch.no_grad():
            values.append(F.mse_loss(functional_call(net, params, (batch.query_x[t],)), batch.query_y[t]))
    return torch.stack(values)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("steps", [1, 5, 10])
def test_finetuning_is_plain_sgd_on_the_support_points(steps, vectorize):
    batch = double(first_batch("test", shots=5, queries=20, test_episodes=6, eval_meta_batch_size=6))
    torch.manual_seed(0)
    model = MAML(SinusoidMLP(), inner_lr=STEP_SIZE, inner_steps=0, eval_inner_steps=steps, vectorize=vectorize).double()
    values = model.episode_metrics(batch)
    expected = reference_finetuned_mse(model.backbone, batch, steps, STEP_SIZE)
    torch.testing.assert_close(values["mse"], expected, rtol=1e-10, atol=1e-12)
    # The steps really move the prediction, so the comparison above is not of two unadapted networks.
    before = reference_finetuned_mse(model.backbone, batch, 0, STEP_SIZE)
    torch.testing.assert_close(values["mse_pre"], before, rtol=1e-10, atol=1e-12)
    assert (expected - before).abs().min() > 1e-4


def sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


@pytest.mark.parametrize("vectorize", [True, False])
def test_training_without_inner_steps_optimises_the_pooled_regression_loss(vectorize):
    """One SGD step of ``inner_steps: 0`` moves the weights by the gradient of the MSE over every query point of the
    batch's tasks (equal counts per task, so the mean of the task losses is the pooled loss); one inner step (MAML)
    moves them elsewhere."""
    data = dict(shots=5, queries=5, train_queries=5, meta_batch_size=4, train_batches=1, val_episodes=4)
    batch = double(first_batch("train", **data))
    updated = {}
    for inner_steps in (0, 1):
        torch.manual_seed(0)
        model = MAML(SinusoidMLP(hidden=(8, 8)), inner_lr=STEP_SIZE, inner_steps=inner_steps, eval_inner_steps=1,
                     vectorize=vectorize, optimizer=sgd(0.1)).double()
        initial = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
        cpu_trainer(max_steps=1, limit_val_batches=0, precision="64-true").fit(model, SinusoidDataModule(**data))
        updated[inner_steps] = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}

    net = SinusoidMLP(hidden=(8, 8)).double()
    params = {n: p.clone().requires_grad_() for n, p in initial.items()}
    pooled = F.mse_loss(functional_call(net, params, (batch.query_x.reshape(-1, 1),)), batch.query_y.reshape(-1, 1))
    grads = torch.autograd.grad(pooled, list(params.values()))
    for (name, p), g in zip(initial.items(), grads):
        torch.testing.assert_close(updated[0][name], p - 0.1 * g, rtol=1e-10, atol=1e-12)
    assert any((updated[0][n] - updated[1][n]).abs().max() > 1e-6 for n in initial)


def test_config_is_the_papers_baseline(monkeypatch):
    """MAML without inner steps in training, SGD fine-tuning with step 0.01 at test, the MAML run's schedule and data."""
    from lit_meta.cli import MetaCLI

    monkeypatch.chdir(CONFIG.parents[1])
    cli = MetaCLI(args=["--config", str(CONFIG), "--trainer.logger", "false"], run=False)
    model, dm = cli.model, cli.datamodule
    assert type(model) is MAML and (model.inner_steps, model.eval_inner_steps, model.inner_lr) == (0, 10, STEP_SIZE)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 1e-3
    assert (dm.shots, dm.train_queries, dm.meta_batch_size, dm.queries, dm.test_episodes) == (5, 5, 25, 100, 1000)
    assert cli.trainer.max_epochs * dm.train_batches == 70_000


def test_options_that_need_training_inner_steps_are_refused():
    with pytest.raises(ConfigError, match="eval_inner_steps"):
        MAML(SinusoidMLP(), inner_steps=0)
    for option in ("multi_step_loss", "lslr"):
        with pytest.raises(ConfigError, match=option):
            MAML(SinusoidMLP(), inner_steps=0, eval_inner_steps=5, **{option: True})
    with pytest.raises(ConfigError, match="non-negative"):
        MAML(SinusoidMLP(), inner_steps=-1, eval_inner_steps=5)
    with pytest.raises(ConfigError, match="MetaSGD"):
        MetaSGD(SinusoidMLP(), inner_steps=0, eval_inner_steps=5)
    with pytest.raises(ConfigError, match="Reptile"):
        Reptile(SinusoidMLP(), inner_steps=0, eval_inner_steps=5)
    # ANIL pre-trains the whole network the same way and fine-tunes only the head at test.
    assert ANIL(SinusoidMLP(), inner_steps=0, eval_inner_steps=5).inner_steps == 0
