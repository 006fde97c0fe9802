"""torchattack's attacks in the trial-end hook: named, optioned and refused in one line; configured
like raystudy's PGD and MI-FGSM they craft the same AEs; DI-FGSM (another input transformation)
reaches the same ASR within a stated tolerance; measured like raystudy's own attacks."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from raystudy.config import TrainConfig, parse_space
from raystudy.config.torchattack import REGISTRY, SET_BY_RAYSTUDY, TORCHATTACK_VERSION
from raystudy.core.data import make_synthetic
from raystudy.errors import RaystudyError
from raystudy.metrics import EvalConfig, make_attack, make_eval_set
from raystudy.metrics.attacks import torchattack_examples
from raystudy.metrics.hook import measure_surrogate
from raystudy.persist.record import flat
from raystudy.training.loop import train

torchattack = pytest.importorskip("torchattack")  # in the test extra; the extra `torchattack` for users


def test_the_written_out_registry_is_the_installed_ones():
    from torchattack.attack import ATTACK_REGISTRY

    assert torchattack.__version__ == TORCHATTACK_VERSION
    assert set(REGISTRY) == set(ATTACK_REGISTRY)
    for name, (category, targeted, options) in REGISTRY.items():
        parameters = inspect.signature(ATTACK_REGISTRY[name].__init__).parameters
        assert ATTACK_REGISTRY[name].attack_category.name == category, name
        assert ("targeted" in parameters) == targeted, name
        assert set(options) <= set(parameters) and not set(options) & set(SET_BY_RAYSTUDY), name
        leftover = set(parameters) - set(options) - set(SET_BY_RAYSTUDY) - {"self", "grad_estimator_batch_size"}
        assert not leftover, (name, leftover)


SPACE = {"name": "s", "kind": "grid", "targets": "t", "trials": [{"mechanism": "ST"}]}


@pytest.mark.parametrize(
    "evaluation, message",
    [
        ({"attacks": ["torchattack/SSAA"]}, "unknown torchattack attack 'SSAA'; valid: Admix, ATT, BFA"),
        ({"attacks": ["torchattack/SGM"]}, "cannot run here: it hooks torchvision's ResNet/DenseNet module names"),
        ({"attacks": ["torchattack/PGDL2"]}, "an L2 attack"),
        ({"attacks": ["torchattack/CDA"]}, "a generative attack"),
        ({"attacks": ["torchattack/TGR"]}, "it hooks the blocks of a bare timm ViT"),
        (
            {"attacks": ["torchattack/Admix"], "attack_options": {"torchattack/Admix": {"num_classes": 5}}},
            "(num_classes: from",
        ),
        (
            {"attacks": ["torchattack/BSR"], "attack_options": {"torchattack/BSR": {"decay": float("nan")}}},
            "must be a finite number",
        ),
        ({"attacks": ["torchattack/BSR"], "attack_options": ["torchattack/BSR"]}, "attack_options must map attacks"),
        ({"attacks": ["torchattack/BSR"], "attack_options": {"torchattack/BSR": [1]}}, "its options must be a mapping"),
        ({"attacks": ["torchattack/FIA"]}, "needs the option feature_layer_cfg"),
        ({"attacks": ["torchattack/SSA"]}, "draws its noise at 224 x 224 pixels"),
        (
            {"attacks": ["torchattack/SSA"], "attack_options": {"torchattack/SSA": {"sigma": 1}}},
            "unknown option(s) sigma; valid: decay, num_spectrum, rho",
        ),
        (
            {"attacks": ["torchattack/BSR"], "attack_options": {"torchattack/BSR": {"steps": 5}}},
            "(steps: from the evaluation settings and the data)",
        ),
        ({"attacks": ["pgd"], "attack_options": {"pgd": {"decay": 1}}}, "is not one of the evaluation's torchattack"),
        ({"attacks": ["torchattack/BSR"], "loss": "logit"}, "torchattack's use their own loss"),
    ],
)
def test_torchattack_attacks_are_checked_on_load_in_one_line(evaluation, message):
    with pytest.raises(RaystudyError) as err:
        parse_space({**SPACE, "evaluation": evaluation}, "s.yaml")
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_torchattack_attack_is_named_with_a_dot_in_metrics_and_needs_its_extra(monkeypatch):
    evaluation = {"attacks": ["pgd", "torchattack/BSR"], "attack_options": {"torchattack/BSR": {"num_scale": 4}}}
    config = parse_space({**SPACE, "evaluation": evaluation}, "s.yaml").evaluation
    assert config.attacks == ("pgd", "torchattack.BSR") and config.options_of("torchattack.BSR") == {"num_scale": 4}
    imagenette = {**SPACE, "dataset": "imagenette", "model": "resnet18", "evaluation": {"attacks": ["torchattack/SSA"]}}
    assert parse_space(imagenette, "s.yaml").evaluation.attacks == ("torchattack.SSA",)  # 224-pixel images
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchattack" else real(name))
    with pytest.raises(RaystudyError, match=r"the attack torchattack.BSR needs torchattack.*raystudy\[torchattack\]"):
        config.check_installed()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny surrogate and target trained on the same synthetic data, and their evaluation images."""
    from raystudy.core.checkpoint import load_model

    root = tmp_path_factory.mktemp("torchattack")
    common = dict(
        dataset="synthetic", model="tiny_cnn", epochs=3, batch_size=32, n_train=512, n_test=256, image_size=16
    )
    models = []
    for seed in (0, 1):
        train(TrainConfig.from_preset("faithful", seed=seed, lr=0.05, **common), out_dir=root / str(seed), log=None)
        models.append(load_model(root / str(seed) / "model.pt")[0].eval())
    data = make_synthetic(512, 256, num_classes=10, image_size=16, seed=0)
    return models, data


