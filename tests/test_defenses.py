"""Defended targets and targeted attacks as the literature runs them: input-transformation defenses
against their reference forms (a PIL round trip, exact quantization, a scipy median, seeded
resize-and-pad), measured through as deployed and never differentiated through; the logit loss and
long targeted schedules."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from raystudy.config import parse_space
from raystudy.config.defense import parse_defense
from raystudy.errors import RaystudyError
from raystudy.metrics import EvalConfig, LinfAttack, make_eval_set
from raystudy.metrics import hook as hook_module
from raystudy.metrics.defenses import BitDepth, JpegCompression, MedianFilter, ResizePad, defended
from raystudy.metrics.hook import measure_surrogate
from raystudy.persist.record import flat


def images(n=4, side=16, seed=0) -> torch.Tensor:
    """8-bit images as [0, 1] pixels, with structure (a JPEG of pure noise says little)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, side)
    base = (ramp[None, :] * ramp[:, None])[None, None].repeat(n, 3, 1, 1)
    noisy = (base + 0.2 * torch.rand(n, 3, side, side, generator=g)).clamp(0, 1)
    return (noisy * 255).round() / 255


@pytest.mark.parametrize(
    "text, message",
    [
        ("jpeg", "jpeg needs a value"),
        ("jpeg:0", "jpeg takes a whole number in 1..100"),
        ("jpeg:75.5", "jpeg takes a whole number"),
        ("bits:9", "bits takes a whole number in 1..8"),
        ("median:4", "median takes an odd window"),
        ("resize_pad:1", "resize_pad takes a number in (1, 2]"),
        ("blur:3", "unknown defense 'blur'; valid: jpeg, bits, median, resize_pad"),
        ("jpeg:x", "jpeg:x is not a number"),
    ],
)
def test_a_defense_is_checked_on_load_in_one_line(text, message):
    with pytest.raises(RaystudyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_defense(text)
    space = {"name": "s", "kind": "grid", "targets": "t", "trials": [{"mechanism": "ST"}]}
    with pytest.raises(RaystudyError) as err:
        parse_space({**space, "evaluation": {"defenses": [text]}}, "s.yaml")
    assert "s.yaml: evaluation:" in str(err.value) and "\n" not in str(err.value)


def test_defenses_loss_and_targeted_steps_are_read_from_the_study_file():
    space = {"name": "s", "kind": "grid", "targets": "t", "trials": [{"mechanism": "ST"}]}
    space["evaluation"] = {
        "defenses": ["jpeg:75", "bits:4+median:3", "resize_pad"],
        "loss": "logit",
        "targeted_steps": 300,
    }
    evaluation = parse_space(space, "s.yaml").evaluation
    assert evaluation.defenses == ("jpeg:75", "bits:4+median:3", "resize_pad")
    assert evaluation.steps_for("targeted") == 300 and evaluation.steps_for("untargeted") == 20
    for bad, message in (
        ({"loss": "hinge"}, "loss='hinge'; known: ce, logit"),
        ({"defenses": ["bits:4", "bits:4.0"]}, "twice"),
    ):
        with pytest.raises(RaystudyError, match=message):
            parse_space({**space, "evaluation": bad}, "s.yaml")


def test_jpeg_is_a_pil_round_trip_at_the_same_quality():
    x = images()
    for quality in (30, 75, 95):
        ours = JpegCompression(quality)(x)
        for image, out in zip(x, ours):
            buffer = io.BytesIO()
            Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, "JPEG", quality=quality)
            reference = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
            assert torch.equal((out.permute(1, 2, 0) * 255).round().byte(), torch.from_numpy(reference.copy()))
    assert not torch.equal(JpegCompression(30)(x), x)  # it did something


def test_bit_depth_reduction_is_exact():
    x = images()
    for bits in (1, 3, 4, 8):
        levels = 2**bits - 1
        out = BitDepth(bits)(x)
        assert torch.equal(out, torch.from_numpy(np.round(x.numpy() * levels) / levels).float())
        assert len(torch.unique(out)) <= levels + 1
    assert torch.equal(BitDepth(8)(x), x)  # 8-bit images at 8 bits: unchanged


