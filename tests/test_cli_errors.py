"""Bad input to ``python -m lit_meta`` ends in one ``error: ...`` line and exit status 2: never a traceback, and never
a file left half-written.

Every case runs the command line's own entry point (``lit_meta.cli.main``) in this process, the code path of
``python -m lit_meta`` without paying for a new interpreter per case; a few run as real subprocesses to show the
whole property (exit status, stderr) end to end. Most cases fail before any training; those that need a run to start
train the default job (``lit_meta/default.yaml``, data shipped in the package) or a sinusoid for one step.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import datamodules.omniglot as omniglot
from lit_meta.cli import main, user_error

REPO = Path(__file__).resolve().parents[1]
SINUSOID = str(REPO / "configs" / "sinusoid_maml.yaml")
#: Gets a run as far as its first step and no further (nor into the test after fit).
ONE_STEP = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--test_after_fit=false", "--media=false"]


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of every kind a user may hand to ``--ckpt_path``."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}
    # Real ones, written by the command line after one step: the default job (ProtoNet) and MAML on sinusoids.
    for name, config in (("protonet", []), ("maml", ["--config", SINUSOID])):
        main(["fit", *config, *ONE_STEP, "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root / name}"])
        made[name] = root / name / "checkpoints" / "last.ckpt"
    good = made["protonet"].read_bytes()
    made["truncated"] = root / "truncated.ckpt"  # an interrupted copy
    made["truncated"].write_bytes(good[: len(good) // 2])
    made["text"] = root / "notes.ckpt"
    made["text"].write_text("not a checkpoint\n")
    made["no_state_dict"] = root / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, made["no_state_dict"])
    # A Lightning checkpoint that no lit_meta model wrote: no lit_meta record, no LightningCLI class path.
    foreign = torch.load(made["protonet"], weights_only=True)
    foreign.pop("lit_meta")
    foreign["hyper_parameters"] = {"lr": 0.1}
    made["foreign"] = root / "foreign.ckpt"
    torch.save(foreign, made["foreign"])
    made["folder"] = root
    return made


class Handler(http.server.BaseHTTPRequestHandler):
    """``/ok/<file>``: 200 with a body; ``/cut/<file>``: announces 100 kB, sends 1 kB and hangs up; else 404."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        Handler.requests.append(self.path)
        if self.path.startswith("/ok/"):
            body = served(self.path.rsplit("/", 1)[-1])
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/cut/"):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404)

    def log_message(self, *args) -> None:
        pass


def served(name: str) -> bytes:
    return f"the bytes of {name}\n".encode() * 100


@pytest.fixture(scope="module")
def server():
    """A local HTTP server (this test suite never reaches the internet)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------------ checks
def leftovers(folder: Path) -> list[str]:
    """Files a failed command must not leave: temp files of atomic writes, partial downloads, checkpoints."""
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and (path.suffix in (".part", ".tmp", ".ckpt") or ".part" in path.name or ".tmp" in path.name)
    )


def error_line(stderr: str) -> str:
    """The one ``error:`` line of ``stderr``, after checking it is alone and nothing shows a traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] == errors[0], "the error is the last thing printed"
    return errors[0]


def fill(args: list[str], checkpoints: dict[str, Path], server: str) -> list[str]:
    names = {**{k: str(v) for k, v in checkpoints.items()}, "server": server, "closed": f"http://127.0.0.1:{closed_port()}"}
    return [arg.format(**names) for arg in args]


