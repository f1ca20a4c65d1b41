"""Seconds per meta-step and peak memory of lit_meta's MAML against learn2learn's, on Finn et al.'s Omniglot Conv-4.

    python benchmarks/speed.py                    # CPU, both settings, ~3-5 min on a quiet 2-core machine
    python benchmarks/speed.py --device cuda      # GPU: peak memory from torch.cuda.max_memory_allocated
    python benchmarks/speed.py --quick            # smoke run: tiny meta-batches, one repetition

**What a meta-step is.** Everything of one outer update: forward, inner loop, outer backward and an Adam step, on a
fixed meta-batch already on the device (data loading is not measured: the datamodules gather episodes from a tensor
store at ~20,000 tasks/s). lit_meta runs exactly what ``MetaLearner.training_step`` does minus Lightning's logging:
``task_outputs`` per chunk of ``chunk_size`` tasks, ``backward`` of ``sum / T`` per chunk, ``Adam.step``.
learn2learn runs the loop of its MAML examples: per task ``clone()``, ``adapt(support loss)`` per inner step,
``query_loss.backward()``; then the gradients are divided by ``T`` and Adam steps. Both sides train the same
network from the same initialization: ``Conv4(hidden=64, pool="stride", embedding="mean")`` on 28x28x1, i.e. Finn et
al.'s Omniglot network with lit_meta's :class:`~lit_meta.backbones.BatchStatNorm`. Rows marked "native norm" use
PyTorch's batch-norm kernel instead (``Conv4(fused_norm=True)``: the ``F.batch_norm`` call that
``nn.BatchNorm2d(track_running_stats=False)`` makes, what a learn2learn user would write). lit_meta allows it where
only its first derivatives are used, as in the FOMAML configs; its row is compared with learn2learn's FOMAML on the
same kernel. ``--native-bn`` adds learn2learn's second-order MAML on that kernel.

**End to end** (``--end-to-end``): each step first samples its meta-batch from the real Omniglot with the library's
own data pipeline, as a training loop does: lit_meta's ``OmniglotDataModule`` loader (episodes gathered from a decoded
uint8 tensor store) and learn2learn's ``TaskDataset`` with the transforms of its Omniglot example (every image decoded
and resized when a task draws it; see benchmarks/sampling.py). This is what a researcher's run costs per step; the
default, a fixed meta-batch, isolates the meta-learning computation.

**Settings** (Finn et al.'s Omniglot): 5-way 1-shot, 1 inner step alpha=0.4, meta-batch 32; 20-way 1-shot,
5 inner steps alpha=0.1, meta-batch 16; one query per class, as in Finn et al. and in
``configs/omniglot_maml_{5w1s,20w1s}.yaml``. ``--queries 15`` gives the heavier load of most later papers (15 queries
per class), where the query forward/backward dominates and the work per task is larger.

**How it is timed.** All methods live in one process. After one warm-up step each, ``--repeats`` rounds run
``--steps`` steps of every method, the order rotating every round, so drifting machine load hits all methods alike.
Reported: the median wall-clock seconds per step, the median process CPU seconds per step (all threads; less
sensitive to other processes on a busy machine), and ``l2l/ours``: learn2learn's median of the same order
(second or first) divided by the row's. On a machine shared with other jobs use ``--threads 1`` and compare the CPU
columns: with more threads than free cores, OpenMP threads spin-wait for each other and steps of every method
become several times slower at random (measured here: 1 s or 3 s for the same step).

**Peak memory.** CPU: each configuration runs one meta-step in a child forked *before* any computation (so its
OpenMP pool is its own), with the peak RSS reset (``/proc/self/clear_refs``) just before the step; reported is peak
RSS minus RSS before the step. CUDA: ``max_memory_allocated`` minus the allocation before the step, in process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import select
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from data_paths import OMNIGLOT  # noqa: E402
from datamodules.task_batch import TaskBatch  # noqa: E402
from lit_meta import MAML, Conv4  # noqa: E402
from lit_meta.allocator import tune_cpu_allocator  # noqa: E402

OUTER_LR = 1e-3


@dataclass(frozen=True)
class Setting:
    """One task shape and inner loop."""

    name: str
    ways: int
    shots: int
    queries: int
    tasks: int
    inner_steps: int
    inner_lr: float

    def describe(self) -> str:
        return (
            f"{self.ways}-way {self.shots}-shot, {self.queries} queries/class, meta-batch {self.tasks}, "
            f"{self.inner_steps} inner step(s) alpha={self.inner_lr}"
        )


@dataclass(frozen=True)
class Method:
    """One implementation: ``library`` is ``"lit_meta"`` or ``"l2l"``."""

    name: str
    library: str
    first_order: bool = False
    vectorize: bool = True
    chunk_size: int | None = None
    native_norm: bool = False  # PyTorch's batch-norm kernel (Conv4(fused_norm=True)) instead of BatchStatNorm's ops


METHODS = [
    Method("ours MAML vmap", "lit_meta"),
    Method("ours MAML vmap chunk=8", "lit_meta", chunk_size=8),
    Method("ours MAML vmap chunk=4", "lit_meta", chunk_size=4),
    Method("ours MAML loop", "lit_meta", vectorize=False),
    Method("ours FOMAML vmap", "lit_meta", first_order=True),
    Method("ours FOMAML vmap native norm", "lit_meta", first_order=True, native_norm=True),
    Method("l2l MAML", "l2l"),
    Method("l2l FOMAML", "l2l", first_order=True),
    Method("l2l FOMAML native norm", "l2l", first_order=True, native_norm=True),
]
NATIVE_BN = Method("l2l MAML native norm", "l2l", native_norm=True)


@dataclass
class Result:
    setting: str
    method: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_mb: float | None = None


# --------------------------------------------------------------------------------------------------- workload
def settings(queries: int | None, quick: bool) -> list[Setting]:
    queries = 1 if queries is None else queries  # Finn et al.'s and the configs': K queries per class, K = 1
    five = Setting("5w1s", 5, 1, queries, 32, 1, 0.4)
    twenty = Setting("20w1s", 20, 1, queries, 16, 5, 0.1)
    if quick:  # every code path, a fraction of the work
        five = Setting("5w1s-quick", 5, 1, 2, 4, 1, 0.4)
        twenty = Setting("20w1s-quick", 20, 1, 1, 2, 2, 0.1)
    return [five, twenty]


def make_batch(setting: Setting, device: torch.device) -> TaskBatch:
    """Random 28x28 images with class-ordered labels (the timing does not depend on the pixels)."""
    g = torch.Generator().manual_seed(0)
    t, n = setting.tasks, setting.ways
    support_x = torch.rand(t, n * setting.shots, 1, 28, 28, generator=g)
    query_x = torch.rand(t, n * setting.queries, 1, 28, 28, generator=g)
    labels = lambda per_class: torch.arange(n).repeat_interleave(per_class).expand(t, -1).contiguous()  # noqa: E731
    return TaskBatch(support_x, labels(setting.shots), query_x, labels(setting.queries)).to(device)


def make_network(setting: Setting, native_norm: bool = False) -> nn.Module:
    """Finn et al.'s Omniglot Conv-4, the same initialization for every method (``native_norm`` does not change it)."""
    torch.manual_seed(0)
    return Conv4(
        1, hidden=64, out_features=setting.ways, pool="stride", image_size=28, embedding="mean", fused_norm=native_norm
    )


