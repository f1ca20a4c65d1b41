"""The reproduction table: every config in ``configs/`` beside the paper's number, from recorded full-schedule runs.

    python benchmarks/reproduce.py render                 # writes docs/reproduce.md from the configs and the records
    python benchmarks/reproduce.py render --check         # exit 1 if docs/reproduce.md is out of date
    python benchmarks/reproduce.py release runs/.../checkpoints/best-13-14000.ckpt benchmarks/results/<name>/
    python benchmarks/reproduce.py evaluate configs/omniglot_protonet_5w1s.yaml CKPT --root data/omniglot \\
        --steps 20000 --device "1 CPU thread" --hours 8.7 --selection "best validation (step 14,000)"

``release`` copies a finished run's checkpoint into the repository without its optimizer state (which only resuming
needs: ``test``, ``predict``, ``load_model`` and ``init_from`` read the weights, hyper-parameters and loop state).

``evaluate`` tests a checkpoint on the config's fixed test episodes (the same episodes, protocol and values as
``python -m lit_meta test --config CONFIG --ckpt_path CKPT``), prints the result and records it in
``benchmarks/reproduction.yaml`` (one entry per config: the paper, its number and protocol, and our results).
``--normalization`` / ``--eval-inner-steps`` / ``--queries`` evaluate under another protocol than the config's, and
``--evaluator`` / ``--feature-transform`` choose a pre-trained network's few-shot evaluator; the row then says so.
``--values FILE`` records per-episode values that ``benchmarks/compare.py --save`` wrote for the checkpoint, after
evaluating its first episodes again. ``render`` turns the records into ``docs/reproduce.md``, so the table cannot
drift from them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIGS = REPO / "configs"
RECORDS = REPO / "benchmarks" / "reproduction.yaml"
TABLE = REPO / "docs" / "reproduce.md"
# Test-time settings a result may override, as (record key, model or data init_args key).
MODEL_OVERRIDES = {
    "normalization": "normalization",
    "eval_inner_steps": "eval_inner_steps",
    # A pre-trained network's few-shot evaluator: a checkpoint stores the one it was validated with.
    "evaluator": "evaluator",
    "feature_transform": "feature_transform",
}
DATA_OVERRIDES = {"queries": "queries"}


def load_records(path: Path = RECORDS) -> dict[str, dict[str, Any]]:
    """The recorded entries, keyed by config file name."""
    return yaml.safe_load(path.read_text()) or {}


def read_config(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


def schedule_steps(config: dict[str, Any], entry: dict[str, Any] | None = None) -> int:
    """Optimizer steps of a config's full schedule: the record's ``schedule_steps`` where it gives them (a
    ``train_mode: batches`` epoch is as long as the dataset, which the config does not say), else from the config."""
    if entry and entry.get("schedule_steps"):
        return int(entry["schedule_steps"])
    trainer = config.get("trainer") or {}
    if trainer.get("max_steps") not in (None, -1):
        return int(trainer["max_steps"])
    data = config["data"]["init_args"]
    return int(trainer.get("max_epochs", 1)) * int(data.get("train_batches", 1000))


def protocol_text(config: dict[str, Any], result: dict[str, Any] | None = None) -> str:
    """Split, test episode shape, normalization, inner steps and episode count of a config (with a result's overrides)."""
    result = result or {}
    data = dict(config["data"]["init_args"])
    model = dict(config["model"]["init_args"])
    for key, arg in DATA_OVERRIDES.items():
        if result.get(key) is not None:
            data[arg] = result[key]
    for key, arg in MODEL_OVERRIDES.items():
        if result.get(key) is not None:
            model[arg] = result[key]
    dataset = config["data"]["class_path"].rpartition(".")[2].replace("DataModule", "")
    if dataset == "Sinusoid":
        parts = [f"K={data.get('shots', 10)}, {data.get('queries', 10)} query points"]
    elif dataset == "Rollout":
        parts = [f"{data.get('environment', 'navigation2d')}, average return per task"]
        steps = int(model.get("eval_inner_steps", 3))
        lrs = model.get("eval_inner_lrs") or [model.get("inner_lr", 0.1)] * steps
        if steps:
            parts.append(f"step sizes {', '.join(f'{lr:g}' for lr in lrs)}")
    else:
        split = f" {data['split']} split" if data.get("split") else ""
        queries = data.get("queries", 15)
        shape = f"{data.get('ways', 5)}-way {data.get('shots', 1)}-shot, {queries} quer{'y' if queries == 1 else 'ies'}/class"
        parts = [f"{dataset}{split}", shape]
        parts.append(f"{model.get('normalization', 'transductive')} norm")
        if model.get("evaluator"):
            transform = model.get("feature_transform", "none")
            parts.append(f"{model['evaluator'].replace('_', ' ')}" + (f" on {transform} features" if transform != "none" else ""))
    if "eval_inner_steps" in model or "inner_steps" in model:
        parts.append(f"{model.get('eval_inner_steps', model.get('inner_steps'))} inner steps")
    parts.append(f"{data.get('test_episodes', 600):,} {'test tasks' if dataset == 'Rollout' else 'episodes'}")
    return ", ".join(parts)


def _number(value: float, ci: float, metric: str) -> str:
    if metric == "acc":
        return f"{100 * value:.2f} ± {100 * ci:.2f}%"
    if metric.startswith("return_"):
        return f"{value:.2f} ± {ci:.2f}"
    return f"{value:.3f} ± {ci:.3f}"


def _steps(metric: str) -> str:
    """``return_k`` in words: the return after ``k`` adaptation steps."""
    k = int(metric.removeprefix("return_"))
    return "before adaptation" if k == 0 else f"after {k} step{'s' if k > 1 else ''}"


def returns_text(returns: dict[str, list[float]]) -> str:
    """A policy's test returns at every number of adaptation steps, in order, and (where recorded) each step's gain
    over the return before adaptation, paired over the tasks."""
    def ordered(prefix: str) -> list[tuple[str, list[float]]]:
        return sorted(((k, v) for k, v in returns.items() if k.startswith(prefix)), key=lambda kv: int(kv[0][len(prefix):]))

    text = "; ".join(f"{_steps(k)} {_number(m, c, k)}" for k, (m, c) in ordered("return_"))
    gains = ordered("gain_")
    if gains:
        text += ". Gain over before adaptation (paired): " + "; ".join(
            f"{_steps('return_' + k[5:])} {m:+.2f} ± {c:.2f}" for k, (m, c) in gains
        )
    return text


def result_command(name: str, result: dict[str, Any]) -> str:
    """The ``python -m lit_meta test`` command that reproduces a recorded result."""
    parts = [f"python -m lit_meta test --config configs/{name}", f"--ckpt_path {result['checkpoint']}"]
    for key, arg in MODEL_OVERRIDES.items():
        if result.get(key) is not None:
            parts.append(f"--model.init_args.{arg} {result[key]}")
    for key, arg in DATA_OVERRIDES.items():
        if result.get(key) is not None:
            parts.append(f"--data.init_args.{arg} {result[key]}")
    return " ".join(parts)


def release(source: Path, destination: Path) -> Path:
    """Write ``source`` without its optimizer state to ``destination`` (a file, or a folder to keep the name in)."""
    import torch

    target = destination / source.name if destination.is_dir() else destination
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    checkpoint["optimizer_states"] = []
    tmp = target.with_name(target.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(target)
    return target


def released_size(records: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """``(files, bytes)`` of the distinct checkpoints the records name."""
    paths = {r["checkpoint"] for entry in records.values() for r in entry.get("results") or []}
    return len(paths), sum((REPO / p).stat().st_size for p in paths if (REPO / p).is_file())


def render(records: dict[str, dict[str, Any]]) -> str:
    """``docs/reproduce.md`` from the records and the configs (every config, in name order)."""
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    missing = [n for n in names if n not in records]
    if missing:
        raise SystemExit(f"error: benchmarks/reproduction.yaml has no entry for {', '.join(missing)}: add one")
    run = sum(1 for n in names if records[n].get("results"))
    files, size = released_size(records)
    lines = [
        "# Reproductions",
        "",
        "Every config in `configs/` beside the paper it follows. *Ours* is the config's full schedule through the command",
        "line (`python -m lit_meta fit --config ...`), its checkpoint tested on the config's fixed test episodes: mean ±",
        "95% confidence interval (Student's t) over the episodes. The protocol columns name what the number depends on:",
        "split, test episode shape, normalization at test (see the README's evaluation protocol), inner steps at test,",
        "episode count, and which checkpoint was tested. Checkpoints listed are in the repository; the command under each",
        "row reproduces its number on the real data (`--data.init_args.root` pointing at it).",
        "",
        "This file is generated by `python benchmarks/reproduce.py render` from `benchmarks/reproduction.yaml` and the",
        "configs; `python benchmarks/reproduce.py evaluate ...` records a result. For a config without a result,",
        "`python benchmarks/estimate.py configs/<name>.yaml --synthetic` measures what its schedule takes on your machine",
        "(`--device cuda` on a GPU). The image configs train on a GPU when there is one (`accelerator: auto`), so",
        "`python -m lit_meta fit --config configs/<name>.yaml` is also the GPU command; the sinusoid and",
        "reinforcement-learning configs set `accelerator: cpu`.",
        "",
        f"{run} of {len(names)} configs have a full-schedule result.",
        "",
        f"The {files} checkpoints the table names take {size / 1e6:.1f} MB in all (weights without optimizer state:",
        "`python benchmarks/reproduce.py release`).",
        "",
        "| config | paper | published (paper's protocol) | ours | our protocol | schedule, device, time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    details: list[str] = []
    for name in names:
        entry, config = records[name], read_config(name)
        published = f"{entry['published']} ({entry['paper_protocol']})"
        results = entry.get("results") or []
        if not results:
            lines.append(
                f"| `{name}` | {entry['paper']} | {published} | not run | {protocol_text(config)} | "
                f"{schedule_steps(config, entry):,} steps; {entry['estimate']} |"
            )
            continue
        for result in results:
            metric = result.get("metric", "acc")
            ours = f"**{_number(result['value'], result['ci'], metric)}**"
            if metric.startswith("return_"):
                ours += f" ({_steps(metric)})"
            protocol = f"{protocol_text(config, result)}; {result['selection']}"
            where = f"{result['steps']:,} of {schedule_steps(config, entry):,} steps; {result['device']}, {result['hours']:g} h"
            lines.append(f"| `{name}` | {entry['paper']} | {published} | {ours} | {protocol} | {where} |")
            details.append(f"- `{name}` ({protocol_text(config, result)}): `{result_command(name, result)}`")
            if result.get("returns"):
                details.append(f"  Test returns: {returns_text(result['returns'])}.")
            if result.get("note"):
                details.append(f"  {result['note']}")
    lines += ["", "## Commands and checkpoints", "", *details, ""]
    notes = [f"- `{n}`: {records[n]['note']}" for n in names if records[n].get("note")]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def build_datamodule(config: dict[str, Any], root: str | None, **overrides: Any) -> Any:
    """The config's datamodule, with ``root`` and any init-arg overrides."""
    module_name, _, class_name = config["data"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    init_args = dict(config["data"]["init_args"])
    if root is not None and "root" in init_args:
        init_args["root"] = root
    init_args.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**init_args)


EPISODES_SUFFIX = ".episodes.pt"


def episode_source(config_name: str) -> dict[str, Any]:
    """What fixes a config's test episodes: its data section, less the dataset folder."""
    data = dict(read_config(config_name)["data"])
    data["init_args"] = {k: v for k, v in data.get("init_args", {}).items() if k != "root"}
    return data


def saved_values(path: str, config_name: str) -> dict[str, Any]:
    """Per-episode test values saved by ``benchmarks/compare.py --save``, checked to be on ``config_name``'s episodes."""
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["episodes"] != episode_source(config_name):
        raise SystemExit(f"error: {path} was evaluated on {saved['config']}'s test episodes, which differ from"
                         f" {config_name}'s; use it with a config that has the same data section")
    return saved["values"]


# The test suite re-evaluates every record on the first test episodes that hold about this many query predictions:
# enough that one prediction rounding the other way on another CPU moves the mean by at most 0.001, few enough that
# the suite stays short.
CHECK_PREDICTIONS = 1000


def check_episodes(data: dict[str, Any]) -> int:
    """How many of the first test episodes the test suite re-checks for a record on these data init args."""
    if "ways" not in data and "shots" not in data and "queries" not in data:
        # Reinforcement-learning tasks: a return is not a count of right predictions, so every test task is checked
        # (on navigation that takes seconds).
        return int(data.get("test_episodes", 600))
    per_episode = int(data.get("ways", 1)) * int(data.get("queries", 15))
    return -(-CHECK_PREDICTIONS // per_episode)


def primary_metric(values: dict[str, Any], datamodule: Any) -> str:
    """The value a row reports: accuracy, the sinusoid's MSE, or for policies the return the datamodule selects
    checkpoints on (after one adaptation step; before adaptation for the oracle)."""
    for metric in ("acc", "mse"):
        if metric in values:
            return metric
    return datamodule.validation_metric[0].removeprefix("val/")


def check_key(result: dict[str, Any]) -> str:
    """The record's ``first_<n>`` key: the mean over the first ``n`` test episodes."""
    return next(key for key in result if key.startswith("first_"))


def evaluate(
    name: str,
    checkpoint: str,
    root: str | None,
    overrides: dict[str, Any],
    episodes: int | None = None,
    values_file: str | None = None,
) -> tuple[float, float, str, int, float, dict[str, list[float]]]:
    """``(mean, ci, metric, n, mean of the first n episodes, every metric's [mean, ci])`` of ``checkpoint`` on the
    config's test episodes, under its protocol and ``overrides`` (``episodes``: only that many; the tests check the
    first ``n`` against the record, ``n`` from :func:`check_episodes`).

    ``values_file``: per-episode values the checkpoint already gave (``benchmarks/compare.py --save``), used instead
    of a full evaluation once its first episodes are evaluated again and agree.
    """
    import torch

    from lit_meta import load_model
    from lit_meta.evaluation import episode_values
    from lit_meta.metrics import mean_confidence_interval

    config = read_config(name)
    model_overrides = {arg: overrides[key] for key, arg in MODEL_OVERRIDES.items() if overrides.get(key) is not None}
    model = load_model(checkpoint, map_location="cpu", **model_overrides)
    data_overrides = {arg: overrides.get(key) for key, arg in DATA_OVERRIDES.items()}
    n = check_episodes({**config["data"]["init_args"], **{k: v for k, v in data_overrides.items() if v is not None}})
    # A test episode is seeded by its index alone, so evaluating a few of them in smaller batches gives the same ones.
    batch = int(config["data"]["init_args"].get("eval_meta_batch_size", 16))
    part = episodes if values_file is None else n
    if part is not None and part < batch:
        data_overrides["eval_meta_batch_size"] = part
    datamodule = build_datamodule(config, root, **data_overrides)
    if values_file is None:
        values = episode_values(model, datamodule, "test", episodes=episodes)
    else:
        if model_overrides or any(overrides.get(key) is not None for key in DATA_OVERRIDES):
            raise SystemExit("error: saved values hold one protocol, the config's; evaluate the checkpoint to override it")
        values = saved_values(values_file, name)
        held, expected = len(next(iter(values.values()))), int(config["data"]["init_args"].get("test_episodes", 600))
        if held != expected:
            raise SystemExit(f"error: {values_file} holds {held} episodes, not the config's {expected}: save it from a"
                             " comparison over all test episodes (no --episodes)")
        again = episode_values(model, datamodule, "test", episodes=n)
        if not all(torch.allclose(again[k], values[k][:n], atol=1e-4) for k in again):
            raise SystemExit(f"error: {values_file} does not hold {checkpoint}'s values (its first {n} episodes differ)")
    metric = primary_metric(values, datamodule)
    if "return_0" in values:
        # What adaptation gains on each task: paired over the same tasks, so the spread of the tasks' difficulty cancels.
        values = {**values, **{f"gain_{k[7:]}": v - values["return_0"] for k, v in values.items() if k.startswith("return_") and k != "return_0"}}
    summary = {key: [round(v, 6) for v in mean_confidence_interval(per_episode)] for key, per_episode in values.items()}
    mean, ci = summary[metric]
    return mean, ci, metric, n, float(values[metric][:n].double().mean()), summary


def record(name: str, result: dict[str, Any], path: Path = RECORDS) -> None:
    """Add ``result`` to the config's entry, replacing one of the same checkpoint and overrides."""
    records = load_records(path)
    if name not in records:
        raise SystemExit(f"error: benchmarks/reproduction.yaml has no entry for {name}: add its paper and protocol first")
    keys = ("checkpoint", *MODEL_OVERRIDES, *DATA_OVERRIDES)
    same = lambda r: all(r.get(k) == result.get(k) for k in keys)  # noqa: E731
    results = [r for r in records[name].get("results") or [] if not same(r)] + [result]
    records[name]["results"] = results
    save_records(records, path)


def save_records(records: dict[str, dict[str, Any]], path: Path = RECORDS) -> None:
    """Write the records through a temporary file and a rename (an interrupted write leaves the old file)."""
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(records, sort_keys=True, allow_unicode=True, width=10**9))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rend = sub.add_parser("render", help="write docs/reproduce.md")
    rend.add_argument("--check", action="store_true", help="only check that docs/reproduce.md is up to date")
    rel = sub.add_parser("release", help="copy a finished run's checkpoint into the repository, without optimizer state")
    rel.add_argument("checkpoint")
    rel.add_argument("destination", help="a file, or a folder to keep the checkpoint's name in")
    ev = sub.add_parser("evaluate", help="test a checkpoint on a config's test episodes and record the result")
    ev.add_argument("config", help="a file in configs/")
    ev.add_argument("checkpoint", help="a checkpoint file in the repository")
    ev.add_argument("--root", default=None, help="the dataset folder (the config's data.init_args.root)")
    ev.add_argument("--normalization", default=None)
    ev.add_argument("--eval-inner-steps", type=int, default=None)
    ev.add_argument("--queries", type=int, default=None)
    ev.add_argument("--evaluator", default=None, help="a pre-trained network's few-shot evaluator (Pretrain)")
    ev.add_argument("--feature-transform", default=None, help="the features that evaluator sees (Pretrain)")
    ev.add_argument("--steps", type=int, required=True, help="training steps the checkpoint's run took")
    ev.add_argument("--device", required=True, help="e.g. '1 CPU thread'")
    ev.add_argument("--hours", type=float, required=True, help="wall time of the training run")
    ev.add_argument("--selection", required=True, help="which checkpoint: e.g. 'best validation (step 14,000)'")
    ev.add_argument("--values", default=None, metavar="FILE",
                    help="the checkpoint's per-episode values saved by benchmarks/compare.py --save (spot-checked)")
    ev.add_argument("--note", default=None)
    ev.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)

    if args.command == "render":
        text = render(load_records())
        if args.check:
            if not TABLE.is_file() or TABLE.read_text() != text:
                raise SystemExit("docs/reproduce.md is out of date: run python benchmarks/reproduce.py render")
            return
        TABLE.write_text(text)
        print(f"wrote {TABLE.relative_to(REPO)}")
        return

    if args.command == "release":
        target = release(Path(args.checkpoint), Path(args.destination))
        print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)")
        return

    name = Path(args.config).name
    checkpoint = Path(args.checkpoint)
    checkpoint = str(checkpoint.resolve().relative_to(REPO)) if checkpoint.resolve().is_relative_to(REPO) else str(checkpoint)
    overrides = {key: getattr(args, key) for key in (*MODEL_OVERRIDES, *DATA_OVERRIDES)}
    mean, ci, metric, n, first, summary = evaluate(name, str(REPO / checkpoint), args.root, overrides, values_file=args.values)
    result = {
        f"first_{n}": round(first, 6),
        "checkpoint": checkpoint,
        "metric": metric,
        "value": round(mean, 6),
        "ci": round(ci, 6),
        "steps": args.steps,
        "device": args.device,
        "hours": args.hours,
        "selection": args.selection,
        **{k: v for k, v in overrides.items() if v is not None},
    }
    if metric.startswith("return_"):
        result["returns"] = {k: v for k, v in summary.items() if k.startswith(("return_", "gain_"))}
    if args.note:
        result["note"] = args.note
    print(f"{name}: {_number(mean, ci, metric)} ({protocol_text(read_config(name), result)})")
    if "returns" in result:
        print(f"  {returns_text(result['returns'])}")
    if not args.no_record:
        record(name, result)


if __name__ == "__main__":
    main()
