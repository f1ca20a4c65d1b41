"""Environment steps per second of the meta-RL rollout samplers and seconds per MAML-TRPO meta-iteration.

    OMP_NUM_THREADS=1 python benchmarks/rl_speed.py            # the paper's settings, ~5 min on a quiet 2-core CPU
    OMP_NUM_THREADS=1 python benchmarks/rl_speed.py --quick    # smoke run: small batches, short horizons

**Sampler.** One batch of trajectories of the untrained 100-100 policy, as a meta-iteration collects it:
navigation 20 tasks x 20 trajectories (Finn et al.'s meta-batch and fast batch, torch dynamics, all agents in one
tensor), HalfCheetah 40 tasks x 20 trajectories (800 MuJoCo environments of
:class:`~lit_meta.rl.vector_env.VectorHalfCheetah`). "Workers" is the number of processes that step the
HalfCheetah environments (1: the training process itself); the navigation sampler has no environment processes, so
its second row uses 2 torch threads instead. Steps per second count environment steps (one agent, one time step);
the environments are built before the clock starts (building 800 HalfCheetah models takes a few seconds, once per
training run).

**Meta-iteration.** :meth:`~lit_meta.rl.MAMLRL.meta_step` at the paper's settings, second order: the pre- and
post-update rollouts, the inner policy-gradient step, and the TRPO step (10 conjugate-gradient iterations on
Fisher-vector products through the inner step, line search): navigation 20 x 20 x 100 steps, HalfCheetah
40 x 20 x 200. Wall-clock seconds, first iteration excluded where ``--repeats`` > 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from lit_meta.rl import MAMLRL, NavigationTasks, RolloutDataModule
from lit_meta.rl.maml_rl import TRAIN_PHASE


def tasks_of(environment: str, count: int) -> NavigationTasks:
    """The first training meta-batch of ``count`` tasks of the environment's datamodule (seed 0)."""
    data = RolloutDataModule(environment=environment, meta_batch_size=count, train_batches=1, seed=0)
    return next(iter(data.train_dataloader()))


def sampler_rate(environment: str, tasks: int, trajectories: int, horizon: int, workers: int) -> float:
    """Environment steps per second of one batch of rollouts."""
    model = MAMLRL(environment=environment, horizon=horizon, num_workers=workers if environment != "navigation2d" else 1)
    batch = tasks_of(environment, tasks)
    params = model.per_task({k: v.detach() for k, v in model.backbone.named_parameters()}, tasks)
    threads = torch.get_num_threads()
    if environment == "navigation2d":
        torch.set_num_threads(workers)
        model.rollout(params, batch, trajectories, TRAIN_PHASE, 0)  # warm-up
    else:
        _build(model, batch, trajectories)  # the environments and workers exist before the clock starts
    start = time.perf_counter()
    model.rollout(params, batch, trajectories, TRAIN_PHASE, 1)
    elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    model.teardown("fit")
    return tasks * trajectories * horizon / elapsed


def _build(model: MAMLRL, batch: NavigationTasks, trajectories: int) -> None:
    """Build the model's environments with a one-step rollout of the same batch size."""
    horizon = model.env.horizon
    object.__setattr__(model.env, "horizon", 1)
    try:
        params = model.per_task({k: v.detach() for k, v in model.backbone.named_parameters()}, batch.num_tasks)
        model.rollout(params, batch, trajectories, TRAIN_PHASE, 0)
    finally:
        object.__setattr__(model.env, "horizon", horizon)


def meta_iteration_seconds(environment: str, tasks: int, trajectories: int, horizon: int, repeats: int) -> float:
    """Wall-clock seconds of one MAML-TRPO meta-iteration (the last of ``repeats``)."""
    torch.manual_seed(0)
    model = MAMLRL(environment=environment, horizon=horizon, trajectories=trajectories)
    batch = tasks_of(environment, tasks)
    if environment != "navigation2d":
        _build(model, batch, trajectories)
    elapsed = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        model.meta_step(batch)
        elapsed = time.perf_counter() - start
    model.teardown("fit")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches and horizons (a smoke run)")
    parser.add_argument("--repeats", type=int, default=1, help="meta-iterations timed per environment (the last counts)")
    args = parser.parse_args()
    if args.quick:
        navigation, cheetah, sample_horizon = (4, 4, 20), (4, 4, 20), 20
    else:
        navigation, cheetah, sample_horizon = (20, 20, 100), (40, 20, 200), 50

    import gymnasium
    import mujoco

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}, gymnasium {gymnasium.__version__}, mujoco {mujoco.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print()
    print("| sampler | batch (tasks x trajectories x steps) | workers | env steps/s |")
    print("|---|---|---:|---:|")
    for name, environment, (t, n, h) in (("navigation", "navigation2d", navigation), ("HalfCheetah-Vel", "halfcheetah_vel", cheetah)):
        horizon = h if environment == "navigation2d" else min(h, sample_horizon)
        for workers in (1, 2):
            rate = sampler_rate(environment, t, n, horizon, workers)
            label = f"{workers} (torch threads)" if environment == "navigation2d" else str(workers)
            print(f"| {name} | {t} x {n} x {horizon} | {label} | {rate:,.0f} |", flush=True)
    print()
    print("| meta-iteration (MAML-TRPO, second order) | batch (tasks x trajectories x steps) | seconds |")
    print("|---|---|---:|")
    for name, environment, (t, n, h) in (("navigation", "navigation2d", navigation), ("HalfCheetah-Vel", "halfcheetah_vel", cheetah)):
        seconds = meta_iteration_seconds(environment, t, n, h, args.repeats)
        print(f"| {name} | {t} x {n} x {h} | {seconds:.1f} |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
