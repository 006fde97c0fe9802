"""The training loop: schedule, checkpoints, resume to identical weights, LGV, divergence."""

from __future__ import annotations

import json

import pytest
import torch

from raystudy.config import TrainConfig
from raystudy.core.checkpoint import LGV_DIR, METRICS_FILE, MODEL_FILE, load_model
from raystudy.errors import RaystudyError
from raystudy.training.loop import TrainingDiverged, learning_rate, train


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        dataset="synthetic",
        model="tiny_cnn",
        epochs=4,
        batch_size=32,
        n_train=128,
        n_test=64,
        image_size=16,
        lr=0.05,
        seed=3,
        deterministic=True,
    )
    values.update(overrides)
    return TrainConfig.from_preset("faithful", **values)


def test_presets_and_schedule():
    faithful = TrainConfig.from_preset("faithful")
    assert (faithful.epochs, faithful.batch_size, faithful.lr, faithful.weight_decay, faithful.warmup_epochs) == (
        200,
        128,
        0.1,
        1e-4,
        10,
    )
    assert learning_rate(faithful, 0) == pytest.approx(0.01)
    assert learning_rate(faithful, 9) == pytest.approx(0.1)
    assert learning_rate(faithful, 105) == pytest.approx(0.05)
    assert learning_rate(faithful, 199) < 1e-4
    assert TrainConfig.from_preset("faithful", epochs=40).warmup_epochs == 2  # keeps the warm-up fraction
    # fast = faithful with a fifth of the epochs and finite-difference penalty gradients: every other
    # per-step setting is the published one, and a mechanism without a penalty differs in epochs only.
    fast = TrainConfig.from_preset("fast")
    assert fast.differences(faithful) == ["epochs", "warmup_epochs"]
    assert (fast.epochs, fast.warmup_epochs, fast.penalty_gradient) == (40, 2, "exact")
    for mechanism in ("IR", "JR", "ER", "SAM&IR", "SAM&JR"):
        fast_penalized = TrainConfig.from_preset("fast", mechanism=mechanism)
        faithful_penalized = TrainConfig.from_preset("faithful", mechanism=mechanism)
        assert fast_penalized.differences(faithful_penalized) == ["epochs", "warmup_epochs", "penalty_gradient"]
        assert (fast_penalized.penalty_gradient, faithful_penalized.penalty_gradient) == ("finite_difference", "exact")
        exact = TrainConfig.from_preset("fast", mechanism=mechanism, penalty_gradient="exact")
        assert exact.penalty_gradient == "exact"
    # Nothing is differentiated twice without a penalty: the config records exact, whatever was asked.
    assert TrainConfig(mechanism="SAM", penalty_gradient="finite_difference").penalty_gradient == "exact"
    for preset in ("faithful", "fast"):
        imagenette = TrainConfig.from_preset(preset, dataset="imagenette", model="resnet50")
        assert (imagenette.batch_size, imagenette.lr, imagenette.weight_decay, imagenette.pretrained) == (
            128,
            1.0,
            1e-4,
            True,
        )
        assert imagenette.warmup_epochs * 10 == imagenette.epochs  # 5 of 50, 1 of 10
    assert TrainConfig.from_preset("faithful", dataset="imagenette", model="resnet50").epochs == 50