Batches = Callable[[], TaskBatch]


def make_step(
    method: Method, setting: Setting, batch: TaskBatch | Batches, device: torch.device
) -> tuple[Callable[[], None], nn.Module]:
    """A closure running one meta-step of ``method`` (its Adam state lives in the closure), and the network it trains.

    ``batch`` is the meta-batch of every step, or a callable returning each step's (end-to-end mode: sampling it is
    part of the step).
    """
    next_batch: Batches = batch if callable(batch) else lambda: batch
    if method.library == "lit_meta":
        learner = MAML(
            make_network(setting, method.native_norm),
            inner_lr=setting.inner_lr,
            inner_steps=setting.inner_steps,
            first_order=method.first_order,
            vectorize=method.vectorize,
            chunk_size=method.chunk_size,
        ).to(device)
        opt = torch.optim.Adam(learner.parameters(), lr=OUTER_LR)

        def step() -> None:
            # MetaLearner.training_step without Lightning's logging and metrics.
            batch = next_batch()
            opt.zero_grad()
            for chunk in batch.chunks(method.chunk_size) if method.chunk_size else [batch]:
                objectives, _ = learner.task_outputs(chunk, training=True)
                (objectives.sum() / batch.num_tasks).backward()
            opt.step()

        return step, learner.backbone

    import learn2learn as l2l

    maml = l2l.algorithms.MAML(make_network(setting, method.native_norm).to(device), lr=setting.inner_lr, first_order=method.first_order)
    opt = torch.optim.Adam(maml.parameters(), lr=OUTER_LR)

    def step() -> None:
        # learn2learn's examples/vision/maml_omniglot.py loop.
        batch = next_batch()
        opt.zero_grad()
        for t in range(batch.num_tasks):
            learner = maml.clone()
            for _ in range(setting.inner_steps):
                learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
            F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t]).backward()
        for p in maml.parameters():
            p.grad.mul_(1.0 / batch.num_tasks)
        opt.step()

    return step, maml.module


