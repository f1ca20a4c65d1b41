"""How fast a MAML meta-step could possibly be on this machine, and so the largest possible ratio to learn2learn.

    python benchmarks/roofline.py                 # both of speed.py's settings, 2 threads
    python benchmarks/roofline.py --threads 1
    python benchmarks/roofline.py --quick         # smoke run

An exact meta-gradient cannot skip arithmetic: every convolution and matrix product of the forward passes, the inner
gradients and their derivatives has to be computed, by any library. This script counts that arithmetic and sets it
against the fastest the machine computes anything:

* **FLOPs per meta-step**, counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products,
  forward and backward, at the direct-convolution count) on learn2learn's step and on ours. Ours is counted on the
  per-task loop (``vectorize=False``): the vmapped step runs the same arithmetic as one grouped convolution per layer,
  but the counter's backward formulas ignore ``groups`` and overcount it. The two counts must agree: both libraries
  do the same work.
* **The machine's peak**: the best GFLOP/s of large float32 matrix products (``torch.mm``, square, 1024-3072) with
  the same threads, the most efficient kernel a CPU has. No meta-step kernel (small grouped convolutions,
  memory-bound normalization and ReLU derivatives) runs faster than that.
* **The convolution kernels' rate** on the step's own layer shapes (a meta-batch of support sets, per-task weights),
  forward plus the inner step's gradients, in each layout PyTorch offers: grouped NCHW (what vmap runs), grouped
  channels-last, one convolution per task (what learn2learn runs). The best layout per layer, weighted by the
  layers' arithmetic, bounds what a step made of these kernels can sustain.
* **Measured steps**: our vmapped MAML and FOMAML and learn2learn's, interleaved in this process as in speed.py.

From these: a step can take no less than ``FLOPs / peak`` seconds, so no implementation can be more than
``learn2learn's s/step x peak / FLOPs`` times faster than learn2learn ("ceiling" below), and a target ratio ``R``
needs ``R x FLOPs / (peak x learn2learn's s/step)`` of the peak sustained over the whole step ("R needs"). The
same with the convolutions' rate in place of the peak ("conv ceiling") is the most a step of PyTorch's kernels can
reach even if everything but its convolutions took no time.
Winograd-style convolutions could lower the arithmetic below the direct count; for these stride-2 3x3 layers the
saving is small, and no library here uses them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (puts the checkout on sys.path)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lit_meta.allocator import tune_cpu_allocator  # noqa: E402

TIMED = [
    speed.Method("ours MAML vmap", "lit_meta"),
    speed.Method("ours FOMAML vmap", "lit_meta", first_order=True),
    speed.Method("l2l MAML", "l2l"),
    speed.Method("l2l FOMAML", "l2l", first_order=True),
]


@dataclass(frozen=True)
class Row:
    setting: str
    method: str
    gflop: float  # per meta-step
    seconds: float  # median wall-clock s/step
    l2l_seconds: float  # learn2learn's median of the same order
    conv_rate: float  # GFLOP/s of the setting's convolutions in their fastest layouts (best_conv_rate)


def step_gflop(method: speed.Method, setting: speed.Setting) -> float:
    """GFLOPs of one meta-step of ``method`` (a vmapped lit_meta method is counted on its per-task loop)."""
    if method.library == "lit_meta":
        method = speed.Method(method.name, "lit_meta", first_order=method.first_order, vectorize=False)
    device = torch.device("cpu")
    step, _ = speed.make_step(method, setting, speed.make_batch(setting, device), device)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_gflops(sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 5) -> float:
    """The best float32 GFLOP/s of square ``torch.mm`` with the current threads."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        best = max(best, 2 * n**3 / min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats)) / 1e9)
    return best


LAYOUTS = ("grouped NCHW", "grouped channels-last", "per task")


def conv_layers(setting: speed.Setting) -> list[tuple[int, int, int, int]]:
    """``(in_channels, out_channels, input size, output size)`` of every convolution of speed.py's network."""
    layers, size = [], 28  # speed.make_batch's images
    for conv in (m for m in speed.make_network(setting).modules() if isinstance(m, torch.nn.Conv2d)):
        out = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        layers.append((conv.in_channels, conv.out_channels, size, out))
        size = out
    return layers


def conv_rate(setting: speed.Setting, layer: tuple[int, int, int, int], layout: str, repeats: int = 5) -> float:
    """GFLOP/s of one meta-batch's convolution of one layer on its support sets, forward plus the gradients an inner
    step takes (weight and, but for the first layer, input), with per-task weights: ``"grouped NCHW"`` is what vmap
    hands oneDNN, ``"grouped channels-last"`` the layout oneDNN prefers, ``"per task"`` one convolution per task, as
    learn2learn runs it."""
    c, o, size, out = layer
    t, n = setting.tasks, setting.ways * setting.shots
    if layout == "per task":
        xs = [torch.randn(n, c, size, size, requires_grad=c > 1) for _ in range(t)]
        ws = [torch.randn(o, c, 3, 3, requires_grad=True) for _ in range(t)]
        groups = 1
    else:
        memory = torch.channels_last if layout == "grouped channels-last" else torch.contiguous_format
        xs = [torch.randn(n, t * c, size, size).contiguous(memory_format=memory).requires_grad_(c > 1)]
        ws = [torch.randn(t * o, c, 3, 3).contiguous(memory_format=memory).requires_grad_(True)]
        groups = t
    wrt = ws + (xs if c > 1 else [])

    def run() -> None:
        ys = [torch.nn.functional.conv2d(x, w, stride=2, padding=1, groups=groups) for x, w in zip(xs, ws)]
        torch.autograd.grad(ys, wrt, [torch.ones_like(y) for y in ys])

    flop = 2 * n * t * out * out * o * c * 9 * (3 if c > 1 else 2)
    run()
    best = min(_timed(run) for _ in range(repeats))
    return flop / best / 1e9


