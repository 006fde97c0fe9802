"""Sweep: finite-difference penalty gradients against exact double backprop, over models, points of
training and step rules.

    python benchmarks/finite_difference_sweep.py --data ../shared/data/cifar10-jpeg \
        --json results/finite_difference_sweep.json

Models: the CIFAR ResNet-18, VGG-16 and Inception-V3 (its dropout active), BatchNorm in train mode,
as the penalties see them in training. Points: initialisation, after one epoch, and trained (more
epochs on the same seeded subset until it is fitted), SGD with the published momentum and weight
decay. At each point, on one batch of training images, the cosine between the finite-difference and
the exact parameter gradient of:
* IR and ER against double backprop, for the scale-aware default, for the size step alone (no cap
  where the loss is steep: a fixed step in all but name, the form that failed on Inception-V3) over a
  range of steps, for the loss-change cap over a range, and with a free second pass (the activation
  pattern not held) at the default;
* JR against its exact twin (the same random input direction, J u by double backprop), on the same
  model with BatchNorm in elementary operations (PyTorch's kernel has no third derivative), for the
  default, for the pilot's size step alone over a range and for the logit-change target over a range.
Every pair is computed with the same seed, so exact and finite-difference forms see the same dropout
masks. On the trained ResNet-18 it also compares the JR estimator's mean and variance with the
published one's (random projections on the logits).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raystudy.core.data import load_dataset
from raystudy.core.models import build_model
from raystudy.mechanisms import soft_targets
from raystudy.mechanisms.base import ForwardPass
from raystudy.mechanisms.finite_difference import (
    INPUT_LOSS_CHANGE,
    INPUT_STEP,
    JACOBIAN_STEP,
    LOGIT_CHANGE,
    WEIGHT_STEP,
    InputGradientNormFD,
    InputJacobianNormFD,
    WeightGradientNormFD,
    penalty_parameter_gradient,
    unit_input_directions,
)
from raystudy.mechanisms.gradient_norms import InputGradientNorm, InputJacobianNorm, WeightGradientNorm, jr_batch_factor

MODELS = ("resnet18", "vgg16", "inception_v3")
SIZE_STEPS = {"IR": (1e-6, 1e-5, INPUT_STEP, 1e-4, 3e-4, 1e-3), "ER": (1e-7, 1e-6, WEIGHT_STEP, 1e-4, 1e-3)}
JACOBIAN_STEPS = (1e-6, 1e-5, 3e-5, JACOBIAN_STEP, 3e-4, 1e-3)
LOSS_CHANGES = (3e-4, 1e-3, INPUT_LOSS_CHANGE, 1e-2, 3e-2)
LOGIT_CHANGES = (1e-4, LOGIT_CHANGE, 2e-3, 1e-2)
PAIR_SEED = 7  # the seed of every exact / finite-difference pair


# JR's exact twin: only this sweep needs it.
@dataclass(frozen=True)
class InputJacobianNormAlongInputDirection:
    """JR's finite-difference estimator with J u by double backprop instead of a difference quotient:
    its exact twin, drawing the same direction u, for checking the step (not a training option).

    J u is the derivative of (J^T w) . u in w; its parameter gradient differentiates three times,
    which PyTorch's batch_norm refuses: use it on `with_differentiable_batch_norm(model)`."""

    weight: float
    name: str = "jr"
    needs_input_grad: bool = True
    input_sensitive: bool = True
    holds_pattern: bool = False
    double_backward: bool = True

    def __call__(self, fwd: ForwardPass) -> torch.Tensor:
        batch, dims = fwd.x.shape[0], fwd.x[0].numel()
        u = unit_input_directions(fwd.x)
        w = torch.zeros_like(fwd.logits, requires_grad=True)
        (jtw,) = torch.autograd.grad(fwd.logits, fwd.x, grad_outputs=w, create_graph=True)
        (ju,) = torch.autograd.grad(jtw, w, grad_outputs=u, create_graph=True)
        estimate = 0.5 * dims * ju.float().pow(2).sum() / batch
        return self.weight * jr_batch_factor(batch) * estimate / batch