def end_to_end_sources(setting: Setting, root: Path, cache: Path, device: torch.device) -> dict[str, Batches]:
    """Each library's own episode sampler on the real Omniglot (Vinyals training characters for lit_meta, all
    characters for learn2learn), returning a meta-batch on ``device``: ``{"lit_meta": ..., "l2l": ...}``.

    lit_meta: ``OmniglotDataModule``'s training loader (uint8 tensor store; the float conversion its
    ``on_after_batch_transfer`` does is included). learn2learn: ``TaskDataset.sample()`` once per task, with the
    transforms of its Omniglot example (benchmarks/sampling.py builds it), the examples split into support and query.
    """
    from datamodules import OmniglotDataModule
    from sampling import learn2learn_tasksets

    dm = OmniglotDataModule(
        root, ways=setting.ways, shots=setting.shots, queries=setting.queries, meta_batch_size=setting.tasks,
        train_batches=10**9, cache_dir=cache,
    )
    loader = iter(dm.train_dataloader())
    factory = learn2learn_tasksets(root)
    if isinstance(factory, str):
        raise RuntimeError(f"learn2learn: {factory}")
    sample = factory(setting.ways, setting.shots, setting.queries)
    per_class = setting.shots + setting.queries

    def l2l_batch() -> TaskBatch:
        tasks = []
        for _ in range(setting.tasks):
            x, y = sample()
            x = x[torch.argsort(y, stable=True)].view(setting.ways, per_class, *x.shape[1:])
            tasks.append((x[:, : setting.shots].flatten(0, 1), x[:, setting.shots :].flatten(0, 1)))
        labels = lambda k: torch.arange(setting.ways).repeat_interleave(k).expand(setting.tasks, -1)  # noqa: E731
        support, query = (torch.stack(part) for part in zip(*tasks))
        return TaskBatch(support, labels(setting.shots), query, labels(setting.queries)).to(device)

    return {"lit_meta": lambda: dm.prepare_batch(next(loader).to(device)), "l2l": l2l_batch}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------ check
def step_gradient(method: Method, setting: Setting, batch: TaskBatch, device: torch.device) -> dict[str, torch.Tensor]:
    """The gradient one benchmark step of ``method`` leaves on its network's parameters."""
    step, network = make_step(method, setting, batch, device)
    step()
    return {k: p.grad.detach().clone() for k, p in network.named_parameters()}


def gradient_check(setting: Setting, device: torch.device) -> dict[str, float]:
    """Largest relative difference (over parameter tensors) between each lit_meta row's meta-gradient and
    learn2learn's of the same order and norm kernel, one step from the same initialization on the same batch.

    Run in float64, so the comparison is of the algorithms, not of float32 (or TF32) rounding, which two inner steps
    amplify differently for the two norm kernels (see tests/test_benchmarks.py). A conv bias that feeds a
    batch-statistics norm has zero gradient and is skipped: only rounding noise is left there.
    """
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        batch = make_batch(setting, device)
        references: dict[tuple[bool, bool], dict[str, torch.Tensor]] = {}
        errors = {}
        for m in METHODS:
            if m.library != "lit_meta":
                continue
            key = (m.first_order, m.native_norm)
            if key not in references:
                reference = Method("l2l", "l2l", first_order=m.first_order, native_norm=m.native_norm)
                references[key] = step_gradient(reference, setting, batch, device)
            grads = step_gradient(m, setting, batch, device)
            errors[m.name] = max(
                float((g - references[key][k]).norm() / references[key][k].norm())
                for k, g in grads.items()
                if not (k.startswith("features.") and k.endswith(".0.bias"))
            )
        return errors
    finally:
        torch.set_default_dtype(default)