def best_conv_rate(setting: speed.Setting) -> tuple[float, dict[str, list[float]]]:
    """The convolutions' GFLOP/s if every layer ran in its fastest layout (layers weighted by their forward
    arithmetic), and every layout's rate per layer: ``(rate, {layout: [per layer]})``."""
    layers = conv_layers(setting)
    rates = {layout: [conv_rate(setting, layer, layout) for layer in layers] for layout in LAYOUTS}
    flops = [o * c * out**2 for c, o, _, out in layers]
    seconds = sum(f / max(rates[layout][i] for layout in LAYOUTS) for i, f in enumerate(flops))
    return sum(flops) / seconds, rates


def ceiling(l2l_seconds: float, gflop: float, peak: float) -> float:
    """The largest ratio to learn2learn any implementation of ``gflop`` per step can reach at ``peak`` GFLOP/s."""
    return l2l_seconds * peak / gflop


def needed_share(ratio: float, l2l_seconds: float, gflop: float, peak: float) -> float:
    """The share of ``peak`` a whole step must sustain to run ``ratio`` times faster than learn2learn."""
    return ratio * gflop / (peak * l2l_seconds)


def table(rows: list[Row], peak: float, target: float) -> str:
    lines = [
        f"{'setting':<12} {'method':<18} {'GFLOP/step':>10} {'s/step':>7} {'GFLOP/s':>8} {'of peak':>7} "
        f"{'l2l/ours':>8} {'ceiling':>7} {'conv ceiling':>12} {f'{target:g}x needs':>10}",
        "-" * 109,
    ]
    for r in rows:
        rate = r.gflop / r.seconds
        if r.method.startswith("ours"):
            ratios = (
                f"{r.l2l_seconds / r.seconds:8.2f} {ceiling(r.l2l_seconds, r.gflop, peak):7.2f} "
                f"{ceiling(r.l2l_seconds, r.gflop, r.conv_rate):12.2f} "
                f"{needed_share(target, r.l2l_seconds, r.gflop, peak):10.0%}"
            )
        else:
            ratios = ""
        lines.append(
            f"{r.setting:<12} {r.method:<18} {r.gflop:10.2f} {r.seconds:7.3f} {rate:8.1f} {rate / peak:7.0%} {ratios}"
        )
    return "\n".join(lines)


def conv_table(rates: dict[str, dict[str, list[float]]], best: dict[str, float], peak: float) -> str:
    lines = [f"{'setting':<12} {'convolution layout':<22} " + " ".join(f"{f'layer {i + 1}':>14}" for i in range(4))]
    for setting, by_layout in rates.items():
        for layout, per_layer in by_layout.items():
            cells = " ".join(f"{r:6.1f} ({r / peak:4.0%})" for r in per_layer)
            lines.append(f"{setting:<12} {layout:<22} {cells}")
        lines.append(f"{setting:<12} {'each layer its fastest':<22} {best[setting]:6.1f} ({best[setting] / peak:4.0%}) overall")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of one timed step per method")
    parser.add_argument("--target", type=float, default=3.0, help="the ratio to learn2learn asked for")
    parser.add_argument("--quick", action="store_true", help="tiny settings, one round: a smoke run")
    args = parser.parse_args(argv)
    try:
        import learn2learn  # noqa: F401
    except Exception as err:
        parser.error(f"learn2learn is not importable ({err}); install it with scripts/install_learn2learn.sh")
    tuned = tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    device = torch.device("cpu")

    sizes = (1024,) if args.quick else (1024, 2048, 3072)
    peak_before = peak_gflops(sizes)
    rows: list[Row] = []
    conv_rates: dict[str, dict[str, list[float]]] = {}
    best_rates: dict[str, float] = {}
    for setting in speed.settings(None, args.quick):
        print(f"== {setting.name}: {setting.describe()}", flush=True)
        gflop = {m.name: step_gflop(m, setting) for m in TIMED}
        best_rates[setting.name], conv_rates[setting.name] = best_conv_rate(setting)
        batch = speed.make_batch(setting, device)
        steps = {m.name: speed.make_step(m, setting, batch, device)[0] for m in TIMED}
        for step in steps.values():
            step()  # warm-up
        times = speed.time_interleaved(steps, repeats, 1, device)
        median = {name: statistics.median(walls) for name, (walls, _) in times.items()}
        for m in TIMED:
            l2l = median["l2l FOMAML" if m.first_order else "l2l MAML"]
            rows.append(Row(setting.name, m.name, gflop[m.name], median[m.name], l2l, best_rates[setting.name]))
    peak = max(peak_before, peak_gflops(sizes))

    print()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, malloc {'tuned' if tuned else 'system defaults'}; median of {repeats} steps"
    )
    print(f"peak: {peak:.1f} GFLOP/s (best float32 torch.mm, measured before and after the steps)")
    print(
        "convolutions of one meta-batch, forward + the inner step's gradients, per-task weights "
        "(GFLOP/s, share of the peak):"
    )
    print(conv_table(conv_rates, best_rates, peak))
    print()
    print(
        "GFLOP/step: counted by FlopCounterMode; ceiling: the largest l2l/ours any implementation reaches at the peak; "
        "conv ceiling: the same if the whole step ran at the convolutions' rate in their fastest layouts; "
        f"{args.target:g}x needs: the share of the peak a whole step must sustain for l2l/ours = {args.target:g}"
    )
    for s in speed.settings(None, args.quick):
        print(f"  {s.name}: {s.describe()}")
    print(table(rows, peak, args.target))


if __name__ == "__main__":
    main()