# ------------------------------------------------------------------------------------------------------- cases
CASES = [
    # Lightning's own validation of the Trainer's arguments (raised while the Trainer is built).
    ("bad-duration", ["fit", "--trainer.max_time=00:00:8:00"], "--trainer: `Timer(duration='00:00:8:00')` is not a valid duration"),
    ("precision-name", ["fit", "--trainer.precision=fp33"], 'Parser key "trainer.precision"'),
    ("unknown-accelerator", ["fit", "--trainer.accelerator=foo"], "invalid accelerator name"),
    ("absent-accelerator", ["fit", "--trainer.accelerator=tpu"], "--trainer: "),
    ("zero-devices", ["fit", "--trainer.devices=0"], "devices"),
    ("devices-not-a-number", ["fit", "--trainer.devices=abc"], "devices"),
    ("unknown-strategy", ["fit", "--trainer.strategy=foo"], "invalid strategy name"),
    ("negative-max-steps", ["fit", "--trainer.max_steps=-5"], "`max_steps` must be a non-negative integer"),
    ("negative-limit", ["fit", "--trainer.limit_val_batches=-1"], "invalid value -1.0 for limit_val_batches"),
    ("limit-above-one", ["fit", "--trainer.limit_train_batches=1.5"], "invalid value 1.5 for limit_train_batches"),
    ("zero-nodes", ["fit", "--trainer.num_nodes=0"], "`num_nodes` must be a positive integer"),
    ("unknown-trainer-flag", ["fit", "--trainer.no_such_flag=1"], "no_such_flag"),
    ("not-an-int", ["fit", "--trainer.max_epochs=many"], 'Parser key "trainer.max_epochs"'),
    # Values Lightning accepts but that would fail (or be meaningless) once training runs.
    ("zero-val-every", ["fit", "--trainer.check_val_every_n_epoch=0"], "check_val_every_n_epoch must be a positive integer"),
    ("zero-log-every", ["fit", "--trainer.log_every_n_steps=0"], "log_every_n_steps must be a positive integer"),
    # Lightning's checks when the run starts: these get as far as fit.
    ("val-interval", ["fit", "--config", SINUSOID, "--data.init_args.train_batches=5", "--trainer.val_check_interval=10", *ONE_STEP[:1]], "`val_check_interval` (10) must be less than or equal to the number of the training batches (5)"),
    ("clipping-manual", ["fit", "--config", SINUSOID, "--trainer.gradient_clip_val=1", *ONE_STEP], "Automatic gradient clipping is not supported for manual optimization"),
    ("accumulation-manual", ["fit", "--config", SINUSOID, "--trainer.accumulate_grad_batches=2", *ONE_STEP], "Automatic gradient accumulation is not supported"),
    ("callback-option", ["fit", "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_top_k=-5"], "Invalid value for save_top_k=-5"),
    # torch's own validation: the optimizer's hyper-parameters, a device name.
    ("negative-lr", ["fit", "--config", SINUSOID, "--model.init_args.optimizer.init_args.lr=-1", *ONE_STEP], "Invalid learning rate: -1.0"),
    ("device-name", ["fit", "--data.init_args.device=gpu0"], "device must be a torch device"),
    # The model and the data.
    ("too-many-ways", ["fit", "--data.init_args.train_ways=1000", *ONE_STEP], "1000-way tasks need 1000 classes but the train split has 202"),
    ("missing-root", ["fit", "--data.init_args.root=/nonexistent/omniglot", "--data.init_args.split=vinyals"], "root /nonexistent/omniglot does not exist"),
    ("native-batchnorm", ["fit", "--config", SINUSOID, "--model.init_args.backbone=torch.nn.BatchNorm1d", "--model.init_args.backbone.init_args.num_features=1"], "MAML: the backbone's BatchNorm1d layer (the backbone itself) gives wrong second-order gradients under vmap"),
    ("unknown-model-option", ["fit", "--model.init_args.vectorize=maybe"], 'Parser key "vectorize"'),
    # --ckpt_path.
    ("best-in-a-new-process", ["validate", "--ckpt_path", "best"], "--ckpt_path best refers to a fit in the same process"),
    ("last-in-a-new-process", ["test", "--ckpt_path", "last"], "--ckpt_path last refers to a fit in the same process"),
    ("fit-missing-checkpoint", ["fit", "--ckpt_path", "missing.ckpt"], "checkpoint missing.ckpt does not exist"),
    ("test-missing-checkpoint", ["test", "--ckpt_path", "missing.ckpt"], "checkpoint missing.ckpt does not exist"),
    ("checkpoint-folder", ["test", "--ckpt_path", "{folder}"], "is a folder; give the .ckpt file inside it"),
    ("truncated-checkpoint", ["test", "--ckpt_path", "{truncated}"], "cannot read checkpoint"),
    ("fit-truncated-checkpoint", ["fit", "--ckpt_path", "{truncated}"], "cannot read checkpoint"),
    ("text-as-checkpoint", ["validate", "--ckpt_path", "{text}"], "cannot read checkpoint"),
    ("no-state-dict", ["predict", "--ckpt_path", "{no_state_dict}"], "is not a Lightning checkpoint (no state_dict)"),
    ("foreign-checkpoint", ["test", "--ckpt_path", "{foreign}"], "records no lit_meta algorithm"),
    ("fit-foreign-checkpoint", ["fit", "--ckpt_path", "{foreign}"], "records no lit_meta algorithm"),
    ("other-algorithm", ["test", "--ckpt_path", "{maml}", "--model", "ProtoNet"], "was written by MAML, not ProtoNet"),
    ("fit-other-algorithm", ["fit", "--ckpt_path", "{maml}"], "was written by MAML, not ProtoNet: fit resumes a run"),
    ("checkpoint-misfit", ["test", "--ckpt_path", "{protonet}", "--model.init_args.backbone.init_args.hidden=32"], "the checkpoint does not fit the model the flags build: size mismatch"),
    # download: an unknown dataset, no server, an error status, a transfer cut short, a bad mirror, a wrong file.
    ("download-unknown-dataset", ["download", "mnist"], "invalid choice: 'mnist'"),
    ("download-refused", ["download", "omniglot", "--root", "data", "--mirror", "{closed}"], "refused"),
    ("download-not-found", ["download", "omniglot", "--root", "data", "--mirror", "{server}/gone"], "HTTP 404"),
    ("download-cut", ["download", "omniglot", "--root", "data", "--mirror", "{server}/cut"], "the download of {server}/cut/images_background.zip broke off after 1000 of 100000 bytes"),
    ("download-bad-mirror", ["download", "omniglot", "--root", "data", "--mirror", "mirror.example"], "unknown url type"),
    ("download-wrong-file", ["download", "omniglot", "--root", "data", "--mirror", "{server}/ok"], "expected 68d2efa1b9178cc56df9314c21c6e718"),
    ("download-timeout", ["download", "omniglot", "--timeout", "0"], "--timeout must be positive"),
]