# ----------------------------------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_peak_mb(method: Method, setting: Setting, threads: int | None, timeout: float = 900.0) -> float | None:
    """Peak RSS growth (MB) of one meta-step, measured in a forked child; ``None`` where that is unsupported.

    Call only before this process computes anything (see :func:`run`).
    """
    if not hasattr(os, "fork") or not os.access("/proc/self/clear_refs", os.W_OK):
        return None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the parent's code
        code = 1
        try:
            os.close(read_end)
            if threads is not None:
                torch.set_num_threads(threads)
            device = torch.device("cpu")
            batch = make_batch(setting, device)
            step, _ = make_step(method, setting, batch, device)
            gc.collect()
            before = _status_kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            step()
            peak = _status_kb("VmHWM")
            os.write(write_end, json.dumps((peak - before) / 1024).encode())
            code = 0
        except BaseException as err:  # report, do not hang the parent
            os.write(write_end, json.dumps(f"error: {type(err).__name__}: {err}").encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        ready, _, _ = select.select([pipe], [], [], timeout)
        reply = pipe.read() if ready else ""
    if not ready:
        os.kill(pid, signal.SIGKILL)
        reply = json.dumps(f"error: no answer in {timeout:.0f} s")
    os.waitpid(pid, 0)
    value = json.loads(reply) if reply else "error: child died"
    if isinstance(value, str):
        print(f"  memory of {setting.name} / {method.name}: {value}", file=sys.stderr)
        return None
    return value


def cuda_peak_mb(step: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ----------------------------------------------------------------------------------------------------- timing
def time_interleaved(
    steps: dict[str, Callable[[], None]], repeats: int, per_round: int, device: torch.device
) -> dict[str, tuple[list[float], list[float]]]:
    """Wall-clock and process-CPU seconds of every step of every method, ``{name: (walls, cpus)}``.

    ``repeats`` rounds run ``per_round`` steps of each method, the order rotating every round, so that drifting load
    on a busy machine hits all methods alike. The steps must have been warmed up.
    """
    names = list(steps)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            walls, cpus = times[name]
            for _ in range(per_round):
                synchronize(device)
                wall, cpu = time.perf_counter(), time.process_time()
                steps[name]()
                synchronize(device)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
        print(f"  round {r + 1}/{repeats} done (load average {os.getloadavg()[0]:.1f})", flush=True)
    return times


def run(args: argparse.Namespace) -> list[Result]:
    device = torch.device(args.device)
    methods = METHODS + ([NATIVE_BN] if args.native_bn else [])
    all_settings = settings(args.queries, args.quick)
    rows = {(s.name, m.name): Result(s.name, m.name) for s in all_settings for m in methods}
    # CPU memory first, for every setting: the children must fork before this process has run any OpenMP region
    # (libgomp's pool does not survive fork: a child of a process that has computed hangs on a futex).
    if device.type == "cpu" and not args.no_memory and not args.end_to_end:
        for s in all_settings:
            for m in methods:
                rows[s.name, m.name].peak_mb = cpu_peak_mb(m, s, args.threads)
                print(f"  peak memory {s.name} / {m.name}: {rows[s.name, m.name].peak_mb} MB", flush=True)
    cache = Path(tempfile.mkdtemp(prefix="lit_meta_speed_")) if args.end_to_end else None
    for setting in all_settings:
        print(f"== {setting.name}: {setting.describe()}", flush=True)
        if args.end_to_end:
            sources = end_to_end_sources(setting, args.root, cache, device)
            steps = {m.name: make_step(m, setting, sources[m.library], device)[0] for m in methods}
        else:
            batch = make_batch(setting, device)
            steps = {m.name: make_step(m, setting, batch, device)[0] for m in methods}
        for m in methods:  # warm-up: allocator, oneDNN primitive caches, cuDNN autotuning
            if device.type == "cuda" and not args.no_memory:
                rows[setting.name, m.name].peak_mb = cuda_peak_mb(steps[m.name], device)
            else:
                steps[m.name]()
        for name, (walls, cpus) in time_interleaved(steps, args.repeats, args.steps, device).items():
            rows[setting.name, name].wall += walls
            rows[setting.name, name].cpu += cpus
        steps.clear()
        gc.collect()
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    return list(rows.values())


def reference(
    results: list[Result], setting: str, first_order: bool, native_norm: bool = False, cpu: bool = False
) -> float | None:
    """learn2learn's median s/step (wall, or CPU with ``cpu``) of the given order and norm kernel in ``setting``."""
    name = ("l2l FOMAML" if first_order else "l2l MAML") + (" native norm" if native_norm else "")
    for r in results:
        if r.setting == setting and r.method == name and r.wall:
            return statistics.median(r.cpu if cpu else r.wall)
    return None


def table(results: list[Result]) -> str:
    lines = [
        f"{'setting':<12} {'method':<30} {'s/step':>7} {'min':>7} {'cpu-s/step':>10} {'peak MB':>8} "
        f"{'l2l/ours':>8} {'(cpu)':>6}",
        "-" * 96,
    ]
    for r in results:
        wall, cpu = statistics.median(r.wall), statistics.median(r.cpu)
        ratios = ""
        if r.method.startswith("ours"):
            like = dict(setting=r.setting, first_order="FOMAML" in r.method, native_norm="native norm" in r.method)
            ref, ref_cpu = reference(results, **like), reference(results, **like, cpu=True)
            ratios = f"{ref / wall:8.2f} {ref_cpu / cpu:6.2f}" if ref is not None and ref_cpu is not None else ""
        peak = f"{r.peak_mb:8.0f}" if r.peak_mb is not None else f"{'n/a':>8}"
        lines.append(f"{r.setting:<12} {r.method:<30} {wall:7.3f} {min(r.wall):7.3f} {cpu:10.3f} {peak} {ratios}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=1, help="timed meta-steps per method per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all methods (interleaved)")
    parser.add_argument("--queries", type=int, default=None, help="query examples per class in both settings (default 1, as the configs)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--native-bn", action="store_true", help="add learn2learn's MAML on the native batch-norm kernel")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--quick", action="store_true", help="tiny settings, one repetition: a smoke run")
    parser.add_argument(
        "--end-to-end", action="store_true",
        help="each step first samples its meta-batch with the library's own data pipeline from the real Omniglot",
    )
    parser.add_argument("--root", type=Path, default=OMNIGLOT, help=f"for --end-to-end (default: {OMNIGLOT})")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    parser.add_argument(
        "--malloc", choices=["tuned", "system"], default="tuned",
        help="tuned: glibc keeps freed memory for reuse, as the lit_meta command line sets it (lit_meta.allocator); "
        "system: the C library's defaults. Either way it applies to both libraries alike (one process)",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="also compare every lit_meta row's meta-gradient with learn2learn's on the device, in float64",
    )
    args = parser.parse_args(argv)
    malloc_tuned = args.malloc == "tuned" and tune_cpu_allocator()
    if args.quick:
        args.steps, args.repeats = 1, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        import learn2learn  # noqa: F401  (imported before forking, so the children have it too)
    except Exception as err:
        parser.error(f"learn2learn is not importable ({err}); install it with scripts/install_learn2learn.sh")

    start = time.perf_counter()
    load = os.getloadavg()[0]
    if args.device == "cpu" and torch.get_num_threads() > 1 and load >= 1.0:
        print(
            f"note: load average {load:.1f} with {torch.get_num_threads()} threads: other processes compete for the "
            "cores, so multi-threaded steps stall on OpenMP barriers; --threads 1 gives steadier numbers",
            file=sys.stderr,
        )
    results = run(args)
    if args.check:  # after run(): on CPU the memory children must fork before any computation
        for setting in settings(args.queries, args.quick):
            for name, error in gradient_check(setting, torch.device(args.device)).items():
                print(f"check {setting.name} / {name}: meta-gradient vs learn2learn's, float64, max relative {error:.1e}")
    cpu_name = platform.processor() or platform.machine()
    print()
    print(
        f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f" ({cpu_name}, {os.cpu_count()} cores)")
        + f", {torch.get_num_threads()} threads; load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end"
        + f"; malloc {'tuned' if malloc_tuned else 'system defaults'}"
    )
    print(
        "end to end: every step samples its meta-batch from the real Omniglot with the library's own pipeline"
        if args.end_to_end
        else "compute only: a fixed meta-batch already on the device"
    )
    print(
        f"median of {args.steps * args.repeats} steps per method; l2l/ours = learn2learn's median s/step of the same "
        "order / the row's, from wall-clock and (cpu) from process CPU time"
    )
    for s in settings(args.queries, args.quick):
        print(f"  {s.name}: {s.describe()}")
    print(table(results))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
