"""The training configuration: every check at its edge, the presets whole, and the round trips a
record and a checkpoint rely on (raystudy/config/train.py). Pure configuration: no training."""

from __future__ import annotations

import json

import pytest

from raystudy.config import TrainConfig
from raystudy.config.train import CIFAR_MODEL_NAMES, PRESETS, check_model_name
from raystudy.errors import RaystudyError

REFUSED = [
    ({"epochs": 0}, "epochs=0 must be >= 1"),
    ({"batch_size": 0}, "batch_size=0 must be >= 1"),
    ({"lr": 0.0}, "lr=0.0 must be > 0"),
    ({"momentum": 1.0}, "momentum=1.0 must be in [0, 1)"),
    ({"momentum": -0.1}, "momentum=-0.1 must be in [0, 1)"),
    ({"weight_decay": -1e-4}, "weight_decay=-0.0001 must be >= 0"),
    ({"epochs": 5, "warmup_epochs": 5}, "warmup_epochs=5 must be 0 or below epochs=5"),
    ({"epochs": 5, "warmup_epochs": -1}, "warmup_epochs=-1 must be 0 or below epochs=5"),
    ({"schedule": "step"}, "schedule='step' must be one of cosine, constant"),
    ({"precision": "fp16"}, "precision='fp16' must be one of fp32, bf16"),
    ({"sam_bn": "second"}, "sam_bn='second' must be one of both, first"),
    ({"penalty_gradient": "forward"}, "penalty_gradient='forward' must be one of exact, finite_difference"),
    ({"seed": -1}, "seed=-1 must be >= 0"),
    ({"data_seed": -1}, "data_seed=-1 must be >= 0"),
    ({"checkpoint_every": 0}, "checkpoint_every=0 must be >= 1"),
    ({"snapshots_per_epoch": -1}, "snapshots_per_epoch=-1 must be >= 0"),
    ({"n_train": 0}, "n_train=0 must be >= 1"),
    ({"n_test": 0}, "n_test=0 must be >= 1"),
    ({"mechanism": "IR", "precision": "bf16"}, "precision='bf16' would round away IR's small input"),
    (
        {"mechanism": "ER", "precision": "bf16", "penalty_gradient": "finite_difference"},
        "precision='bf16' would drown the finite differences",
    ),
    ({"mechanism": "MU", "magnitudes": {"p": 1.5}}, "p"),
    ({"mechanism": "XX"}, "unknown mechanism 'XX'"),
]


@pytest.mark.parametrize("settings, message", REFUSED)
def test_each_bad_setting_is_refused_naming_its_key_and_value(settings, message):
    with pytest.raises(RaystudyError) as error:
        TrainConfig(**settings)
    assert message in str(error.value)


ACCEPTED_AT_THE_EDGE = [
    {"epochs": 1, "warmup_epochs": 0},
    {"epochs": 5, "warmup_epochs": 4},
    {"batch_size": 1},
    {"lr": 1e-9},
    {"momentum": 0.0},
    {"momentum": 0.999},
    {"weight_decay": 0.0},
    {"seed": 0, "data_seed": 0},
    {"checkpoint_every": 1, "snapshots_per_epoch": 0},
    {"n_train": 1, "n_test": 1},
    {"schedule": "constant"},
    {"mechanism": "SAM", "precision": "bf16"},  # SAM perturbs weights, not inputs
    {"mechanism": "ER", "precision": "bf16"},  # the exact form is allowed in bf16
    {"mechanism": "ST", "precision": "bf16", "penalty_gradient": "finite_difference"},  # no penalty to difference
]


@pytest.mark.parametrize("settings", ACCEPTED_AT_THE_EDGE)
def test_settings_at_their_edges_are_accepted_as_given(settings):
    config = TrainConfig(**settings)
    for key, value in settings.items():
        if key != "penalty_gradient":
            assert getattr(config, key) == value


def test_the_presets_whole():
    cifar = dict(
        epochs=200,
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        warmup_epochs=10,
        schedule="cosine",
        precision="fp32",
        pretrained=False,
    )
    assert PRESETS["faithful"] == {
        "cifar10": cifar,
        "imagenette": {**cifar, "epochs": 50, "warmup_epochs": 5, "lr": 1.0, "pretrained": True},
    }
    fast = {"penalty_gradient": "finite_difference"}
    assert PRESETS["fast"] == {
        "cifar10": {**cifar, "epochs": 40, "warmup_epochs": 2, **fast},
        "imagenette": {**cifar, "epochs": 10, "warmup_epochs": 1, "lr": 1.0, "pretrained": True, **fast},
    }
    for dataset, family in (("cifar10", "cifar10"), ("synthetic", "cifar10"), ("imagenette", "imagenette")):
        model = "resnet50" if family == "imagenette" else "resnet18"
        for preset in ("faithful", "fast"):
            config = TrainConfig.from_preset(preset, dataset=dataset, model=model, mechanism="SAM&JR")
            for key, value in PRESETS[preset][family].items():
                assert getattr(config, key) == value, (preset, dataset, key)