@pytest.mark.parametrize(
    "ours, theirs, options", [("pgd", "PGD", {"random_start": False}), ("mi", "MIFGSM", {"decay": 0.9})]
)
def test_torchattacks_pgd_and_mi_fgsm_configured_like_ours_craft_the_same_examples(world, ours, theirs, options):
    """Same sign steps of 2/255, same projection, same momentum on the L1-normalized gradient: the
    mean-reduced cross-entropy (torchattack) and the summed one (raystudy) differ by a positive
    factor, which neither a sign nor an L1 normalization sees."""
    (surrogate, _), data = world
    x, y = data.test.images[:64].float() / 255, data.test.labels[:64]
    for target in (None, (y + 1) % 10):
        raystudy = make_attack(ours, 8 / 255, steps=10)(surrogate, x, y, target, torch.Generator().manual_seed(0))
        labels = y if target is None else target
        library = torchattack_examples(
            surrogate, x, labels, target is not None, f"torchattack.{theirs}", 8 / 255, 10, 2 / 255, options, 0, 64, 10
        )
        differ = (raystudy != library).any(dim=(1, 2, 3)).float().mean()
        assert differ == 0, f"{float(differ):.1%} of the AEs differ"


def test_torchattacks_di_fgsm_reaches_the_same_asr_within_the_stated_tolerance(world):
    """DI-FGSM's input transformation differs from the published one raystudy implements (nearest
    resizing to [side, side/0.9) and padding to side/0.9, against bilinear resizing by a factor in
    [0.75, 1.5)), and the two draw different random numbers: the same ASR only within sampling
    error. On 256 images, 10 steps, 8/255: within 0.15 (about three binomial standard errors of an
    ASR near 0.5 on the ~100 supported images)."""
    (surrogate, target), data = world
    config = EvalConfig(
        n_eval=256,
        budgets=(8,),
        modes=("untargeted",),
        attacks=("di", "torchattack/DIFGSM"),
        attack_options={"torchattack/DIFGSM": {"decay": 0.0, "diversity_prob": 0.7}},
        steps=10,
        smoothness_samples=2,
    )
    rows = flat(measure_surrogate(surrogate, {"t": target}, make_eval_set(data.test, 10, config), config))
    ours, theirs = rows["asr/di/untargeted/8/t"], rows["asr/torchattack.DIFGSM/untargeted/8/t"]
    assert 0 < ours < 1 and abs(ours - theirs) <= 0.15, (ours, theirs)


def test_the_hook_measures_torchattacks_newer_attacks_like_its_own(world):
    (surrogate, target), data = world
    config = EvalConfig(
        n_eval=32,
        budgets=(8,),
        attacks=("torchattack/Admix", "torchattack/BSR", "torchattack/FIA"),
        attack_options={
            "torchattack/Admix": {"size": 2},
            "torchattack/BSR": {"num_scale": 2},
            "torchattack/FIA": {"feature_layer_cfg": "1.features.3", "num_ens": 2},
        },
        steps=3,
        smoothness_samples=2,
    )
    eval_set = make_eval_set(data.test, 10, config)
    rows = flat(measure_surrogate(surrogate, {"t": target}, eval_set, config))
    for attack in ("torchattack.Admix", "torchattack.BSR"):
        for mode in ("untargeted", "targeted"):
            assert 0 <= rows[f"asr/{attack}/{mode}/8/t"] <= 1 and f"fooling/{attack}/{mode}/8" in rows
    assert (
        "asr/torchattack.FIA/untargeted/8/t" in rows and "asr/torchattack.FIA/targeted/8/t" not in rows
    )  # untargeted only
    # The surrogate is left as it was: no hooks, no parameter gradients.
    assert all(p.grad is None for p in surrogate.parameters()) and not surrogate._backward_hooks
    # Seeded: the same AEs again.
    again = flat(measure_surrogate(surrogate, {"t": target}, eval_set, config))
    assert {k: v for k, v in again.items() if not k.startswith("seconds")} == {
        k: v for k, v in rows.items() if not k.startswith("seconds")
    }


