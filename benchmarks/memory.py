"""Peak memory and time of one second-order MAML meta-step against the number of inner steps, with and without the
checkpointed inner loop (``checkpoint_inner_loop``), and of implicit MAML (``--imaml``: its meta-gradient keeps
nothing of the inner loop).

    python benchmarks/memory.py                                   # Conv-4, 28x28, 5-way 1-shot, steps 1 2 5 10 20
    python benchmarks/memory.py --backbone resnet12 --steps 1 5   # ResNet-12, 84x84 (slow on a CPU)
    python benchmarks/memory.py --device cuda                     # max_memory_allocated on a GPU
    python benchmarks/memory.py --imaml                           # implicit MAML (5 CG steps) instead

Each row runs in a fresh process: on the CPU the peak is the resident set size (``ru_maxrss``) during the step minus
the resident size just before it (model, optimizer state and the batch already there); on CUDA it is
``torch.cuda.max_memory_allocated`` during the step minus the allocation before it. Time is the median of
``--repeats`` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import REPO  # noqa: F401  (first: it puts the checkout on sys.path)

SHAPES = {
    "conv4": dict(image_size=28, channels=1),
    "resnet12": dict(image_size=84, channels=3),
}


def measure(backbone: str, steps: int, checkpoint: bool, device: str, tasks: int, shots: int, queries: int, repeats: int, imaml: bool = False) -> dict:
    """One row, in this process: ``{"peak_mb", "seconds"}`` of a meta-step."""
    import resource

    import torch

    from datamodules.task_batch import TaskBatch
    from lit_meta import IMAML, MAML, Conv4, ResNet12

    torch.manual_seed(0)
    shape = SHAPES[backbone]
    if backbone == "conv4":
        net = Conv4(in_channels=1, hidden=64, out_features=5, pool="stride", embedding="mean", image_size=28)
    else:
        net = ResNet12(in_channels=3, out_features=5, image_size=84)
    if imaml:
        model = IMAML(net, inner_lr=0.01, inner_steps=steps, cg_steps=5).to(device)
    else:
        model = MAML(net, inner_lr=0.01, inner_steps=steps, checkpoint_inner_loop=checkpoint).to(device)
    size, ways = shape["image_size"], 5
    g = torch.Generator().manual_seed(0)
    x = lambda n: torch.rand(tasks, ways * n, shape["channels"], size, size, generator=g).to(device)  # noqa: E731
    y = lambda n: torch.arange(ways).repeat_interleave(n).expand(tasks, -1).clone().to(device)  # noqa: E731
    batch = TaskBatch(x(shots), y(shots), x(queries), y(queries))
    params = list(model.parameters())

    def step() -> None:
        loss = model.meta_loss(batch)
        grads = torch.autograd.grad(loss, params)
        del loss, grads

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"peak_mb": peak / 2**20, "seconds": times[len(times) // 2] if times else float("nan")}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=list(SHAPES), default="conv4")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-batch")
    parser.add_argument("--shots", type=int, default=1, help="support examples per class")
    parser.add_argument("--queries", type=int, default=15, help="queries per class")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the measured one (0: memory only)")
    parser.add_argument("--imaml", action="store_true", help="implicit MAML (one column: it has no stored variant)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row as JSON "steps,checkpoint"
    args = parser.parse_args()

    if args.row:
        steps, checkpoint = args.row.split(",")
        result = measure(
            args.backbone, int(steps), checkpoint == "1", args.device, args.tasks, args.shots, args.queries, args.repeats,
            args.imaml,
        )
        print(json.dumps(result))
        return

    name = "implicit MAML" if args.imaml else "MAML second order"
    print(
        f"{name}, {args.backbone}, 5-way {args.shots}-shot, {args.queries} queries/class, {args.tasks} tasks, "
        f"{args.device}, {os.environ.get('OMP_NUM_THREADS', 'default')} threads"
    )

    def row(steps: int, checkpoint: bool) -> dict:
        command = [sys.executable, __file__, "--row", f"{steps},{int(checkpoint)}", "--backbone", args.backbone,
                   "--device", args.device, "--tasks", str(args.tasks), "--shots", str(args.shots),
                   "--queries", str(args.queries), "--repeats", str(args.repeats)] + (["--imaml"] if args.imaml else [])
        # glibc's own malloc settings, so that freed activations leave the resident set as they would anywhere.
        env = {**os.environ, "LIT_META_MALLOC": "system"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            # Killed by the kernel (-9) when the step does not fit in memory: the row says so instead of ending the table.
            print(f"  ({steps} steps, {'checkpointed' if checkpoint else 'stored'}: the step failed, exit {done.returncode}: "
                  f"{(done.stderr.strip().splitlines() or ['killed, out of memory'])[-1]})", flush=True)
            return {"peak_mb": float("nan"), "seconds": float("nan")}
        return json.loads(done.stdout.strip().splitlines()[-1])

    if args.imaml:
        print(f"{'inner steps':>11} | {'MB':>8} | {'s/step':>7}")
        print("-" * 32)
        for steps in args.steps:
            result = row(steps, False)
            print(f"{steps:>11} | {result['peak_mb']:>8.1f} | {result['seconds']:>7.3f}", flush=True)
        return
    print(f"{'inner steps':>11} | {'stored: MB':>10} | {'s/step':>7} | {'checkpointed: MB':>16} | {'s/step':>7} | {'time ratio':>10}")
    print("-" * 78)
    for steps in args.steps:
        stored, ckpt = row(steps, False), row(steps, True)
        print(
            f"{steps:>11} | {stored['peak_mb']:>10.1f} | {stored['seconds']:>7.3f} | {ckpt['peak_mb']:>16.1f} | "
            f"{ckpt['seconds']:>7.3f} | {ckpt['seconds'] / stored['seconds']:>9.2f}x",
            flush=True,
        )

if __name__ == "__main__":
    main()