def test_bad_settings_name_the_key():
    with pytest.raises(RaystudyError, match="epochs=0"):
        tiny_config(epochs=0)
    with pytest.raises(RaystudyError, match="precision='fp8'"):
        tiny_config(precision="fp8")
    with pytest.raises(RaystudyError, match="unknown training setting"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(
        RaystudyError, match="unknown mechanism 'LGV'"
    ):  # a phase (raystudy.training.lgv_ensemble), not a mechanism
        tiny_config(mechanism="LGV")
    with pytest.raises(RaystudyError, match="sam_bn='none'"):
        tiny_config(mechanism="SAM", sam_bn="none")
    for mechanism in ("AT", "IR", "JR", "SAM&IR", "SAM&JR"):  # bf16 would round their small input changes away
        with pytest.raises(RaystudyError, match="precision='bf16' would round away"):
            tiny_config(mechanism=mechanism, precision="bf16")
    assert tiny_config(mechanism="SAM", precision="bf16").precision == "bf16"


def test_training_writes_model_and_metrics_and_learns(tmp_path):
    result = train(tiny_config(epochs=3), out_dir=tmp_path, log=None)
    metrics = json.loads((tmp_path / METRICS_FILE).read_text())
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3]
    for key in ("loss", "train_acc", "test_acc", "images_per_s", "lr"):
        assert key in metrics["epochs"][-1]
    assert metrics["config"]["seed"] == 3 and "torch" in metrics["versions"]
    assert metrics["epochs"][-1]["test_acc"] > 0.3  # 10 classes: chance is 0.1
    model, meta = load_model(tmp_path / MODEL_FILE)
    assert meta["model"] == "tiny_cnn" and meta["config"]["mechanism"] == "ST"
    for (k, a), b in zip(model.state_dict().items(), result.model.state_dict().values()):
        assert torch.equal(a, b.cpu()), k


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("mechanism", ["ST", "SAM&JR", "MU"])
def test_resume_after_interruption_gives_the_same_weights(tmp_path, mechanism):
    config = tiny_config(mechanism=mechanism)
    straight = train(config, out_dir=tmp_path / "straight", log=None).model.state_dict()

    def stop_after_two(record, checkpoint, model):
        if record["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, out_dir=tmp_path / "cut", on_epoch_end=stop_after_two, log=None)
    assert not (tmp_path / "cut" / MODEL_FILE).exists()
    lines = []
    resumed = train(config, out_dir=tmp_path / "cut", log=lines.append)
    assert lines[0].startswith("resuming") and len(resumed.history) == 4
    for key, value in straight.items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_resume_refuses_other_settings(tmp_path):
    train(tiny_config(epochs=1), out_dir=tmp_path, log=None)
    with pytest.raises(RaystudyError, match="other settings \\(epochs\\)"):
        train(tiny_config(epochs=2), out_dir=tmp_path, log=None)


def test_lgv_collects_snapshots_from_a_trained_model(tmp_path):
    from raystudy.core.data import dataset_for
    from raystudy.core.models import Ensemble
    from raystudy.training.lgv_ensemble import LgvPhase, collect

    trained = tiny_config(epochs=1, mechanism="SAM")
    train(trained, out_dir=tmp_path / "base", log=None)
    assert LgvPhase().batch_size == 256 and LgvPhase().epochs == 10
    phase = LgvPhase(epochs=2, batch_size=32)  # 4 steps per epoch on 128 images: 4 snapshots each
    config = phase.train_config(trained, str(tmp_path / "base" / MODEL_FILE))
    assert (config.mechanism, config.lr, config.schedule, config.warmup_epochs, config.batch_size) == (
        "SAM",
        0.05,
        "constant",
        0,
        32,
    )
    assert (config.snapshots_per_epoch, config.magnitudes, config.weight_decay, config.momentum) == (
        4,
        (("rho", 0.1),),
        1e-4,
        0.9,
    )
    ensemble = collect(trained, tmp_path / "base" / MODEL_FILE, dataset_for(trained), phase, tmp_path / "lgv", log=None)
    files = sorted((tmp_path / "lgv" / LGV_DIR).glob("model_*.pt"))
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == len(files) == 8
    first, _ = load_model(files[0])
    last, _ = load_model(files[-1])
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), last.state_dict().values()))
    # Another base: the phase fine-tunes an ST model with SAM's update at SAM's default radius.
    assert LgvPhase(base="SAM").train_config(tiny_config(), "m.pt").magnitudes == (("rho", 0.1),)


def test_lgv_phase_settings_are_checked_and_old_lgv_configs_still_read():
    from raystudy.training.lgv_ensemble import LgvPhase

    assert LgvPhase.parse(True) == LgvPhase() and LgvPhase.parse(False) is None
    assert LgvPhase.parse({"base": "SAM", "epochs": 5}) == LgvPhase(base="SAM", epochs=5)
    with pytest.raises(RaystudyError, match="LGV fine-tunes with ST, SAM, SAM&JR"):
        LgvPhase(base="MU")
    with pytest.raises(RaystudyError, match="unknown key"):
        LgvPhase.parse({"epoch": 3})
    with pytest.raises(RaystudyError, match="models_per_epoch=0"):
        LgvPhase(models_per_epoch=0)
    # A model file written when LGV was a mechanism (lgv_base, before 0.1.0's format) is refused, by name.
    old = {**tiny_config().to_dict(), "mechanism": "LGV", "lgv_base": "SAM", "magnitudes": {"rho": 0.05}}
    with pytest.raises(RaystudyError, match="unknown training setting.*lgv_base"):
        TrainConfig.from_dict(old)


def test_divergence_is_reported(tmp_path):
    with pytest.raises(TrainingDiverged, match="diverged at epoch 1"):
        train(tiny_config(lr=1e12, epochs=2), out_dir=tmp_path, log=None)


def test_lgv_snapshot_steps_are_spread_and_never_lost():
    from raystudy.training.loop import _snapshot_steps

    assert _snapshot_steps(195, 4) == {48, 97, 146, 194}  # CIFAR-10 at batch 256: the last ends the epoch
    assert _snapshot_steps(2, 4) == {0, 1}  # fewer steps than snapshots: one per step
    assert _snapshot_steps(10, 0) == set()