def test_median_smoothing_matches_scipy_and_removes_salt():
    from scipy.ndimage import median_filter

    x = images()
    for size in (3, 5):
        reference = median_filter(x.numpy(), size=(1, 1, size, size), mode="mirror")  # torch's "reflect"
        assert torch.equal(MedianFilter(size)(x), torch.from_numpy(reference))
    salted = torch.full((1, 1, 9, 9), 0.5)
    salted[0, 0, 4, 4] = 1.0
    assert torch.equal(MedianFilter(3)(salted), torch.full((1, 1, 9, 9), 0.5))


def test_resize_and_pad_is_seeded_and_places_the_resized_image():
    x = images(n=6, side=32)
    out = ResizePad(331 / 299, seed=3)(x)
    assert torch.equal(ResizePad(331 / 299, seed=3)(x), out)  # the same seed, the same draws
    assert not torch.equal(ResizePad(331 / 299, seed=4)(x), out)
    # An image's draws depend on the seed and the image alone: not on its batch or its place in it.
    assert torch.equal(ResizePad(331 / 299, seed=3)(x.flip(0)), out.flip(0))
    assert torch.equal(ResizePad(331 / 299, seed=3)(x[2:3]), out[2:3])
    assert out.shape[-1] == math.floor(32 * 331 / 299)
    for image, padded in zip(x, out):  # the image resized to a side in [32, 35), the rest zeros
        rows, cols = padded.abs().sum(dim=(0, 2)).nonzero(), padded.abs().sum(dim=(0, 1)).nonzero()
        new = int(rows.max() - rows.min()) + 1
        assert 32 <= new < 35 and int(cols.max() - cols.min()) + 1 == new
        top, left = int(rows.min()), int(cols.min())
        expected = torch.nn.functional.interpolate(image[None], size=(new, new), mode="bilinear", align_corners=False)
        assert torch.equal(padded[:, top : top + new, left : left + new], expected[0])


def test_a_defended_target_refuses_gradients_through_a_defense_that_has_none():
    target = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    x = images().requires_grad_(True)
    for text in ("jpeg:75", "bits:4", "median:3", "bits:4+resize_pad"):
        with pytest.raises(RuntimeError, match="is not differentiable"):
            defended(target, parse_defense(text), seed=0)(x)
    # resize-and-pad alone is differentiable: its gradient reaches the input.
    padded = nn.Sequential(nn.AdaptiveAvgPool2d(16), target)
    defended(padded, parse_defense("resize_pad"), seed=0)(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():  # as deployed: a prediction through the defense
        assert defended(target, parse_defense("jpeg:75"), seed=0)(images()).shape == (4, 4)


class TinyNet(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x))