def test_from_preset_keeps_the_warm_up_fraction_lets_settings_win_and_ignores_none():
    assert TrainConfig.from_preset("faithful", epochs=40).warmup_epochs == 2  # 10/200 of 40
    assert TrainConfig.from_preset("faithful", epochs=39).warmup_epochs == 1  # rounded down
    assert TrainConfig.from_preset("fast", epochs=100).warmup_epochs == 5  # 2/40 of 100
    assert TrainConfig.from_preset("faithful", epochs=40, warmup_epochs=3).warmup_epochs == 3
    assert TrainConfig.from_preset("faithful", epochs=40, warmup_epochs=0).warmup_epochs == 0
    kept = TrainConfig.from_preset("faithful", lr=None, epochs=None, seed=None)
    assert (kept.lr, kept.epochs, kept.warmup_epochs, kept.seed) == (0.1, 200, 10, 0)
    assert TrainConfig.from_preset("fast", dataset="imagenette", model="resnet50").epochs == 10
    assert TrainConfig.from_preset("fast", dataset=None).dataset == "cifar10"
    with pytest.raises(RaystudyError, match="unknown preset 'quick'; known: faithful, fast"):
        TrainConfig.from_preset("quick")


def test_dict_and_json_round_trips_and_differences():
    config = TrainConfig.from_preset(
        "fast", mechanism="SAM&JR", magnitudes={"rho": 0.05}, seed=3, n_train=100, data_path="/data"
    )
    values = config.to_dict()
    assert values["magnitudes"] == {"lambda_jr": 1e-4, "rho": 0.05} and isinstance(values["magnitudes"], dict)
    assert TrainConfig.from_dict(values) == config
    assert set(values) == {f for f in TrainConfig.__dataclass_fields__}
    text = config.to_json()
    assert json.loads(text) == values and text == json.dumps(values, sort_keys=True)
    assert list(json.loads(text)) == sorted(values)
    assert config.magnitudes == (("lambda_jr", 1e-4), ("rho", 0.05))  # sorted pairs, defaults filled in
    other = TrainConfig.from_dict({**values, "seed": 4, "lr": 0.2, "data_path": "/elsewhere"})
    assert config.differences(other) == ["lr", "seed"]  # where the data lives is not part of the run
    assert config.differences(config) == [] and other == TrainConfig.from_dict({**values, "seed": 4, "lr": 0.2})


def test_from_dict_names_unknown_keys():
    with pytest.raises(RaystudyError) as error:
        TrainConfig.from_dict({"epoch": 3, "lrate": 0.1})
    assert "unknown training setting(s): epoch, lrate; known: " in str(error.value)
    assert "batch_size" in str(error.value)
    assert TrainConfig.from_dict({"magnitudes": {"p": 0}, "mechanism": "LS"}).magnitudes == (("p", 0.0),)


def test_model_names_are_checked_for_their_input_size():
    for name in CIFAR_MODEL_NAMES:
        check_model_name(name, 32)
        check_model_name(name, 64)
    with pytest.raises(RaystudyError, match="unknown model 'vit' for 32px inputs; known: densenet121, inception_v3"):
        check_model_name("vit", 32)
    check_model_name("resnet50", 224)
    with pytest.raises(RaystudyError, match="unknown model 'no_such_net': not a timm model"):
        check_model_name("no_such_net", 224)
    with pytest.raises(RaystudyError, match="not a timm model"):
        check_model_name("tiny_cnn", 65)  # above CIFAR size only timm's names


def test_the_recipe_follows_mechanism_magnitudes_dataset_and_sam_bn():
    ls = TrainConfig(mechanism="LS", magnitudes={"p": 0.3}).recipe()
    assert ls.label_smoothing == 0.3 and not ls.penalties
    imagenette = TrainConfig(mechanism="AT", dataset="imagenette", model="resnet50").recipe()
    cifar = TrainConfig(mechanism="AT").recipe()
    assert imagenette.adversary != cifar.adversary  # the ImageNette schedule: 5 steps of 0.4 eps
    assert TrainConfig(mechanism="SAM", sam_bn="first").recipe().sam_bn_second_pass is False
    assert TrainConfig(mechanism="SAM").recipe().sam_bn_second_pass is True
    jr = TrainConfig(mechanism="SAM&JR", magnitudes={"rho": 0.2, "lambda_jr": 0.01}).recipe()
    assert jr.sam_rho == 0.2 and [p.weight for p in jr.penalties] == [0.01]


def test_the_penalty_gradient_is_the_one_asked_and_exact_where_there_is_no_penalty():
    from raystudy.mechanisms.finite_difference import finite_difference_form
    from raystudy.mechanisms.gradient_norms import InputGradientNorm

    exact = TrainConfig(mechanism="IR").recipe().penalties[0]
    differenced = TrainConfig(mechanism="IR", penalty_gradient="finite_difference").recipe().penalties[0]
    assert type(exact) is InputGradientNorm
    assert type(differenced) is type(finite_difference_form(exact)) and type(differenced) is not InputGradientNorm
    for mechanism in ("ST", "MU", "LS", "AT", "SAM"):  # nothing differentiated twice: the record says exact
        config = TrainConfig(mechanism=mechanism, penalty_gradient="finite_difference")
        assert config.penalty_gradient == "exact" and config.to_dict()["penalty_gradient"] == "exact"
    assert TrainConfig.from_preset("fast", mechanism="ST").penalty_gradient == "exact"
    assert TrainConfig.from_preset("fast", mechanism="JR").penalty_gradient == "finite_difference"


def test_an_unknown_key_lists_every_known_one():
    with pytest.raises(RaystudyError) as error:
        TrainConfig.from_dict({"lrate": 0.1})
    known = ", ".join(sorted(TrainConfig.__dataclass_fields__))
    assert str(error.value) == f"unknown training setting(s): lrate; known: {known}"
