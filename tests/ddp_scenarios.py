"""Distributed scenarios for ``tests/test_ddp.py``, run as a script under Lightning's own DDP launcher.

    python tests/ddp_scenarios.py OUT_DIR [--algorithms maml,protonet,...] [--devices 2] [--only resume,...]
    torchrun --standalone --nproc_per_node 2 tests/ddp_scenarios.py OUT_DIR     # the same under torchrun

The script is what a user's training script is: ``Trainer(strategy="ddp", devices=2, accelerator="cpu")`` makes
Lightning re-run it as rank 1 (gloo on CPU), then every ``fit``/``validate`` below runs on both ranks in the same
process group. Each rank saves what it saw to ``OUT_DIR/<scenario>_rank<r>.pt`` (a scenario that raised saves its
traceback instead); the test compares the ranks with each other and with single-process references. All scenarios
share one launch because starting the two interpreters costs far more than the tiny fits.

The model factories here are also imported by the test, which rebuilds the same models for its references.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("WANDB_MODE", "disabled")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402

import lit_meta  # noqa: E402
import lit_meta.rl  # noqa: E402
from datamodules import EpisodicDataModule, SinusoidDataModule, TaskBatch  # noqa: E402
from lit_meta import MAML, MetaLearner, SinusoidMLP  # noqa: E402
from lit_meta.backbones import BatchStatNorm  # noqa: E402
from lit_meta.callbacks import Throughput  # noqa: E402

# ------------------------------------------------------------------------------------------------ tiny models/data


class TinyEmbedding(nn.Module):
    """Linear -> BatchStatNorm -> ReLU -> Linear: an embedding network for the metric-based methods."""

    def __init__(self, in_features: int = 6, hidden: int = 12, embedding_dim: int = 5) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.net = nn.Sequential(nn.Linear(in_features, hidden), BatchStatNorm(hidden), nn.ReLU(), nn.Linear(hidden, embedding_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class WithUnused(SinusoidMLP):
    """A regression MLP with a layer that never takes part in the loss (DDP must be told about it)."""

    def __init__(self) -> None:
        super().__init__(hidden=(8, 8))
        self.unused = nn.Linear(3, 3)


class ToyClasses(EpisodicDataModule):
    """N-way tasks whose classes are Gaussian blobs in ``features`` dimensions (new means every task)."""

    def __init__(self, features: int = 6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.features = features

    def sample_task(self, split: str, generator: torch.Generator):
        shape = self.shape(split)
        means = 2.0 * torch.randn(shape.ways, 1, self.features, generator=generator)
        n = shape.shots + shape.queries
        x = means + torch.randn(shape.ways, n, self.features, generator=generator)
        y = torch.arange(shape.ways).unsqueeze(1).expand(-1, n)
        s = shape.shots
        return x[:, :s].reshape(-1, self.features), y[:, :s].reshape(-1), x[:, s:].reshape(-1, self.features), y[:, s:].reshape(-1)


def sinusoid(**overrides: Any) -> SinusoidDataModule:
    options = dict(shots=5, queries=5, meta_batch_size=3, train_batches=3, val_episodes=7, test_episodes=7, eval_meta_batch_size=3)
    options.update(overrides)
    return SinusoidDataModule(**options)


def toy_classes(**overrides: Any) -> ToyClasses:
    options = dict(ways=3, shots=2, queries=2, meta_batch_size=3, train_batches=3, val_episodes=7, test_episodes=7, eval_meta_batch_size=3)
    options.update(overrides)
    return ToyClasses(**options)


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05)


def adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


def _algorithm(name: str) -> Callable[..., MetaLearner] | None:
    """The algorithm class by name, or ``None`` where this checkout does not have it (yet)."""
    cls = getattr(lit_meta, name, None)
    if cls is not None:
        return cls
    try:
        return getattr(importlib.import_module(f"lit_meta.algorithms.{name.lower()}"), name, None)
    except ImportError:
        return None


# name -> (factory of the model, factory of the datamodule). Small enough for 2 busy CPU cores; second order
# wherever the algorithm has it. Adam outer optimizer, so that parameter equality across ranks also covers optimizer
# state.
ALGORITHMS: dict[str, tuple[Callable[[], MetaLearner], Callable[..., EpisodicDataModule]]] = {
    "maml": (lambda: MAML(SinusoidMLP(hidden=(16, 16)), inner_lr=0.01, inner_steps=2, optimizer=adam), sinusoid),
    "mamlpp": (
        lambda: MAML(SinusoidMLP(hidden=(16, 16)), inner_steps=2, multi_step_loss=True, lslr=True, optimizer=adam),
        sinusoid,
    ),
    "anil": (lambda: _algorithm("ANIL")(SinusoidMLP(hidden=(16, 16)), inner_steps=2, optimizer=adam), sinusoid),
    "metasgd": (lambda: _algorithm("MetaSGD")(SinusoidMLP(hidden=(16, 16)), inner_steps=1, optimizer=adam), sinusoid),
    "reptile": (lambda: _algorithm("Reptile")(SinusoidMLP(hidden=(16, 16)), inner_steps=2, optimizer=sgd), sinusoid),
    "protonet": (lambda: _algorithm("ProtoNet")(TinyEmbedding(), optimizer=adam), toy_classes),
    "matchingnet": (lambda: _algorithm("MatchingNet")(TinyEmbedding(), fce=True, fce_steps=2, optimizer=adam), toy_classes),
    "imaml": (lambda: _algorithm("IMAML")(SinusoidMLP(hidden=(16, 16)), inner_lr=0.05, inner_steps=3, cg_steps=3, optimizer=adam), sinusoid),
    "metabgd": (
        lambda: _algorithm("MetaBGD")(TinyEmbedding(), inner_steps=2, generator_hidden=8, learn_inner_lr=True, optimizer=adam),
        toy_classes,
    ),
}
ALGORITHM_CLASSES = {
    "maml": "MAML",
    "mamlpp": "MAML",
    "anil": "ANIL",
    "metasgd": "MetaSGD",
    "reptile": "Reptile",
    "protonet": "ProtoNet",
    "matchingnet": "MatchingNet",
    "imaml": "IMAML",
    "metabgd": "MetaBGD",
}


def available(name: str) -> bool:
    return _algorithm(ALGORITHM_CLASSES[name]) is not None


def build(name: str, seed: int = 0) -> tuple[MetaLearner, EpisodicDataModule]:
    """The model (initialized from ``seed``) and datamodule of one scenario."""
    model_fn, data_fn = ALGORITHMS[name]
    torch.manual_seed(seed)
    return model_fn(), data_fn()


def fingerprint(batch: TaskBatch) -> list[str]:
    """One short hash per task of a meta-batch (identifies a task across processes)."""
    out = []
    for t in range(batch.num_tasks):
        h = hashlib.blake2b(digest_size=8)
        for part in (batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        out.append(h.hexdigest())
    return out


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------ recording


class AllReduceLog:
    """State of :func:`counting_allreduce`: the gradient buckets DDP all-reduced since the last look."""

    def __init__(self) -> None:
        self.buckets: list[int] = []

    def take(self) -> list[int]:
        taken, self.buckets = self.buckets, []
        return taken


def counting_allreduce(state, bucket):  # no annotations: DDP rejects string ones (``from __future__ import annotations``)
    """DDP's default all-reduce, noting which bucket went: one round per step means every bucket exactly once.

    Args:
        state: an :class:`AllReduceLog`.
        bucket: a ``torch.distributed.GradBucket``; returns the all-reduce's ``torch.futures.Future``.
    """
    state.buckets.append(bucket.index())
    return default_hooks.allreduce_hook(None, bucket)


class Recorder(Callback):
    """Records, on this rank, what each training step saw and did."""

    def __init__(self, keep_batches: int = 1, allreduce: AllReduceLog | None = None) -> None:
        self.keep_batches = keep_batches
        self.allreduce_log = allreduce
        self.allreduced: list[list[int]] = []  # bucket indices all-reduced in each step
        self.initial: dict[str, Tensor] = {}
        self.batches: list[TaskBatch] = []
        self.grads: list[dict[str, Tensor | None]] = []
        self.tasks: list[tuple[int, list[str]]] = []  # (global_step, task fingerprints) per training batch
        self.params: list[dict[str, Tensor]] = []  # parameters after each step
        self.buffers: list[dict[str, Tensor]] = []  # buffers (running normalization statistics) after each step
        self.val_tasks: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        # After DDP wrapped the module, i.e. after rank 0's weights were broadcast.
        self.initial = state(pl_module)
        if self.allreduce_log is not None:
            # Lightning registers DDPStrategy(ddp_comm_hook=...) on CUDA only; gloo supports comm hooks as well.
            trainer.strategy.model.register_comm_hook(self.allreduce_log, counting_allreduce)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if len(self.batches) < self.keep_batches:
            self.batches.append(batch.to("cpu"))
        self.tasks.append((trainer.global_step, fingerprint(batch)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if len(self.grads) < self.keep_batches:
            self.grads.append({k: None if p.grad is None else p.grad.detach().cpu().clone() for k, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params.append({k: p.detach().cpu().clone() for k, p in pl_module.named_parameters()})
        self.buffers.append({k: b.detach().cpu().clone() for k, b in pl_module.named_buffers()})
        if self.allreduce_log is not None:
            self.allreduced.append(self.allreduce_log.take())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_tasks.extend(fingerprint(batch))

    def result(self) -> dict[str, Any]:
        return {
            "initial": self.initial,
            "batches": self.batches,
            "grads": self.grads,
            "tasks": self.tasks,
            "params": self.params,
            "buffers": self.buffers,
            "val_tasks": self.val_tasks,
            "allreduced": self.allreduced,
        }


def trainer(
    out: Path,
    devices: int,
    callbacks: list[Callback] | None = None,
    find_unused: bool = False,
    plugins: list[Any] | None = None,
    **overrides: Any,
) -> pl.Trainer:
    """A quiet CPU ``Trainer`` with the DDP strategy on ``devices`` processes; ``overrides`` are Trainer arguments."""
    callbacks = callbacks or []
    # A short collective timeout: if a scenario fails on one rank only, the other errors out instead of hanging.
    strategy = DDPStrategy(find_unused_parameters=find_unused, timeout=timedelta(seconds=60))
    options: dict[str, Any] = dict(
        strategy=strategy,
        devices=devices,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=out / "runs",
        plugins=plugins,
    )
    options.update(overrides)
    return pl.Trainer(**options)


# ------------------------------------------------------------------------------------------------------ scenarios


def scenario_gradient(out: Path, devices: int, name: str) -> dict[str, Any]:
    """A few steps of ``name``: step-0 batch and gradient, per-step tasks and parameters, throughput on this rank."""
    model, dm = build(name)
    log = AllReduceLog()
    recorder = Recorder(allreduce=log)
    fit_trainer = trainer(out, devices, max_steps=4, callbacks=[recorder, Throughput(window=2)])
    fit_trainer.fit(model, dm)
    return {**recorder.result(), "progress_bar": {k: float(v) for k, v in fit_trainer.progress_bar_metrics.items()}}


def scenario_chunked(out: Path, devices: int, unused: bool) -> dict[str, Any]:
    """MAML accumulating over 2 chunks of tasks (no sync but for the last); with ``unused``, on a backbone with a
    parameter outside the loss and ``find_unused_parameters=True``."""
    torch.manual_seed(0)
    model = MAML(WithUnused() if unused else SinusoidMLP(hidden=(8, 8)), inner_steps=2, optimizer=adam, chunk_size=2)
    log = AllReduceLog()
    recorder = Recorder(allreduce=log)
    fit_trainer = trainer(out, devices, max_steps=3, callbacks=[recorder], find_unused=unused)
    fit_trainer.fit(model, sinusoid(meta_batch_size=4))
    return recorder.result()


def scenario_resume(out: Path, devices: int) -> dict[str, Any]:
    """Full run of 8 steps; a run of 4 steps writing checkpoints; resumes from steps 3 (epoch end) and 4 (mid-epoch)."""
    results: dict[str, Any] = {}
    full = Recorder(keep_batches=0)
    torch.manual_seed(0)
    trainer(out, devices, max_steps=8, callbacks=[full]).fit(MAML(SinusoidMLP(hidden=(16, 16)), inner_steps=2, optimizer=adam), sinusoid())
    results["full"] = full.result()
    ckpt_dir = out / "resume_ckpt"
    first = Recorder(keep_batches=0)
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    torch.manual_seed(0)
    trainer(out, devices, max_steps=4, callbacks=[first, checkpoints]).fit(
        MAML(SinusoidMLP(hidden=(16, 16)), inner_steps=2, optimizer=adam), sinusoid()
    )
    results["first"] = first.result()
    for step in (3, 4):
        resumed = Recorder(keep_batches=0)
        # A fresh model from another seed and a disturbed global RNG: everything must come from the checkpoint.
        torch.manual_seed(1000 + step)
        model = MAML(SinusoidMLP(hidden=(16, 16)), inner_steps=2, optimizer=adam)
        trainer(out, devices, max_steps=8, callbacks=[resumed]).fit(model, sinusoid(), ckpt_path=ckpt_dir / f"step={step}.ckpt")
        results[f"resumed_{step}"] = resumed.result()
    return results


def mamlrl() -> lit_meta.rl.MAMLRL:
    """A small second-order MAML-TRPO policy on 2-D navigation (initialized from seed 0), in float64.

    With so few samples the Fisher matrix is far from full rank: under the default damping (1e-5) merely reordering
    the tasks moves the conjugate-gradient step by 1e-3 of its size, so this model damps with 1e-2, which makes the
    step a well-conditioned function of the data (reordering: 1e-10).
    """
    torch.manual_seed(0)
    policy = lit_meta.rl.GaussianMLPPolicy(hidden=(8, 8))
    return lit_meta.rl.MAMLRL(backbone=policy, horizon=6, trajectories=3, cg_damping=1e-2).double()


class TaskRecorder(Callback):
    """Records, on this rank, each meta-iteration's RL tasks (goals and rollout seeds) and the parameters after it."""

    def __init__(self) -> None:
        self.initial: dict[str, Tensor] = {}
        self.tasks: list[Any] = []
        self.params: list[dict[str, Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = state(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tasks.append(batch.to("cpu"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params.append({k: p.detach().cpu().clone() for k, p in pl_module.named_parameters()})


def scenario_mamlrl(out: Path, devices: int) -> dict[str, Any]:
    """Two TRPO meta-iterations of MAML-RL, each rank collecting trajectories of its own 2 tasks."""
    recorder = TaskRecorder()
    data = lit_meta.rl.RolloutDataModule(meta_batch_size=2, train_batches=2, val_episodes=2, test_episodes=2, eval_meta_batch_size=2)
    trainer(out, devices, max_steps=2, callbacks=[recorder], precision="64-true").fit(mamlrl(), data)
    return {"initial": recorder.initial, "tasks": recorder.tasks, "params": recorder.params}


class InjectNonFinite(MAML):
    """MAML whose meta-loss becomes non-finite on one rank at one training call (a stand-in for an overflow)."""

    def __init__(self, *args: Any, bad_call: int = 1, bad_rank: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bad_call, self.bad_rank, self.calls = bad_call, bad_rank, 0

    def task_outputs(self, batch: TaskBatch, training: bool):
        objectives, predictions = super().task_outputs(batch, training)
        if training:
            if self.calls == self.bad_call and self.global_rank == self.bad_rank:
                objectives = objectives * float("inf")
            self.calls += 1
        return objectives, predictions


def scenario_nonfinite(out: Path, devices: int, precision: str) -> dict[str, Any]:
    """An inf on rank 1 at step 1: every rank must skip that step and stay identical."""
    torch.manual_seed(0)
    model = InjectNonFinite(SinusoidMLP(hidden=(16, 16)), inner_steps=1, optimizer=adam, grad_clip_norm=1.0)
    plugins = None
    if precision == "16-mixed":
        # Lightning turns "16-mixed" into bf16 on CPU; an explicit plugin with a GradScaler keeps real fp16.
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]
    recorder = Recorder(keep_batches=0)
    kwargs = {} if plugins else {"precision": precision}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_trainer = trainer(out, devices, max_steps=4, callbacks=[recorder], plugins=plugins, **kwargs)
        fit_trainer.fit(model, sinusoid())
    result = recorder.result()
    result["skipped_steps"] = model.skipped_steps
    result["global_step"] = fit_trainer.global_step
    result["warnings"] = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    scaler = getattr(fit_trainer.precision_plugin, "scaler", None)
    result["scale"] = None if scaler is None else scaler.get_scale()
    return result


def scenario_evaluation(out: Path, devices: int, name: str) -> dict[str, Any]:
    """Validation on 7 fixed episodes shared out over the ranks (4 + 3: uneven, and a partial last batch)."""
    model, dm = build(name)
    recorder = Recorder(keep_batches=0)
    eval_trainer = trainer(out, devices, callbacks=[recorder], limit_val_batches=1.0)
    metrics = eval_trainer.validate(model, dm, verbose=False)[0]
    return {"initial": state(model), "metrics": metrics, "val_tasks": recorder.val_tasks}


# ------------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated scenario keys to run (default: all)")
    args = parser.parse_args()
    # Two ranks on a 2-core machine: intra-op threads would only fight each other.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    args.out.mkdir(parents=True, exist_ok=True)

    scenarios: list[tuple[str, Callable[[], Any]]] = []
    for name in args.algorithms.split(","):
        if available(name):
            scenarios.append((f"gradient_{name}", lambda n=name: scenario_gradient(args.out, args.devices, n)))
    scenarios += [
        ("chunked", lambda: scenario_chunked(args.out, args.devices, unused=False)),
        ("unused", lambda: scenario_chunked(args.out, args.devices, unused=True)),
        ("resume", lambda: scenario_resume(args.out, args.devices)),
        ("nonfinite_32-true", lambda: scenario_nonfinite(args.out, args.devices, "32-true")),
        ("nonfinite_bf16-mixed", lambda: scenario_nonfinite(args.out, args.devices, "bf16-mixed")),
        ("nonfinite_16-mixed", lambda: scenario_nonfinite(args.out, args.devices, "16-mixed")),
        ("evaluation_maml", lambda: scenario_evaluation(args.out, args.devices, "maml")),
        ("mamlrl", lambda: scenario_mamlrl(args.out, args.devices)),
    ]
    if available("protonet"):
        scenarios.append(("evaluation_protonet", lambda: scenario_evaluation(args.out, args.devices, "protonet")))

    if args.only:
        scenarios = [(key, run) for key, run in scenarios if key in args.only.split(",")]
    for key, run in scenarios:
        try:
            result = {"ok": True, **run()}
        except Exception:  # recorded for the test to show; the next scenario still runs
            result = {"ok": False, "error": traceback.format_exc()}
        torch.save(result, args.out / f"{key}_rank{rank_of_this_process()}.pt")


def rank_of_this_process() -> int:
    """The global rank Lightning gave this process (0 before any Trainer set it up)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


if __name__ == "__main__":
    main()