def test_there_are_enough_cases():
    assert len(CASES) >= 25 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("args, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_gives_one_error_line(tmp_path, monkeypatch, capsys, checkpoints, server, args, message):
    monkeypatch.chdir(tmp_path)
    args, message = fill(args, checkpoints, server), fill([message], checkpoints, server)[0]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    line = error_line(capsys.readouterr().err)
    assert message in line, line
    assert leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------------- end to end
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # The checkout's own packages, whatever is installed; one thread, as in-process (conftest).
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("LIT_META_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lit_meta", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--trainer.max_time=00:00:8:00"], "is not a valid duration"),
        (["test", "--ckpt_path", "{truncated}"], "cannot read checkpoint"),
        (["download", "omniglot", "--root", "data/omniglot", "--mirror", "{server}/cut"], "broke off after 1000 of 100000 bytes"),
    ],
    ids=["trainer-value", "truncated-checkpoint", "interrupted-download"],
)
def test_bad_input_in_a_real_process(tmp_path, checkpoints, server, args, message):
    result = run_cli(*fill(args, checkpoints, server), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in error_line(result.stderr)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------- download
def test_download_fetches_atomically_and_skips_what_is_there(tmp_path, monkeypatch, capsys, server):
    official = dict(omniglot.DOWNLOADS)
    monkeypatch.setattr(
        omniglot, "DOWNLOADS", {name: (url, hashlib.md5(served(f"{name}.zip")).hexdigest()) for name, (url, _) in official.items()}
    )
    root = tmp_path / "data" / "omniglot"
    Handler.requests.clear()
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "omniglot", "--root", str(root), "--mirror", f"{server}/ok"])
    assert exit_info.value.code == 0
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    assert (root / "images_evaluation.zip").read_bytes() == served("images_evaluation.zip")
    assert Handler.requests == ["/ok/images_background.zip", "/ok/images_evaluation.zip"]
    # Again: nothing to fetch. An extracted folder counts as present too.
    (root / "images_evaluation.zip").unlink()
    (root / "images_evaluation").mkdir()
    with pytest.raises(SystemExit):
        main(["download", "omniglot", "--root", str(root), "--mirror", f"{server}/ok"])
    out = capsys.readouterr().out
    assert "images_background: already in" in out and "images_evaluation: already in" in out
    assert len(Handler.requests) == 2


def test_an_interrupted_download_leaves_nothing(tmp_path, monkeypatch, capsys):
    from datamodules.download import download

    class Interrupting:
        headers: dict = {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, size):
            raise KeyboardInterrupt  # Ctrl-C in the middle of the transfer

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: Interrupting())
    with pytest.raises(KeyboardInterrupt):
        download("http://127.0.0.1/x.zip", tmp_path / "x.zip")
    assert list(tmp_path.iterdir()) == []
    # Through the command line: one line, the usual exit status of an interrupted program, no file.
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "omniglot", "--root", str(tmp_path / "omniglot")])
    assert exit_info.value.code == 130
    assert error_line(capsys.readouterr().err) == "error: interrupted"
    assert list((tmp_path / "omniglot").iterdir()) == []


def test_help_lists_download_and_download_help_is_plain_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "download" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lit_meta download") and "--mirror" in out and "all_runs.zip" in out


# ------------------------------------------------------------------------------------------------ real bugs
def test_a_real_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    import lit_meta.cli as cli

    def broken(trainer):
        raise ValueError("a bug in lit_meta, not bad input")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "check_trainer", broken)
    with pytest.raises(ValueError, match="a bug in lit_meta"):
        main(["fit"])
    assert "error:" not in capsys.readouterr().err


def test_errors_are_told_apart_by_where_they_are_raised():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    def raised(make):
        try:
            make()
        except Exception as err:  # noqa: BLE001 (the point is to look at it)
            return err

    assert user_error(raised(lambda: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=-1))) == "Invalid learning rate: -1"

    def our_code():
        raise MisconfigurationException("raised outside Lightning's validating code")

    assert user_error(raised(our_code)) is None
    assert user_error(raised(lambda: int("x"))) is None


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIT_META_DEBUG", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--trainer.max_time=00:00:8:00"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" in stderr and "MisconfigurationException" in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [stderr.rstrip().splitlines()[-1]]