def test_accuracy_counts_every_batch_exactly():
    """A model that predicts the first pixel's value as the class: the accuracy is known sample by sample."""
    from raystudy.core.data import Split
    from raystudy.training.loop import evaluate_accuracy

    class FirstPixel(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long() % 10, 10).float()

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2500,), generator=generator)
    guess = torch.where(torch.rand(2500, generator=generator) < 0.37, labels, (labels + 1) % 10)
    images = torch.zeros(2500, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = guess.to(torch.uint8)
    expected = int((guess == labels).sum()) / 2500
    assert evaluate_accuracy(FirstPixel(), Split(images, labels), batch_size=1000) == pytest.approx(expected, abs=1e-12)


def test_the_trained_model_normalizes_with_its_dataset_and_sam_trains_as_sam():
    from raystudy.core.data import make_synthetic

    config = tiny_config(epochs=1)
    data = make_synthetic(128, 64, image_size=16, seed=0)
    plain = train(config, dataset=data, log=None).model
    normalize = plain[0]
    assert normalize.mean.flatten().tolist() == pytest.approx(list(data.mean))
    assert normalize.std.flatten().tolist() == pytest.approx(list(data.std))
    sam = train(tiny_config(epochs=1, mechanism="SAM"), dataset=data, log=None).model
    differs = [not torch.equal(a, b) for a, b in zip(plain.parameters(), sam.parameters())]
    assert all(differs)  # same seed, batches and start: only SAM's ascent step can move them apart


def test_pretrained_fine_tuning_starts_from_the_cached_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf
    import timm
    from safetensors.torch import save_file

    from raystudy.core.data import make_synthetic
    from raystudy.training.loop import _build

    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "snapshots" / "0").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0")
    torch.manual_seed(5)
    published = timm.create_model("test_resnet.r160_in1k").state_dict()
    save_file(published, repo / "snapshots" / "0" / "model.safetensors")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    data = make_synthetic(20, 10, image_size=96, seed=0)
    config = tiny_config(model="test_resnet.r160_in1k", image_size=96, pretrained=True)
    model = _build(config, data, torch.device("cpu"))
    assert torch.equal(model[1].conv1[0].weight, published["conv1.0.weight"])  # the stem as published
    assert model[1].fc.out_features == 10  # a new head for the dataset's classes


def test_an_epochs_record_is_the_mean_of_its_steps_and_checkpoints_follow_checkpoint_every(tmp_path, monkeypatch):
    from raystudy.training import loop as train_module

    steps = []
    real_step = train_module.training_step

    def recorded_step(*args, **kwargs):
        parts = real_step(*args, **kwargs)
        steps.append({k: float(v) for k, v in parts.items()})
        return parts

    monkeypatch.setattr(train_module, "training_step", recorded_step)
    seen = []
    config = tiny_config(epochs=3, checkpoint_every=2, n_train=100, batch_size=32)

    def on_epoch_end(record, state_path, model):
        seen.append((record["epoch"], state_path, model))

    result = train(config, out_dir=tmp_path, on_epoch_end=on_epoch_end, log=None)
    per_epoch = len(steps) // 3
    assert per_epoch == 100 // 32  # full batches only
    for epoch, record in enumerate(result.history):
        mine = steps[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert record["loss"] == pytest.approx(sum(s["loss"] for s in mine) / per_epoch, rel=1e-6)
        assert record["train_acc"] == pytest.approx(sum(s["correct"] for s in mine) / (per_epoch * 32), rel=1e-9)
        assert record["images_per_s"] * record["seconds"] == pytest.approx(per_epoch * 32, rel=1e-6)
    assert [(e, p) for e, p, _ in seen] == [(1, None), (2, tmp_path / "checkpoint.pt"), (3, tmp_path / "checkpoint.pt")]
    assert all(m is result.model for _, _, m in seen)


def test_a_constant_schedule_keeps_the_peak_after_warm_up():
    config = tiny_config(epochs=6, warmup_epochs=2, lr=0.4, schedule="constant")
    assert [learning_rate(config, e) for e in range(6)] == pytest.approx([0.2, 0.4, 0.4, 0.4, 0.4, 0.4])


def test_the_recipe_takes_the_configs_penalty_gradient_and_the_smallest_settings_are_valid():
    from raystudy.mechanisms.finite_difference import InputGradientNormFD
    from raystudy.mechanisms.gradient_norms import InputGradientNorm

    assert type(tiny_config(mechanism="IR").recipe().penalties[0]) is InputGradientNorm
    fd = tiny_config(mechanism="IR", penalty_gradient="finite_difference")
    assert type(fd.recipe().penalties[0]) is InputGradientNormFD
    smallest = tiny_config(epochs=1, batch_size=1, warmup_epochs=0)
    assert (smallest.epochs, smallest.batch_size) == (1, 1)