def test_what_only_running_shows_is_one_line_before_anything_trains():
    from raystudy.metrics.attacks import check_torchattack_runs

    space = {
        **SPACE,
        "dataset": "synthetic",
        "model": "tiny_cnn",
        "train": {"image_size": 16},
        "evaluation": {
            "attacks": ["torchattack/FIA"],
            "attack_options": {"torchattack/FIA": {"feature_layer_cfg": "9.nope"}},
        },
    }
    with pytest.raises(RaystudyError, match=r"attack torchattack.FIA with .* does not run on tiny_cnn \(untargeted\)"):
        check_torchattack_runs(parse_space(space, "s.yaml"))
    space["evaluation"]["attack_options"]["torchattack/FIA"]["feature_layer_cfg"] = "1.features.3"
    check_torchattack_runs(parse_space(space, "s.yaml"))
    search = {
        **space,
        "kind": "search",
        "search": {"mechanism": "SAM", "num_samples": 2, "params": {"rho": {"low": 0.01, "high": 0.5}}},
    }
    search.pop("trials")
    search["search"]["metric"] = "asr/torchattack.FIA/targeted/8/mean"
    with pytest.raises(RaystudyError, match="torchattack implements torchattack.FIA untargeted only"):
        parse_space(search, "s.yaml")


def test_plan_prices_an_attack_by_the_gradients_a_step_takes():
    from raystudy.budget.costs import StepCosts, hook_seconds
    from raystudy.config.torchattack import gradients_per_step

    assert gradients_per_step("pgd", {}) == 1 and gradients_per_step("torchattack.BSR", {}) == 20
    assert (
        gradients_per_step("torchattack.BSR", {"num_scale": 4}) == 4
        and gradients_per_step("torchattack.VMIFGSM", {}) == 6
    )
    from raystudy.config.torchattack import images_per_forward

    # MuMoDIG: (1 + n_trans) x n_base x n_interpolate; L2T priced at its mean copies, planned at a peak
    assert gradients_per_step("torchattack.MuMoDIG", {}) == 7
    assert gradients_per_step("torchattack.MuMoDIG", {"n_trans": 3, "n_base": 2, "n_interpolate": 3}) == 24
    assert gradients_per_step("torchattack.L2T", {}) == 5 * 34 and images_per_forward("torchattack.L2T", {}) == 5 * 58
    assert gradients_per_step("torchattack.Admix", {"size": "three"}) == 15  # not a number: its default, priced
    assert images_per_forward("torchattack.VMIFGSM", {}) == 1 and images_per_forward("pgd", {}) == 1
    costs = StepCosts("estimate", False, "tiny_cnn", "synthetic", 128, {}, {"ST": {1: 1.0}})

    def seconds(evaluation):
        space = {**SPACE, "evaluation": {"n_eval": 100, "budgets": [8], "modes": ["untargeted"], **evaluation}}
        return hook_seconds(parse_space(space, "s.yaml"), costs, st_step=1.0, batch_size=100)

    pgd = seconds({"attacks": ["pgd"]})
    both = seconds({"attacks": ["pgd", "torchattack/BSR"], "attack_options": {"torchattack/BSR": {"num_scale": 10}}})
    # 20 steps of one gradient, then 20 steps of ten: the attack part grows elevenfold.
    fixed = pgd - 100 * 20 / 100
    assert both - fixed == pytest.approx(11 * (pgd - fixed))


def small_model_options(name: str) -> dict | None:
    """The options `name` runs with on a 16-pixel model (feature attacks: its first layer), None
    where it is refused on load (tested apart)."""
    from raystudy.config.torchattack import CANONICAL, NEEDS_OPTION, check_attack

    options = {o: "0" for o in NEEDS_OPTION if o in REGISTRY[name][2]}
    try:
        check_attack(CANONICAL + name, options, 16)
    except RaystudyError:
        return None
    return options


@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if small_model_options(n) is not None])
def test_the_images_one_step_holds_are_what_the_library_sends_through_the_model(name):
    """raystudy plan's memory counts the copies whose graphs one step keeps alive (ONE_FORWARD: BSR's
    and Admix's copies as one batch, FDA's clean and adversarial batch together) and the others' one
    at a time (VMI-FGSM's neighbours): the largest batch the surrogate's forward sees says which, for
    every attack that runs on a small model (L2T and SSA need 224 pixels and a GPU: checked by
    reading). Every one of them runs through raystudy (NAA and BFA need the copy's weights unfrozen)."""
    from raystudy.config.torchattack import CANONICAL, images_per_forward

    attack, options = CANONICAL + name, small_model_options(name)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 16 * 16, 10)
    )
    seen: list[int] = []
    trainable: set[bool] = set()

    def watch(module, args):  # kept by the copy
        seen.append(args[0].shape[0])
        trainable.add(any(p.requires_grad for p in module.parameters()))

    model.register_forward_pre_hook(watch)
    x = torch.rand(4, 3, 16, 16)
    try:
        torchattack_examples(model, x, torch.arange(4), False, attack, 8 / 255, 2, 1 / 255, options, 0, 4, 10)
    except ImportError as missing:  # MuMoDIG needs kornia, an optional package of torchattack's
        pytest.skip(str(missing))
    assert max(seen) == 4 * images_per_forward(attack, options), name
    assert trainable == {name in ("NAA", "BFA")}  # frozen but for those two: no weight gradients to compute
    assert all(p.requires_grad for p in model.parameters())  # the surrogate itself untouched