class _DifferentiableBatchNorm2d(torch.nn.Module):
    """Train-mode BatchNorm2d in elementary operations (any order of derivative), sharing the
    original's affine parameters; it leaves the running statistics alone."""

    def __init__(self, bn: torch.nn.BatchNorm2d):
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.bn(x)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
        scale = self.bn.weight.view(1, -1, 1, 1) / torch.sqrt(var + self.bn.eps)
        return (x - mean) * scale + self.bn.bias.view(1, -1, 1, 1)


def with_differentiable_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every BatchNorm2d computed in elementary operations, in place (same parameters,
    same function in train mode), so that JR's exact twin can differentiate it three times."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(model, name, _DifferentiableBatchNorm2d(child))
        else:
            with_differentiable_batch_norm(child)
    return model


class FreeSecondPass:
    """An activation pattern that records nothing and replays nothing: the second pass decides anew."""

    def record(self):
        return nullcontext()

    def replay(self):
        return nullcontext()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(F.cosine_similarity(a.double(), b.double(), dim=0)), 6)


def train_epochs(model, data, epochs: int, args, generator) -> dict[str, float]:
    """SGD epochs over the training subset (unaugmented); the last epoch's loss and accuracy."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    n = len(data.train.labels)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        loss_sum = correct = 0.0
        for start in range(0, n - args.batch_size + 1, args.batch_size):
            idx = order[start : start + args.batch_size]
            logits = model(data.train.images[idx].float().div(255))
            loss = F.cross_entropy(logits, data.train.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += float((logits.argmax(1) == data.train.labels[idx]).sum())
        seen = n - n % args.batch_size
    return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}


def points(model, data, args):
    """(label, training state) at initialisation, after one epoch, and trained."""
    generator = torch.Generator().manual_seed(0)
    yield "initialisation", {}
    state = train_epochs(model, data, 1, args, generator)
    yield "one epoch", {"epochs": 1, **state}
    epochs = 1
    while epochs < args.max_epochs and state["train_accuracy"] < args.fitted_accuracy:
        state = train_epochs(model, data, 1, args, generator)
        epochs += 1
    yield "trained", {"epochs": epochs, **state}


def pair_cosine(model, exact, finite_difference, x, y_soft) -> float:
    _, reference = penalty_parameter_gradient(model, exact, x, y_soft, seed=PAIR_SEED)
    _, estimate = penalty_parameter_gradient(model, finite_difference, x, y_soft, seed=PAIR_SEED)
    return cosine(estimate, reference)


def free_second_pass(penalty):
    class Free(type(penalty)):
        def __call__(self, fwd):
            return super().__call__(type(fwd)(fwd.model, fwd.x, fwd.y_soft, fwd.logits, fwd.ce, FreeSecondPass()))

    return Free(penalty.weight)


def along_gradient(model, name, exact, fd_class, x, y_soft) -> dict:
    """IR or ER: the default rule, the size step alone, the loss-change cap, a free second pass."""
    _, reference = penalty_parameter_gradient(model, exact, x, y_soft, seed=PAIR_SEED)

    def against(penalty) -> float:
        return cosine(penalty_parameter_gradient(model, penalty, x, y_soft, seed=PAIR_SEED)[1], reference)

    default = fd_class(exact.weight)
    return {
        "scale-aware (default)": against(default),
        "size step alone": {
            f"{s:g}": against(fd_class(exact.weight, step=s, loss_change=math.inf)) for s in SIZE_STEPS[name]
        },
        "loss-change cap": {f"{c:g}": against(fd_class(exact.weight, loss_change=c)) for c in LOSS_CHANGES},
        "free second pass": against(free_second_pass(default)),
    }


def jacobian(model, x, y_soft) -> dict:
    """JR against its exact twin, on a copy of the model whose BatchNorm has every derivative: the
    default rule, the pilot's size step alone over a range, and the logit-change target over a range."""
    twin_model = with_differentiable_batch_norm(copy.deepcopy(model))
    exact = InputJacobianNormAlongInputDirection(1.0)

    def against(penalty) -> float:
        return pair_cosine(twin_model, exact, penalty, x, y_soft)

    return {
        "scale-aware (default)": against(InputJacobianNormFD(1.0)),
        "size step alone": {
            f"{s:g}": against(InputJacobianNormFD(1.0, step=s, logit_change=math.inf)) for s in JACOBIAN_STEPS
        },
        "logit-change target": {f"{c:g}": against(InputJacobianNormFD(1.0, logit_change=c)) for c in LOGIT_CHANGES},
    }


