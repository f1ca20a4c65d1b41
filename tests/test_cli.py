"""The command line: a short real run, and one-line errors for bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_meta.cli import main

REPO = Path(__file__).resolve().parents[1]
SINUSOID = REPO / "configs" / "sinusoid_maml.yaml"


def run_cli(*args, cwd):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "lit_meta", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_fit_then_test_sinusoid(tmp_path):
    result = run_cli(
        "fit",
        "--config",
        str(SINUSOID),
        "--trainer.max_epochs=2",
        "--data.init_args.train_batches=150",
        "--data.init_args.test_episodes=100",
        # 300 steps of the config's K=5 are too few for adaptation to pay; K=10 gets there in that budget
        "--data.init_args.shots=10",
        "--data.init_args.train_queries=10",
        "--trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = {p.name for p in (tmp_path / "runs").rglob("*.ckpt")}
    assert "last.ckpt" in ckpts and any(name.startswith("best-") for name in ckpts)
    # fit tests the best checkpoint afterwards: adaptation must already beat the unadapted initialization
    metrics = (next((tmp_path / "runs").rglob("metrics.csv"))).read_text().splitlines()
    header = metrics[0].split(",")
    last = [row.split(",") for row in metrics[1:] if row.split(",")[header.index("test/mse")]][-1]
    post, pre = float(last[header.index("test/mse")]), float(last[header.index("test/mse_pre")])
    assert post < 0.7 * pre


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--config", "missing.yaml"], "missing.yaml"),
        (["fit", "--config", "{bad"], "error"),
        (["fit", "--config", str(SINUSOID), "--model.init_args.no_such_key=1"], "no_such_key"),
        (["fit", "--config", str(SINUSOID), "--data.init_args.shots=0"], "shots must be a positive integer"),
        (["fit", "--config", str(SINUSOID), "--data.init_args.queries=-3"], "queries must be a positive integer"),
        (["fit", "--config", str(SINUSOID), "--model.init_args.inner_steps=-1"], "inner_steps must be a non-negative integer"),
        (["fit", "--config", str(SINUSOID), "--model=lit_meta.NoSuchAlgorithm"], "NoSuchAlgorithm"),
        (["fit", "--config", str(SINUSOID), "--data=datamodules.NoSuchData"], "NoSuchData"),
    ],
    ids=["missing-config", "malformed-config", "unknown-key", "zero-shots", "negative-queries", "negative-steps", "unknown-model", "unknown-data"],
)
def test_bad_input_gives_one_line_error(tmp_path, monkeypatch, capsys, args, message):
    # In-process (same code path as ``python -m lit_meta``, without paying for a new interpreter per case).
    monkeypatch.chdir(tmp_path)
    if args[-1] == "{bad":
        bad = tmp_path / "bad.yaml"
        bad.write_text("model: [unclosed\n  : :")
        args = ["fit", "--config", str(bad)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert lines[-1].startswith("error: "), stderr[-2000:]
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1
    assert message in error_lines[0], error_lines[0]


def test_print_config_lists_meta_learning_defaults(tmp_path):
    result = run_cli("fit", "--config", str(SINUSOID), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "inference_mode: false" in result.stdout
    assert "class_path: lit_meta.MAML" in result.stdout or "class_path: lit_meta.algorithms.maml.MAML" in result.stdout


def test_progress_in_a_log_file_is_a_few_lines(tmp_path):
    # Standard output to a file, as under nohup or a job scheduler: lines every log_every_n_steps, not a redrawn bar.
    log = tmp_path / "train.log"
    env = dict(
        os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )  # fmt: skip
    steps = 40
    with open(log, "w") as out:
        result = subprocess.run(
            [
                sys.executable, "-m", "lit_meta", "fit", "--config", str(SINUSOID),
                f"--trainer.max_steps={steps}", "--trainer.log_every_n_steps=10", "--data.init_args.train_batches=20",
                "--data.init_args.val_episodes=4", "--test_after_fit=false", "--media=false",
            ],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    for step in (10, 20, 30, 40):
        assert any(line.startswith(f"epoch {(step - 1) // 20} step {step} ") and "train/loss" in line for line in lines), text
    assert sum(line.startswith("validation epoch") and "val/mse" in line for line in lines) == 2, text
    assert len(text) / steps < 100, f"{len(text) / steps:.0f} bytes per step"


def test_evaluation_flags_override_the_checkpoint_and_fit_resumes_through_the_cli(tmp_path, monkeypatch):
    from lightning.pytorch import Trainer

    monkeypatch.chdir(tmp_path)
    one_step = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--media=false", "--test_after_fit=false"]
    main(["fit", "--config", str(SINUSOID), "--trainer.max_steps=2", "--trainer.limit_val_batches=0", *one_step])
    last = tmp_path / "checkpoints" / "last.ckpt"
    # fit --ckpt_path resumes the run (Lightning's own handling of the checkpoint's hyper-parameters).
    main(["fit", "--config", str(SINUSOID), "--ckpt_path", str(last), "--trainer.max_steps=3", "--trainer.limit_val_batches=0", *one_step])
    assert torch.load(last, weights_only=True)["global_step"] == 3

    seen = []
    monkeypatch.setattr(Trainer, "test", lambda self, model, datamodule=None, ckpt_path=None, **kw: seen.append((type(model).__name__, model.eval_inner_steps, ckpt_path)))
    # The model comes from the checkpoint; a flag still wins over the checkpoint's value, and the checkpoint's path
    # reaches Trainer.test.
    main(["test", "--ckpt_path", str(last), "--data", "datamodules.SinusoidDataModule", "--model.init_args.eval_inner_steps=7"])
    main(["test", "--ckpt_path", str(last), "--data", "datamodules.SinusoidDataModule"])
    recorded = torch.load(last, weights_only=True)["hyper_parameters"]["eval_inner_steps"]
    assert seen == [("MAML", 7, str(last)), ("MAML", recorded, str(last))] and recorded != 7
