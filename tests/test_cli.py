"""The `raystudy` command as a user runs it: listings, one-line errors, interrupt and resume."""

from __future__ import annotations

import subprocess

import torch
from conftest import raystudy_here

from raystudy.core.checkpoint import load_model

TINY = [
    "train",
    "--dataset",
    "synthetic",
    "--model",
    "tiny_cnn",
    "--n-train",
    "512",
    "--n-test",
    "64",
    "--image-size",
    "16",
    "--batch-size",
    "32",
    "--lr",
    "0.05",
    "--deterministic",
]


def run(*args) -> subprocess.CompletedProcess:
    return raystudy_here(*args)


def test_mechanisms_lists_the_twelve_and_the_lgv_phase():
    out = run("mechanisms")
    assert out.returncode == 0
    table = out.stdout.split("\n\n")[0]
    names = [line.split()[0] for line in table.splitlines()[1:] if line[:1].strip()]
    assert names == ["ST", "MU", "CM", "CO", "LS", "AT", "IR", "JR", "ER", "SAM", "SAM&IR", "SAM&JR", "LGV"]
    assert "a phase after training, not a mechanism" in out.stdout
    assert "1e-05, 0.0001, 0.01, 0.05, 0.1" in out.stdout  # JR's CIFAR-10 grid


def one_line_error(out: subprocess.CompletedProcess, pattern: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raystudy: error:") and pattern in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_bad_mechanism_and_missing_data_are_one_line_errors(tmp_path):
    one_line_error(run(*TINY, "--mechanism", "SAM+JR", "--out", str(tmp_path / "a")), "valid: ST, MU")
    one_line_error(
        run("train", "--dataset", "cifar10", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")),
        "is not a folder",
    )
    one_line_error(
        run(
            "targets",
            "search_spaces/cpu_targets.yaml",
            "--data",
            str(tmp_path / "nowhere"),
            "--storage",
            str(tmp_path / "results"),
        ),
        "is not a folder on this machine",
    )  # a local study refuses before Ray starts, not with one failed trial per target
    assert not (tmp_path / "results" / "cpu_targets").exists()
    one_line_error(
        run(*TINY, "--mechanism", "SAM&JR", "--magnitude", "0.1", "--out", str(tmp_path / "c")), "takes rho, lambda_jr"
    )
    one_line_error(
        run(*TINY, "--init", str(tmp_path / "missing.pt"), "--mechanism", "LGV", "--out", str(tmp_path / "d")),
        "does not exist",
    )


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    """Ctrl-C after epoch 2 (raised from an epoch hook, so it lands at the same point on any machine):
    exit code 130, then the same command resumes and ends with the uninterrupted run's weights."""
    from raystudy import cli
    from raystudy.training import loop as train_module

    args = TINY[:] + ["--mechanism", "SAM", "--epochs", "5", "--seed", "1"]
    assert cli.main(args + ["--out", str(tmp_path / "straight")]) == 0
    real_train = train_module.train

    def interrupted_after_epoch_2(*a, **kw):
        def hook(record, state_path, model):
            if record["epoch"] == 2:
                raise KeyboardInterrupt

        return real_train(*a, **{**kw, "on_epoch_end": hook})

    monkeypatch.setattr(train_module, "train", interrupted_after_epoch_2)
    capsys.readouterr()
    assert cli.main(args + ["--out", str(tmp_path / "cut")]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    monkeypatch.setattr(train_module, "train", real_train)
    assert cli.main(args + ["--out", str(tmp_path / "cut")]) == 0
    resumed = capsys.readouterr().out
    epochs_run = [line.split()[1] for line in resumed.splitlines() if line.startswith("epoch ")]
    assert "after epoch 2/5" in resumed and epochs_run == ["3/5", "4/5", "5/5"]
    a, _ = load_model(tmp_path / "straight" / "model.pt")
    b, _ = load_model(tmp_path / "cut" / "model.pt")
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key
