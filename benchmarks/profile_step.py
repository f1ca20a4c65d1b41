"""Where one meta-step's time goes: our vmapped MAML against learn2learn's, operator by operator.

    python benchmarks/profile_step.py                   # both settings, the command line's allocator settings
    python benchmarks/profile_step.py --malloc system   # glibc's defaults: see the page faults

For each library (the same network, tasks and Adam step as benchmarks/speed.py) it runs ``--steps`` steps under
``torch.profiler`` and prints, per step: the operators' own time added up, the part in convolutions
(``mkldnn_convolution``, ``convolution_backward`` and ``_convolution``'s own time), the number of convolution
kernel calls, and, from ``getrusage`` over the same steps without the profiler, the minor page faults and the system
time. docs/speed.md quotes it.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (puts the checkout on sys.path)

import torch  # noqa: E402

from lit_meta.allocator import tune_cpu_allocator  # noqa: E402

CONVOLUTION = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution")
METHODS = [speed.Method("ours MAML vmap", "lit_meta"), speed.Method("l2l MAML", "l2l")]


def profile(method: speed.Method, setting: speed.Setting, steps: int) -> dict[str, float]:
    device = torch.device("cpu")
    step, _ = speed.make_step(method, setting, speed.make_batch(setting, device), device)
    step()  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    return {
        "op_s": sum(e.self_cpu_time_total for e in events) / 1e6 / steps,
        "conv_s": sum(e.self_cpu_time_total for e in events if e.key in CONVOLUTION) / 1e6 / steps,
        "conv_calls": sum(e.count for e in events if e.key == "aten::mkldnn_convolution") / steps,
        "faults": (after.ru_minflt - before.ru_minflt) / steps,
        "sys_s": (after.ru_stime - before.ru_stime) / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--malloc", choices=["tuned", "system"], default="tuned")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    args = parser.parse_args()
    tuned = args.malloc == "tuned" and tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, malloc {'tuned' if tuned else 'system defaults'}, {args.steps} steps; per step:")
    print(f"{'setting':<12} {'method':<16} {'op time s':>9} {'conv s':>7} {'conv calls':>10} {'minor faults':>12} {'sys s':>6}")
    for setting in speed.settings(None, args.quick):
        for method in METHODS:
            r = profile(method, setting, args.steps)
            print(
                f"{setting.name:<12} {method.name:<16} {r['op_s']:9.3f} {r['conv_s']:7.3f} {r['conv_calls']:10.0f} "
                f"{r['faults']:12.0f} {r['sys_s']:6.2f}"
            )


if __name__ == "__main__":
    main()
