"""Transfer attacks on [0, 1] pixels: one L-inf iterative attack whose options give PGD, MI, DI, DIM.

    PGD = LinfAttack(eps)                                   20 sign steps of 2/255, no random start
    MI  = LinfAttack(eps, momentum=0.9)                     Dong et al. 2018
    DI  = LinfAttack(eps, diversity_prob=0.7)               Xie et al. 2019
    DIM = LinfAttack(eps, momentum=0.9, diversity_prob=0.7)

Settings follow METHOD.md (the published code): cross-entropy loss (or, as an option, the logit
loss of the targeted-transfer literature), surrogate in eval mode,
projection onto the eps-ball and [0, 1] after each step, targeted attacks descend the loss of the
target class, and the AEs are rounded to 8-bit pixels before they are shown to anyone.
AutoAttack (standard) comes from torchattacks, configured to the reference settings.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raystudy.config.evaluation import ATTACKS, PIXEL
from raystudy.errors import require_extra
from raystudy.mechanisms.model_state import eval_mode

__all__ = ["ATTACKS", "PIXEL", "LinfAttack", "autoattack", "make_attack", "round_to_8bit", "torchattack_examples"]


@dataclass(frozen=True)
class LinfAttack:
    eps: float
    steps: int = 20
    step_size: float = 2 * PIXEL
    random_start: bool = False
    momentum: float = 0.0  # MI's decay on the L1-normalized gradient; 0 = plain sign steps
    diversity_prob: float = 0.0  # DI: probability of the resize-and-pad input transform per step
    resize_range: tuple[float, float] = (0.75, 1.5)
    round_to_8bit: bool = True
    loss: str = "ce"  # ce: cross-entropy (METHOD.md); logit: the logit of the true or target class

    def __call__(
        self,
        models: nn.Module | Sequence[nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """AEs for `x` (labels `y`); `target` classes make it targeted. Several models (an LGV
        ensemble) are used one per iteration, cycling in a shuffled order."""
        models = list(models) if isinstance(models, (list, tuple)) else [models]
        order = torch.randperm(len(models), generator=generator).tolist()
        with eval_mode(*models):
            return self._run(models, order, x.detach(), y, target, generator)

    def _run(self, models, order, x, y, target, generator) -> torch.Tensor:
        delta = torch.zeros_like(x)
        if self.random_start:
            delta = (torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1) * self.eps
            delta = (x + delta).clamp(0, 1) - x
        direction = torch.zeros_like(x)
        for step in range(self.steps):
            model = models[order[step % len(order)]]
            delta.requires_grad_(True)
            logits = model(self._diversify(x + delta, generator))
            loss = self._loss(logits, y if target is None else target)
            (grad,) = torch.autograd.grad(loss, delta)
            if self.momentum:
                grad = self.momentum * direction + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
                direction = grad
            sign = -1.0 if target is not None else 1.0  # targeted: descend the target class's loss
            delta = (delta.detach() + sign * self.step_size * grad.sign()).clamp(-self.eps, self.eps)
            delta = (x + delta).clamp(0, 1) - x
        adversarial = x + delta
        return round_to_8bit(adversarial, x, self.eps) if self.round_to_8bit else adversarial.detach()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What the attack ascends (untargeted, labels y) or descends (targeted, the target classes).
        The logit loss is minus the class's logit: descending it raises the target's logit without
        the softmax's saturation, which is why long targeted schedules use it (Zhao et al. 2021)."""
        if self.loss == "logit":
            return -logits.gather(1, labels[:, None]).sum()
        return F.cross_entropy(logits, labels, reduction="sum")

    def _diversify(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """DI in the published code's form, one draw per iteration for the whole batch.

        r ~ U(0.75, 1.5) and s = floor(side * r); s = side leaves the batch unchanged. Below 1, the
        batch is resized bilinearly to a random side in [s, side) and zero-padded at a random
        offset back to side x side; above 1, resized to a random side in [side, s) and zero-padded
        to s x s (not resized back: the models pool adaptively). The result is used with
        probability `diversity_prob`, else the original batch.
        """
        if not self.diversity_prob:
            return x
        side = x.shape[-1]
        low, high = self.resize_range
        rate = low + (high - low) * float(torch.rand(1, generator=generator))
        scaled = math.floor(side * rate)
        if scaled == side:
            return x
        smallest, out = (scaled, side) if rate < 1 else (side, scaled)
        new = int(torch.randint(smallest, out, (1,), generator=generator))
        resized = F.interpolate(x, size=(new, new), mode="bilinear", align_corners=False)
        top, left = (int(v) for v in torch.randint(0, out - new, (2,), generator=generator))
        padded = F.pad(resized, (left, out - new - left, top, out - new - top))
        return padded if float(torch.rand(1, generator=generator)) < self.diversity_prob else x


def make_attack(
    name: str,
    eps: float,
    steps: int = 20,
    step_size: float = 2 * PIXEL,
    random_start: bool = False,
    loss: str = "ce",
) -> LinfAttack:
    options = {
        "pgd": {},
        "mi": {"momentum": 0.9},
        "di": {"diversity_prob": 0.7},
        "dim": {"momentum": 0.9, "diversity_prob": 0.7},
    }
    if name not in options:
        raise ValueError(f"unknown iterative attack {name!r}; known: {', '.join(options)}")
    return LinfAttack(eps, steps, step_size, random_start, loss=loss, **options[name])


def autoattack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, num_classes: int, seed: int = 0, steps: int = 100
) -> torch.Tensor:
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) from torchattacks, untargeted.

    torchattacks' `AutoAttack` runs its sub-attacks with 10 steps and seeds from the clock; the
    reference uses 100 steps and 5000 Square queries, so its parts are assembled here with those
    settings and a fixed seed. Points it does not need to attack come back unperturbed.
    """
    require_extra("torchattacks", "autoattack", "AutoAttack")
    import torchattacks

    with eval_mode(model):
        parts = [
            torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce"),
            torchattacks.APGDT(
                model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=num_classes
            ),
            torchattacks.FAB(
                model,
                norm="Linf",
                eps=eps,
                steps=steps,
                n_restarts=1,
                seed=seed,
                multi_targeted=True,
                n_classes=num_classes,
            ),
            torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed),
        ]
        adversarial = torchattacks.MultiAttack(parts)(x, y)
    return round_to_8bit(adversarial, x, eps)


# NAA and BFA differentiate a feature map of an input that needs no gradient: only through the
# weights, which their copy of the surrogate keeps differentiable (the others' copies are frozen).
DIFFERENTIATE_THROUGH_WEIGHTS = frozenset({"NAA", "BFA"})


def torchattack_examples(
    surrogate: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    targeted: bool,
    attack: str,
    eps: float,
    steps: int,
    step_size: float,
    options: dict,
    seed: int,
    batch_size: int,
    num_classes: int,
    random_start: bool = False,
) -> torch.Tensor:
    """AEs of one of torchattack's attacks (`torchattack.<Name>`, raystudy.config.torchattack) on
    `surrogate`: budget, steps, step size (its `alpha`) and mode from raystudy's settings, `labels`
    the true classes (untargeted) or the target classes (targeted). It runs on a copy of the
    surrogate (some attacks hook the modules they attack), frozen but for NAA and BFA, seeded
    (torchattack draws from the global generators: seeded here, then left as they were), and its AEs
    are rounded to 8-bit pixels as raystudy's own attacks' are."""
    import copy
    import inspect

    require_extra("torchattack", "torchattack", f"the attack {attack}")
    from torchattack import create_attack
    from torchattack.attack import ATTACK_REGISTRY

    name = attack.split(".", 1)[1]
    accepted = inspect.signature(ATTACK_REGISTRY[name].__init__).parameters
    options = dict(options)
    model = copy.deepcopy(surrogate).eval()
    if name not in DIFFERENTIATE_THROUGH_WEIGHTS:
        model.requires_grad_(False)  # the input's gradient alone (most call loss.backward(): no weight gradients)
    given = {"eps": eps, "steps": steps, "alpha": step_size, "targeted": targeted, "num_classes": num_classes}
    given["random_start"] = options.pop("random_start", random_start) if "random_start" in accepted else None
    kwargs = {k: v for k, v in given.items() if k in accepted and v is not None}
    crafter = create_attack(name, model=model, normalize=None, device=x.device, **kwargs, **options)
    with _seeded_global_generators(seed, x.device):
        adversarial = torch.cat(
            [crafter(x[i : i + batch_size], labels[i : i + batch_size]).detach() for i in range(0, len(x), batch_size)]
        )
    return round_to_8bit(adversarial, x, eps)


def check_torchattack_runs(spec) -> None:
    """Before anything trains: each of the study's torchattack attacks, with its options, run for
    one step on two random images of the size the surrogates see, on each surrogate architecture
    the study trains (without weights), in each of its modes. What only running shows (a layer
    name that is not the model's, an option of the wrong type or range, a missing optional
    package of torchattack's) is then one line, not a trial that fails after its training."""
    from raystudy.config.torchattack import has_targeted_mode, is_torchattack
    from raystudy.core.data import test_labels_for
    from raystudy.core.models import build_model
    from raystudy.errors import RaystudyError

    attacks = [a for a in spec.evaluation.attacks if is_torchattack(a)]
    plans = [plan for plan in spec.plans if plan.loaded is None] or ([spec.search_corner()] if spec.search else [])
    if not attacks or not plans:
        return
    _, num_classes = test_labels_for(plans[0].train)
    size = 224 if plans[0].train.dataset in ("imagenette", "imagenet") else plans[0].train.image_size
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1 % num_classes])
    for model_name in sorted({plan.train.model for plan in plans}):
        model = build_model(model_name, num_classes, input_size=size).eval()
        for attack in attacks:
            modes = [m for m in spec.evaluation.modes if m == "untargeted" or has_targeted_mode(attack)]
            for mode in modes:
                try:
                    options = spec.evaluation.options_of(attack)
                    torchattack_examples(
                        model, x, y, mode == "targeted", attack, 8 / 255, 1, 2 / 255, options, 0, 2, num_classes
                    )
                except Exception as err:  # noqa: BLE001 (whatever the library raises: the user's options are at fault)
                    reason = (str(err).strip().splitlines() or [""])[0][:200]
                    raise RaystudyError(
                        f"attack {attack} with {options or 'no options'} does not run on {model_name} "
                        f"({mode}): {type(err).__name__}: {reason}"
                    ) from None


@contextmanager
def _seeded_global_generators(seed: int, device: torch.device):
    """torch's, numpy's and Python's global generators seeded for the block (torchattack draws from
    all three: BSR shuffles with `random`, splits with numpy), then put back as they were."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def round_to_8bit(adversarial: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Round AEs to 8-bit pixels (what a saved image holds), still inside the eps-ball and [0, 1].

    For 8-bit clean images and budgets of whole pixel steps, rounding never leaves the ball; the
    clamp only matters for clean images that are not 8-bit.
    """
    rounded = (adversarial * 255).round() / 255
    return torch.minimum(torch.maximum(rounded, x - eps), x + eps).clamp(0, 1).detach()
