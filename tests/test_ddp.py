"""DDP on CPU (gloo, 2 processes through Lightning's own launcher): exact meta-gradients, identical ranks, per-rank
task streams, exact resume, non-finite steps skipped on every rank, evaluation over every episode exactly once.

The distributed runs happen once per pytest run in ``tests/ddp_scenarios.py`` (``strategy="ddp"``, ``devices=2``); these
tests read what each rank recorded and compare it with single-process references computed here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from datamodules import TaskBatch
from lit_meta import MeanConfidenceInterval
from lit_meta.normalization import recording, update_running_statistics

SCRIPT = Path(__file__).with_name("ddp_scenarios.py")
WORLD = 2
# The launch (two interpreters importing Lightning) dominates; the scenarios themselves take a few seconds.
TIMEOUT_S = 400


def _load_scenarios():
    spec = importlib.util.spec_from_file_location("ddp_scenarios", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ddp_scenarios", module)
    spec.loader.exec_module(module)
    return module


scenarios = _load_scenarios()


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Callable[[str], list[dict[str, Any]]]:
    """Run every scenario under DDP once; returns ``load(key) -> [rank 0 result, rank 1 result]``."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["WANDB_MODE"] = "disabled"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--devices", str(WORLD)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        start_new_session=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        pytest.fail(f"DDP scenarios failed (exit {proc.returncode}, {elapsed:.0f} s):\n{(proc.stdout + proc.stderr)[-6000:]}")

    def load(key: str) -> list[dict[str, Any]]:
        results = []
        for rank in range(WORLD):
            path = out / f"{key}_rank{rank}.pt"
            if not path.exists():
                pytest.fail(f"{path.name} missing; scenario output:\n{(proc.stdout + proc.stderr)[-4000:]}")
            result = torch.load(path, weights_only=False)
            if not result["ok"]:
                pytest.fail(f"scenario {key} raised on rank {rank}:\n{result['error']}")
            results.append(result)
        return results

    return load


# ---------------------------------------------------------------------------------------------------- helpers


def rank_batch(dm, rank: int, world_size: int, index: int = 0) -> TaskBatch:
    """Batch ``index`` of epoch 0 of the training stream that ``rank`` of ``world_size`` draws."""
    dm._rank = lambda: (rank, world_size)  # what the Trainer would report on that rank
    loader = dm.train_dataloader()
    return dm.prepare_batch(loader.batch(index))


def relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> float:
    return float((actual - expected).abs().max()) / scale


def reference_gradient(name: str, initial: dict[str, torch.Tensor], batch: TaskBatch, build=None) -> dict[str, torch.Tensor | None]:
    """The single-process meta-gradient over ``batch`` (both ranks' tasks together) from the same weights."""
    model = build() if build is not None else scenarios.build(name)[0]
    model.load_state_dict(initial)
    model.zero_grad()
    model.meta_loss(batch).backward()
    return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


def assert_same_gradient(actual: dict, expected: dict, tol: float = 1e-6) -> None:
    """Equal to ``tol`` relative to the largest entry of the whole gradient (some entries are ~0)."""
    assert actual.keys() == expected.keys()
    scale = max(float(g.abs().max()) for g in expected.values() if g is not None)
    assert scale > 0
    for key, g in expected.items():
        if g is None or not g.abs().max() > 0:
            # No gradient in the single-process step: DDP reports None or exact zeros.
            assert actual[key] is None or not actual[key].abs().max() > 0, key
            continue
        assert actual[key] is not None, key
        err = relative_error(actual[key], g, scale)
        assert err < tol, f"{key}: relative error {err:.1e}"


def assert_ranks_identical(results: list[dict[str, Any]]) -> None:
    """Every rank has bit-identical parameters after every step."""
    r0, r1 = results
    assert len(r0["params"]) == len(r1["params"]) > 0
    for step, (p0, p1) in enumerate(zip(r0["params"], r1["params"])):
        for key in p0:
            assert torch.equal(p0[key], p1[key]), f"{key} differs between ranks after step {step}"


def assert_one_allreduce_per_step(result: dict[str, Any]) -> None:
    """Every training step all-reduced each gradient bucket exactly once (DDP's buckets, seen by a comm hook)."""
    steps = result["allreduced"]
    assert steps, "no all-reduce recorded"
    for step, buckets in enumerate(steps):
        assert buckets and len(buckets) == len(set(buckets)) == len(set(steps[0])), f"step {step}: buckets {buckets}"


def task_ids(result: dict[str, Any]) -> list[str]:
    return [fp for _, fps in result["tasks"] for fp in fps]