def jr_expectation(model, x, y_soft, draws: int) -> dict:
    """Mean and variance over draws of the published estimator and the finite-difference one."""
    probe, out = None, {}
    for name, penalty in (("published", InputJacobianNorm(1.0)), ("finite_difference", InputJacobianNormFD(1.0))):
        values, projections = [], []
        for draw in range(draws):
            value, grad = penalty_parameter_gradient(model, penalty, x, y_soft, seed=1000 + draw)
            if probe is None:
                probe = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1), dtype=grad.dtype)
            values.append(float(value))
            projections.append(float(grad @ probe))
        v, p = torch.tensor(values, dtype=torch.float64), torch.tensor(projections, dtype=torch.float64)
        out[name] = {
            "value_mean": float(v.mean()),
            "value_standard_error": float(v.std() / draws**0.5),
            "value_variance": float(v.var()),
            "gradient_projection_mean": float(p.mean()),
            "gradient_projection_standard_error": float(p.std() / draws**0.5),
            "gradient_projection_variance": float(p.var()),
        }
    return out


def minimum(cases: dict, path: tuple[str, ...]) -> float:
    values = []
    for case in cases.values():
        node = case
        for key in path:
            node = node[key]
        values.append(node)
    return min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10", help="cifar10 (needs --data or $RAYSTUDY_DATA) or synthetic")
    parser.add_argument("--data")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--n-train", type=int, default=256, help="seeded training subset the points are trained on")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--max-epochs", type=int, default=40, help="epochs at most for the trained point")
    parser.add_argument("--fitted-accuracy", type=float, default=0.95, help="training accuracy that ends training")
    parser.add_argument("--eval-batch", type=int, default=8, help="training images the gradients are compared on")
    parser.add_argument("--jr-draws", type=int, default=60, help="draws of the JR expectation check (0: skip)")
    parser.add_argument("--json", help="also write the figures to this JSON file (with the command)")
    args = parser.parse_args()
    data = load_dataset(args.dataset, args.data, n_train=args.n_train, n_test=64, seed=0)
    m = data.num_classes
    idx = torch.randperm(args.n_train, generator=torch.Generator().manual_seed(2))[: args.eval_batch]
    x, y_soft = data.train.images[idx].float().div(255), soft_targets(data.train.labels[idx], m)
    report = {
        "command": "python " + " ".join(sys.argv),
        "settings": {**vars(args), "torch_threads": torch.get_num_threads()},
        "cases": {},
    }
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, m, mean=data.mean, std=data.std)
        for point, state in points(model, data, args):
            started = time.time()
            model.train()
            case = {"model": name, "point": point, **state}
            case["IR"] = along_gradient(model, "IR", InputGradientNorm(0.5), InputGradientNormFD, x, y_soft)
            case["ER"] = along_gradient(model, "ER", WeightGradientNorm(0.05), WeightGradientNormFD, x, y_soft)
            case["JR"] = jacobian(model, x, y_soft)
            if args.jr_draws and name == "resnet18" and point == "trained":
                case["JR expectation"] = jr_expectation(model, x, y_soft, args.jr_draws)
            label = f"{name}, {point}"
            report["cases"][label] = case
            print(label, json.dumps({k: v for k, v in case.items() if k != "JR expectation"}), flush=True)
            print(f"  ({time.time() - started:.0f} s)", flush=True)
            write(report, args.json)  # after every case: a run stopped early keeps what it measured
    cases = report["cases"]
    report["minimum cosine"] = {
        f"{penalty}, {rule}": minimum(cases, (penalty, rule))
        for penalty in ("IR", "ER", "JR")
        for rule in ("scale-aware (default)",)
    }
    report["minimum cosine"].update(
        {
            f"{penalty}, size step alone {step}": minimum(cases, (penalty, "size step alone", step))
            for penalty in ("IR", "ER", "JR")
            for step in cases[next(iter(cases))][penalty]["size step alone"]
        }
    )
    print("minimum cosine over every model and point:", json.dumps(report["minimum cosine"], indent=1))
    write(report, args.json)
    if args.json:
        print(f"wrote {args.json}")


def write(report: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
