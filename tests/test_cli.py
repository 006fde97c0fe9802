"""The `raystudy` command as a user runs it: listings, one-line errors, interrupt and resume."""

from __future__ import annotations

import signal
import subprocess
import sys

import torch

from raystudy.checkpoint import load_model

RAYSTUDY = [sys.executable, "-m", "raystudy"]
TINY = ["train", "--dataset", "synthetic", "--model", "tiny_cnn", "--n-train", "512", "--n-test", "64",
        "--image-size", "16", "--batch-size", "32", "--lr", "0.05", "--deterministic"]


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(RAYSTUDY + list(args), capture_output=True, text=True, timeout=300, **kwargs)


def test_mechanisms_lists_all_thirteen():
    out = run("mechanisms")
    assert out.returncode == 0
    names = [line.split()[0] for line in out.stdout.splitlines()[1:] if line[:1].strip()]
    assert names == ["ST", "MU", "CM", "CO", "LS", "AT", "IR", "JR", "ER", "SAM", "SAM&IR", "SAM&JR", "LGV"]
    assert "1e-05, 0.0001, 0.01, 0.05, 0.1" in out.stdout  # JR's CIFAR-10 grid


def one_line_error(out: subprocess.CompletedProcess, pattern: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raystudy: error:") and pattern in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_bad_mechanism_and_missing_data_are_one_line_errors(tmp_path):
    one_line_error(run(*TINY, "--mechanism", "SAM+JR", "--out", str(tmp_path / "a")), "valid: ST, MU")
    one_line_error(run("train", "--dataset", "cifar10", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")),
                   "is not a folder")
    one_line_error(run(*TINY, "--mechanism", "SAM&JR", "--magnitude", "0.1", "--out", str(tmp_path / "c")),
                   "takes rho, lambda_jr")
    one_line_error(run(*TINY, "--init", str(tmp_path / "missing.pt"), "--mechanism", "LGV", "--out", str(tmp_path / "d")),
                   "does not exist")


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    args = [*TINY, "--mechanism", "SAM", "--epochs", "5", "--seed", "1"]
    assert run(*args, "--out", str(tmp_path / "straight")).returncode == 0
    proc = subprocess.Popen(RAYSTUDY + args + ["--out", str(tmp_path / "cut")], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 2/5"):
            proc.send_signal(signal.SIGINT)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == 130
    resumed = run(*args, "--out", str(tmp_path / "cut"))
    assert resumed.returncode == 0 and "resuming" in resumed.stdout and "epoch 5/5" in resumed.stdout
    a, _ = load_model(tmp_path / "straight" / "model.pt")
    b, _ = load_model(tmp_path / "cut" / "model.pt")
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key