# ------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(scenarios.ALGORITHMS))
def test_meta_gradient_equals_single_process_over_all_ranks_tasks(ddp, name):
    r0, r1 = ddp(f"gradient_{name}")
    for key in r0["initial"]:
        assert torch.equal(r0["initial"][key], r1["initial"][key]), f"{key}: ranks started from different weights"

    # Each rank draws its own tasks: its own counter-based stream, none shared with the other rank.
    dm = scenarios.build(name)[1]
    for rank, result in enumerate((r0, r1)):
        expected = rank_batch(dm, rank, WORLD)
        assert scenarios.fingerprint(result["batches"][0]) == scenarios.fingerprint(expected), f"rank {rank} stream"
    assert not set(task_ids(r0)) & set(task_ids(r1))

    # One all-reduce of the second-order meta-gradient: equal on both ranks, and equal to the single-process
    # gradient of the mean loss over the union of both ranks' tasks.
    union = TaskBatch.cat([r0["batches"][0], r1["batches"][0]])
    expected = reference_gradient(name, r0["initial"], union)
    for key in r0["grads"][0]:
        g0, g1 = r0["grads"][0][key], r1["grads"][0][key]
        assert (g0 is None) == (g1 is None) and (g0 is None or torch.equal(g0, g1)), f"{key} differs between ranks"
    assert_same_gradient(r0["grads"][0], expected)
    # (The comparison can tell: rank 0's tasks alone give a clearly different gradient.)
    with pytest.raises(AssertionError):
        assert_same_gradient(reference_gradient(name, r0["initial"], r0["batches"][0]), expected, tol=1e-3)
    for result in (r0, r1):
        assert_one_allreduce_per_step(result)

    assert_ranks_identical((r0, r1))
    first, last = r0["params"][0], r0["params"][-1]
    assert any(not torch.equal(first[k], last[k]) for k in first), "training did not move the weights"

    # Running normalization statistics (and Reptile's carried inner Adam state): the same on both ranks after every
    # step, and after the first equal to one update from both ranks' tasks together.
    carried = ("running", "inner_adam")
    for b0, b1 in zip(r0["buffers"], r1["buffers"]):
        for key in b0:
            assert torch.equal(b0[key], b1[key]), f"{key} differs between ranks"
    if any(c in key for key in r0["buffers"][0] for c in carried):
        model = scenarios.build(name)[0]
        model.load_state_dict(r0["initial"])
        with recording() as scope:
            model.meta_loss(union)
        update_running_statistics(scope.modules, scope.tensors)
        for key, value in model.state_dict().items():
            if any(c in key for c in carried):
                torch.testing.assert_close(r0["buffers"][0][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_throughput_counts_the_tasks_of_every_rank(ddp):
    r0, _ = ddp("gradient_maml")
    bar = r0["progress_bar"]
    assert bar["train/tasks_per_sec"] > 0 and bar["train/steps_per_sec"] > 0
    per_step = bar["train/tasks_per_sec"] / bar["train/steps_per_sec"]
    # The effective meta-batch: 3 tasks per rank x 2 ranks.
    assert per_step == pytest.approx(3 * WORLD, rel=1e-4)


def test_chunked_accumulation_all_reduces_once(ddp):
    r0, r1 = ddp("chunked")
    # Two chunks of 2 tasks per rank and step, the first under no_sync: one all-reduce round, the exact union gradient.
    for result in (r0, r1):
        assert_one_allreduce_per_step(result)

    def build():
        return scenarios.MAML(scenarios.SinusoidMLP(hidden=(8, 8)), inner_steps=2, chunk_size=2)

    union = TaskBatch.cat([r0["batches"][0], r1["batches"][0]])
    assert_same_gradient(r0["grads"][0], reference_gradient("maml", r0["initial"], union, build=build))
    assert_ranks_identical((r0, r1))


def test_unused_parameters_with_find_unused_parameters(ddp):
    r0, r1 = ddp("unused")
    for result in (r0, r1):
        assert result["grads"][0]["backbone.unused.weight"] is None
        for params in result["params"]:
            assert torch.equal(params["backbone.unused.weight"], result["initial"]["backbone.unused.weight"])
        assert_one_allreduce_per_step(result)
    assert_ranks_identical((r0, r1))

    # Chunked accumulation (chunk_size=2, no sync on the first chunk) still gives the exact union gradient.
    def build():
        return scenarios.MAML(scenarios.WithUnused(), inner_steps=2, chunk_size=2)

    union = TaskBatch.cat([r0["batches"][0], r1["batches"][0]])
    assert_same_gradient(r0["grads"][0], reference_gradient("maml", r0["initial"], union, build=build))


def test_resume_restores_each_ranks_own_stream(ddp):
    results = ddp("resume")
    full = [r["full"] for r in results]
    ids = [set(task_ids(f)) for f in full]
    assert not ids[0] & ids[1], "ranks saw the same tasks"
    for rank, result in enumerate(results):
        assert [s for s, _ in full[rank]["tasks"]] == list(range(8))
        assert result["first"]["tasks"] == full[rank]["tasks"][:4]
        for n in (3, 4):  # 3: at an epoch boundary (3 batches per epoch); 4: mid-epoch
            resumed = result[f"resumed_{n}"]
            # Exactly the rest of this rank's uninterrupted stream: no repeat, no skip, nothing of the other rank.
            assert resumed["tasks"] == full[rank]["tasks"][n:], f"rank {rank}, resumed at {n}"
            assert not set(task_ids(resumed)) & ids[1 - rank]
            # And the continued run ends with the uninterrupted run's weights, bit for bit.
            for key, value in full[rank]["params"][-1].items():
                assert torch.equal(resumed["params"][-1][key], value), f"rank {rank}, resumed at {n}: {key}"
    for n in (3, 4):
        assert_ranks_identical([r[f"resumed_{n}"] for r in results])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_nonfinite_step_is_skipped_on_every_rank(ddp, precision):
    r0, r1 = ddp(f"nonfinite_{precision}")
    # The inf appeared on rank 1 only, at its second step; after the all-reduce every rank skips that step.
    for rank, result in enumerate((r0, r1)):
        assert result["skipped_steps"] == 1, f"rank {rank}"
        assert result["global_step"] == 4, f"rank {rank}: a skipped step still counts as a step"
        before, at, after = result["params"][0], result["params"][1], result["params"][2]
        for key in before:
            assert torch.equal(before[key], at[key]), f"rank {rank}: {key} changed in the skipped step"
            assert torch.isfinite(result["params"][-1][key]).all()
        assert any(not torch.equal(at[k], after[k]) for k in at), f"rank {rank}: training did not go on"
    assert_ranks_identical((r0, r1))
    assert r0["warnings"], "no warning logged for the skipped step"
    if precision == "16-mixed":
        assert r0["scale"] == r1["scale"] == 2.0**7, "GradScaler should have backed off once"


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_evaluation_covers_every_episode_once(ddp, name):
    r0, r1 = ddp(f"evaluation_{name}")
    model, dm = scenarios.build(name)
    model.load_state_dict(r0["initial"])

    # Single process: all 7 fixed episodes, per-episode values into the same metric.
    metrics: dict[str, MeanConfidenceInterval] = defaultdict(MeanConfidenceInterval)
    episodes = []
    for batch in dm.val_dataloader():
        batch = dm.prepare_batch(batch)
        episodes += scenarios.fingerprint(batch)
        for key, values in model.task_metrics(batch).items():
            metrics[f"val/{key}"].update(values)

    # The ranks' shards are disjoint and together are every episode (4 + 3).
    assert len(r0["val_tasks"]) == 4 and len(r1["val_tasks"]) == 3
    assert sorted(r0["val_tasks"] + r1["val_tasks"]) == sorted(episodes)

    for key, metric in metrics.items():
        mean, ci = (float(v) for v in metric.compute())
        for rank, result in enumerate((r0, r1)):
            logged = result["metrics"]
            assert logged[key] == pytest.approx(mean, rel=1e-5, abs=1e-6), f"rank {rank}: {key}"
            assert logged[f"{key}_ci95"] == pytest.approx(ci, rel=1e-5, abs=1e-6), f"rank {rank}: {key}_ci95"


def test_mamlrl_takes_the_trpo_step_of_every_ranks_tasks(ddp):
    from lit_meta.rl import NavigationTasks

    r0, r1 = ddp("mamlrl")
    model = scenarios.mamlrl()
    for key, value in model.state_dict().items():
        assert torch.equal(r0["initial"][key], value) and torch.equal(r1["initial"][key], value)
    alone = scenarios.mamlrl()  # the step a rank would take on its own tasks, without the all-reduce
    alone.meta_step(r0["tasks"][0])
    for step in range(2):
        ranks_tasks = [r0["tasks"][step], r1["tasks"][step]]
        assert not torch.equal(ranks_tasks[0].seeds, ranks_tasks[1].seeds), "the ranks collected the same tasks"
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        # Single process: one TRPO step on the meta-batch of both ranks' tasks.
        model.meta_step(NavigationTasks(torch.cat([t.goals for t in ranks_tasks]), torch.cat([t.seeds for t in ranks_tasks])))
        after = {k: p.detach().clone() for k, p in model.named_parameters()}
        assert any(not torch.equal(before[k], after[k]) for k in after), f"step {step} did not move the policy"
        for rank, result in enumerate((r0, r1)):
            for key, value in after.items():
                torch.testing.assert_close(result["params"][step][key], value, rtol=1e-8, atol=1e-9, msg=f"rank {rank}, step {step}: {key}")
    first = {k: p.detach() for k, p in alone.named_parameters()}
    assert any(not torch.allclose(first[k], r0["params"][0][k], rtol=1e-3, atol=1e-3) for k in first), "the ranks did not combine their tasks"
