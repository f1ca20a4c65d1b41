"""Mixed precision on CPU: fp16 inner-loop loss scaling, the fp32 inner loop, clipping after unscaling, skipping
non-finite steps, and every algorithm under ``bf16-mixed`` and ``16-mixed``.

On CPU Lightning turns ``precision="16-mixed"`` into bf16, so the fp16 tests pass an explicit
``MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))`` plugin: real float16 autocast with a GradScaler,
the same code path as ``16-mixed`` on a GPU.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn

import lit_meta.algorithms.maml as maml_module
from lit_meta import adaptation
from datamodules import EpisodicDataModule, SinusoidDataModule, TaskBatch
from lit_meta import MAML, SinusoidMLP

FP16_SMALLEST = 2.0**-24  # float16's smallest subnormal: anything below half of it rounds to zero


def _load_scenarios():
    path = Path(__file__).with_name("ddp_scenarios.py")
    if "ddp_scenarios" in sys.modules:
        return sys.modules["ddp_scenarios"]
    spec = importlib.util.spec_from_file_location("ddp_scenarios", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ddp_scenarios"] = module
    spec.loader.exec_module(module)
    return module


scenarios = _load_scenarios()  # the tiny models and datamodules of every algorithm


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a 2-core machine: intra-op threads cost more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fp16_plugin(init_scale: float = 2.0**16) -> MixedPrecision:
    """Real fp16 autocast with a GradScaler on CPU (``precision="16-mixed"`` would become bf16 there)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def make_trainer(precision: str, max_steps: int, callbacks: list[Callback] | None = None, init_scale: float = 2.0**16, **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU trainer; ``precision="16-mixed"`` means real fp16 (explicit plugin)."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
    )
    if precision == "16-mixed":
        options["plugins"] = [fp16_plugin(init_scale)]
    else:
        options["precision"] = precision
    options.update(kwargs)
    return pl.Trainer(**options)


# ------------------------------------------------------------------------------------------ fp16 inner gradients


class ConfidentTasks(EpisodicDataModule):
    """2-way 1-shot tasks that a near-identity linear classifier already solves with a logit margin of ~20.

    The support loss's gradient is then ~1e-8 per weight: non-zero in float32, below float16's smallest subnormal
    (6e-8), so an unscaled fp16 inner loop sees exactly zero.
    """

    def sample_task(self, split: str, generator: torch.Generator):
        x = torch.tensor([[10.0, -10.0], [-10.0, 10.0]]) + 0.1 * torch.rand(2, 2, generator=generator)
        y = torch.tensor([0, 1])
        return x, y, x.clone(), y.clone()


def confident_model(**kwargs: Any) -> MAML:
    backbone = nn.Linear(2, 2)
    with torch.no_grad():
        backbone.weight.copy_(torch.eye(2))
        backbone.bias.zero_()
    return MAML(backbone, inner_lr=0.1, inner_steps=1, vectorize=False, optimizer=lambda p: torch.optim.SGD(p, lr=0.0), **kwargs)


def record_inner_gradients(monkeypatch) -> list[dict[str, Any]]:
    """Patch MAML's ``adapt`` to record each inner step's (unscaled) gradients and the loss scale it was given.

    The recording update is exactly the SGD step ``adapt`` takes by default, so the run itself is unchanged.
    """
    records: list[dict[str, Any]] = []
    real_adapt = adaptation.adapt

    def recording_adapt(*args: Any, **kwargs: Any):
        lr = kwargs["step_size"]

        def sgd_and_record(step: int, params: dict[str, Tensor], grads: dict[str, Tensor]) -> dict[str, Tensor]:
            records.append({"loss_scale": kwargs.get("loss_scale", 1.0), "grads": {k: g.detach().clone() for k, g in grads.items()}})
            return {k: params[k] - lr * grads[k] for k in params}

        return real_adapt(*args, **{**kwargs, "update": sgd_and_record})

    monkeypatch.setattr(maml_module, "adapt", recording_adapt)
    return records


def inner_gradients(monkeypatch, precision: str, **model_kwargs: Any) -> list[dict[str, Any]]:
    """The inner gradients of one training step of the confident-task MAML at ``precision``."""
    records = record_inner_gradients(monkeypatch)
    dm = ConfidentTasks(ways=2, shots=1, queries=1, meta_batch_size=2, train_batches=1)
    make_trainer(precision, max_steps=1).fit(confident_model(**model_kwargs), dm)
    assert len(records) == 2  # one inner step for each of the two tasks
    return records


def test_fp16_inner_gradients_are_scaled_and_do_not_underflow(monkeypatch):
    fp32 = inner_gradients(monkeypatch, "32-true")
    for record in fp32:
        for g in record["grads"].values():
            # Non-zero in float32, but too small for float16: the construction underflows unscaled.
            assert (g.abs() > 0).all() and g.abs().max() < FP16_SMALLEST / 2

    fp16 = inner_gradients(monkeypatch, "16-mixed")
    for record, expected in zip(fp16, fp32):
        assert record["loss_scale"] == 2.0**16, "the inner loop must use the GradScaler's scale"
        for key, g in record["grads"].items():
            assert (g.abs() > 0).all(), f"{key} underflowed"
            assert torch.allclose(g, expected["grads"][key], rtol=1e-2, atol=0), key

    # Control: the same fp16 step without inner loss scaling loses every inner gradient.
    monkeypatch.setattr(MAML, "inner_loss_scale", lambda self: 1.0)
    unscaled = inner_gradients(monkeypatch, "16-mixed")
    for record in unscaled:
        for g in record["grads"].values():
            assert torch.equal(g, torch.zeros_like(g))
    monkeypatch.undo()