def test_the_hook_measures_each_target_behind_each_defense_apart_from_the_means():
    from raystudy.core.data import make_synthetic

    data = make_synthetic(64, 48, num_classes=4, image_size=16, seed=0)
    surrogate, targets = TinyNet(0), {"t1": TinyNet(1), "t2": TinyNet(2)}
    plain = EvalConfig(n_eval=48, budgets=(8,), modes=("untargeted",), smoothness_samples=4)
    with_defenses = EvalConfig(**{**plain.__dict__, "defenses": ("bits:8", "jpeg:50")})
    eval_set = make_eval_set(data.test, 4, plain)
    without = flat(measure_surrogate(surrogate, targets, eval_set, plain))
    rows = flat(measure_surrogate(surrogate, targets, eval_set, with_defenses))
    key = "asr/pgd/untargeted/8"
    for t in ("t1", "t2"):
        # 8-bit images behind an 8-bit quantization: the same target, the same numbers.
        assert _same(rows[f"{key}/{t}+bits:8"], rows[f"{key}/{t}"]) and rows[f"acc/{t}+bits:8"] == rows[f"acc/{t}"]
        assert f"{key}/{t}+jpeg:50" in rows and f"support/{t}+jpeg:50" in rows
        assert f"similarity/{t}+jpeg:50" not in rows  # no gradient through a defense
    # The means stay over the targets as they are: the same as without defenses.
    assert _same(rows[f"{key}/mean"], without[f"{key}/mean"]) and rows["similarity/mean"] == without["similarity/mean"]


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_the_logit_loss_raises_the_target_logit_and_targeted_attacks_take_their_own_steps(monkeypatch):
    """On a linear model the logit loss's input gradient is the target row of W: one targeted step
    moves every pixel by the step size along sign(W_t), whatever the other classes do."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.full((2, 3, 2, 2), 128 / 255)  # an 8-bit pixel: the rounded AE is exact
    y, target = torch.tensor([0, 1]), torch.tensor([2, 0])
    step = 1 / 255
    adv = LinfAttack(eps=8 / 255, steps=1, step_size=step, loss="logit")(model, x, y, target)
    weights = model[1].weight.detach()
    expected = x + step * weights[target].sign().reshape(2, 3, 2, 2)
    assert torch.allclose(adv, expected, atol=1e-6)
    cross_entropy = LinfAttack(eps=8 / 255, steps=1, step_size=step)(model, x, y, target)
    assert not torch.allclose(cross_entropy, expected)  # its gradient mixes in the other classes
    # The hook gives targeted attacks `targeted_steps`, untargeted ones `steps`.
    made = []
    real = hook_module.make_attack
    monkeypatch.setattr(hook_module, "make_attack", lambda *a, **k: made.append(a) or real(*a, **k))
    config = EvalConfig(steps=3, targeted_steps=7, loss="logit")
    hook_module._craft(model, x, y, None, "pgd", 8, config, torch.Generator())
    hook_module._craft(model, x, y, target, "pgd", 8, config, torch.Generator())
    assert [(a[2], a[5]) for a in made] == [(3, "logit"), (7, "logit")]


def test_defended_columns_stay_out_of_the_objective_and_held_out_means():
    from raystudy.persist.record import MetricRow, is_defended, objective_rows

    rows = [
        MetricRow("asr", value, "pgd", "untargeted", 8, target=target)
        for value, target in ((0.5, "t1"), (0.7, "t2"), (0.1, "t1+jpeg:75"), (0.1, "t2+bits:4+median:3"))
    ]
    means = {r.target: r.value for r in objective_rows(rows, "asr/pgd/untargeted/8/mean", ["t1"])}
    assert means == {"objective": 0.5, "held_out": 0.7}
    assert is_defended("t2+bits:4+median:3") and not is_defended("vgg16_JR_lambda1e+06") and not is_defended("t1")


def test_a_defended_name_splits_at_its_defenses_and_a_target_named_like_one_is_refused(tmp_path):
    from raystudy.config import parse_space
    from raystudy.persist.record import defended_parts

    assert defended_parts("resnet50+augmix+jpeg:75") == ("resnet50+augmix", "jpeg:75")
    assert defended_parts("vgg16+bits:4+median:3") == ("vgg16", "bits:4+median:3")
    assert defended_parts("resnet50+augmix") is None and defended_parts("+jpeg:75") is None
    assert defended_parts("vgg16_JR_lambda1e+06") is None and defended_parts(None) is None
    base = {"name": "t", "kind": "targets", "dataset": "synthetic", "model": "tiny_cnn", "train": {"image_size": 16}}
    endpoint = {"name": "api+jpeg", "url": "https://labels.example.com/v1"}
    with pytest.raises(RaystudyError, match=r"the name api\+jpeg reads as a target behind a defense"):
        parse_space({**base, "trials": [{"model": "tiny_cnn"}, {"endpoint": endpoint}]}, "t.yaml")
    (tmp_path / "vgg+bits:4.pt").write_bytes(b"")
    with pytest.raises(RaystudyError, match=r"the name vgg\+bits:4 reads as a target behind a defense"):
        parse_space({**base, "trials": [{"weights": str(tmp_path / "vgg+bits:4.pt")}]}, "t.yaml")
    parse_space({**base, "trials": [{"endpoint": {**endpoint, "name": "api+v2"}}]}, "t.yaml")  # a '+' alone is fine