def test_fp32_inner_loop_under_fp16(monkeypatch):
    fp32 = inner_gradients(monkeypatch, "32-true")
    mixed = inner_gradients(monkeypatch, "16-mixed", inner_loop_fp32=True)
    for record, expected in zip(mixed, fp32):
        assert record["loss_scale"] == 2.0**16  # passed along, but an fp32 inner loop needs no scaling
        for key, g in record["grads"].items():
            # Autocast off in the inner loop, forward and backward: the float32 values, not an fp16 approximation.
            assert torch.allclose(g, expected["grads"][key], rtol=1e-6, atol=0), key


# ------------------------------------------------------------------------------------------------ clipping


class GradientProbe(Callback):
    """Records the gradients a callback sees before the optimizer step: unscaled, not yet clipped."""

    def __init__(self) -> None:
        self.grads: list[Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(torch.cat([p.grad.detach().flatten().clone() for p in pl_module.parameters()]))


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_clipping_acts_on_unscaled_gradients(precision):
    clip = 1e-3
    results = {}
    for name, options in (("reference", dict(precision="32-true", clip=None)), ("run", dict(precision=precision, clip=clip))):
        torch.manual_seed(0)
        model = MAML(SinusoidMLP(hidden=(8, 8)), inner_steps=1, grad_clip_norm=options["clip"], optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
        before = flat_params(model)
        probe = GradientProbe()
        dm = SinusoidDataModule(shots=5, queries=5, meta_batch_size=4, train_batches=1)
        make_trainer(options["precision"], max_steps=1, callbacks=[probe], init_scale=2.0**8).fit(model, dm)
        assert model.skipped_steps == 0
        results[name] = (probe.grads[0], before - flat_params(model))
    grad_fp32, _ = results["reference"]
    grad, update = results["run"]
    assert grad_fp32.norm() > 10 * clip  # the clipping is active
    # The hooks saw unscaled gradients (for fp16: ~2^8 times too large otherwise) ...
    assert torch.allclose(grad.norm(), grad_fp32.norm(), rtol=2e-2)
    # ... and the step (SGD, lr=1) is the clipped unscaled gradient: norm `clip`, direction of the true gradient.
    # Clipping the scaled fp16 gradient would have given a step of clip / 2^8.
    assert update.norm() == pytest.approx(clip, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(update, grad_fp32, dim=0) > 0.999


# ------------------------------------------------------------------------------------------- non-finite steps


class InjectNonFinite(MAML):
    """MAML whose meta-loss is infinite at training call ``bad_call`` (a stand-in for an overflow)."""

    def __init__(self, *args: Any, bad_call: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bad_call, self.calls = bad_call, 0

    def task_outputs(self, batch: TaskBatch, training: bool):
        objectives, predictions = super().task_outputs(batch, training)
        if training:
            if self.calls == self.bad_call:
                objectives = objectives * float("inf")
            self.calls += 1
        return objectives, predictions


class StateRecorder(Callback):
    """Parameters and optimizer state after every training step."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.optimizer: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params.append(flat_params(pl_module))
        self.optimizer.append(copy.deepcopy(trainer.optimizers[0].state_dict()["state"]))


def assert_same_state(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> None:
    assert a.keys() == b.keys()
    for index in a:
        for key, value in a[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[index][key])), (index, key)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_nonfinite_meta_gradient_skips_the_step(precision):
    torch.manual_seed(0)
    model = InjectNonFinite(SinusoidMLP(hidden=(8, 8)), inner_steps=1, grad_clip_norm=10.0)  # Adam
    recorder = StateRecorder()
    trainer = make_trainer(precision, max_steps=3, callbacks=[recorder], init_scale=2.0**8)
    dm = SinusoidDataModule(shots=5, queries=5, meta_batch_size=4, train_batches=5)
    with pytest.warns(UserWarning, match="non-finite meta-gradient at step 1: optimizer step skipped"):
        trainer.fit(model, dm)
    assert model.skipped_steps == 1
    assert trainer.global_step == 3  # the skipped step counts, as GradScaler's skips do
    before, at, after = recorder.params
    assert torch.equal(before, at), "the weights changed in the skipped step"
    assert_same_state(recorder.optimizer[0], recorder.optimizer[1])  # Adam's moments and step count too
    assert not torch.equal(at, after) and torch.isfinite(after).all()
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler.get_scale() == 2.0**7  # backed off once


# ---------------------------------------------------------------------------------------- every algorithm


INNER_LOOP = ["maml", "mamlpp", "anil", "metasgd", "reptile", "metabgd"]
CASES = [(name, precision, False) for name in scenarios.ALGORITHMS for precision in ("bf16-mixed", "16-mixed")]
CASES += [(name, precision, True) for name in INNER_LOOP for precision in ("bf16-mixed", "16-mixed")]


@pytest.mark.parametrize("name, precision, inner_fp32", CASES, ids=[f"{n}-{p}{'-fp32inner' if f else ''}" for n, p, f in CASES])
def test_every_algorithm_trains_and_evaluates_in_mixed_precision(name, precision, inner_fp32):
    model, dm = scenarios.build(name)
    model.inner_loop_fp32 = inner_fp32
    before = flat_params(model)
    # GradScaler's default initial scale (2^16): its first steps may overflow and be skipped, as on a GPU.
    trainer = make_trainer(precision, max_steps=6, limit_val_batches=1.0)
    trainer.fit(model, dm)
    after = flat_params(model)
    assert torch.isfinite(after).all()
    assert model.skipped_steps < 6 and not torch.equal(before, after), "no step was taken"
    metrics = trainer.validate(model, dm, verbose=False)[0]
    assert metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), {k: v for k, v in metrics.items() if not torch.isfinite(torch.tensor(v))}
