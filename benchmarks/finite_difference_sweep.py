"""Sweep: finite-difference penalty gradients against exact double backprop, over the step size.

    python benchmarks/finite_difference_sweep.py --json results/finite_difference_sweep.json

For IR and ER: the cosine between the parameter gradient of the finite-difference form and of the
exact form, per step size, with the first pass's activation pattern held (the default) and, to show
why it is held, with a free second pass; on a trained tiny CNN (ReLU and max-pool), the same CNN with
SiLU (smooth) and a ResNet-18 at a small batch, all in train mode (BatchNorm on batch statistics).
For JR: both estimators are random, so it compares the mean over draws of their values and of a fixed
projection of their gradients, with standard errors, and their variances.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from raystudy.data import load_dataset
from raystudy.mechanisms import soft_targets
from raystudy.mechanisms.finite_difference import (
    INPUT_STEP,
    InputGradientNormFD,
    InputJacobianNormFD,
    WeightGradientNormFD,
    penalty_parameter_gradient,
)
from raystudy.mechanisms.gradient_norms import InputGradientNorm, InputJacobianNorm, WeightGradientNorm
from raystudy.models import build_model

STEPS = (1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1)


class FreeSecondPass:
    """An activation pattern that records nothing and replays nothing: the second pass decides anew."""

    def record(self):
        return nullcontext()

    def replay(self):
        return nullcontext()


def smooth(model: nn.Module) -> nn.Module:
    """The same architecture with every ReLU replaced by SiLU (no kinks)."""
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, nn.SiLU())
        else:
            smooth(child)
    return model


def trained(model: nn.Module, data, steps: int, batch: int, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(data.train.labels), (batch,), generator=generator)
        x = data.train.images[idx].float().div(255)
        loss = F.cross_entropy(model(x), data.train.labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def gradient_cosines(model, exact, fd_class, x, y_soft, free: bool) -> dict[str, float]:
    _, reference = penalty_parameter_gradient(model, exact, x, y_soft)
    out = {}
    for step in STEPS:
        penalty = fd_class(exact.weight, step=step)
        if free:
            penalty = _with_free_second_pass(penalty)
        _, grad = penalty_parameter_gradient(model, penalty, x, y_soft)
        out[f"{step:g}"] = round(cosine(grad, reference), 5)
    return out


def _with_free_second_pass(penalty):
    class Free(type(penalty)):
        def __call__(self, fwd):
            return super().__call__(type(fwd)(fwd.model, fwd.x, fwd.y_soft, fwd.logits, fwd.ce, FreeSecondPass()))

    return Free(penalty.weight, step=penalty.step)


def jr_comparison(model, x, y_soft, draws: int, step: float) -> dict[str, float]:
    torch.manual_seed(0)
    probe = None
    rows = {"published": [], "finite_difference": []}
    for name, penalty in (("published", InputJacobianNorm(1.0)), ("finite_difference", InputJacobianNormFD(1.0, step))):
        for _ in range(draws):
            value, grad = penalty_parameter_gradient(model, penalty, x, y_soft)
            if probe is None:
                probe = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1), dtype=grad.dtype)
            rows[name].append((float(value), float(grad @ probe)))
    out = {}
    for name, pairs in rows.items():
        values = torch.tensor([v for v, _ in pairs], dtype=torch.float64)
        projections = torch.tensor([p for _, p in pairs], dtype=torch.float64)
        out[name] = {
            "value_mean": float(values.mean()),
            "value_standard_error": float(values.std() / draws**0.5),
            "value_variance": float(values.var()),
            "gradient_projection_mean": float(projections.mean()),
            "gradient_projection_standard_error": float(projections.std() / draws**0.5),
        }
    return out


def cases(args):
    data = load_dataset(args.dataset, args.data, n_train=args.n_train, n_test=64, seed=0)
    m = data.num_classes
    torch.manual_seed(0)
    relu_cnn = trained(build_model("tiny_cnn", m, mean=data.mean, std=data.std), data, args.train_steps, 64, seed=0)
    torch.manual_seed(0)
    silu_cnn = trained(
        smooth(build_model("tiny_cnn", m, mean=data.mean, std=data.std)), data, args.train_steps, 64, seed=0
    )
    torch.manual_seed(0)
    resnet = trained(build_model("resnet18", m, mean=data.mean, std=data.std), data, args.resnet_steps, 16, seed=0)
    generator = torch.Generator().manual_seed(2)
    idx = torch.randperm(len(data.test.labels), generator=generator)
    x = data.test.images[idx].float().div(255)
    y = data.test.labels[idx]
    yield "tiny_cnn (ReLU, max-pool), trained, batch 32", relu_cnn, x[:32], soft_targets(y[:32], m)
    yield "tiny_cnn (SiLU), trained, batch 32", silu_cnn, x[:32], soft_targets(y[:32], m)
    yield f"resnet18, trained {args.resnet_steps} steps, batch 8", resnet, x[:8], soft_targets(y[:8], m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10", help="cifar10 (needs --data or $RAYSTUDY_DATA) or synthetic")
    parser.add_argument("--data")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--resnet-steps", type=int, default=60)
    parser.add_argument("--jr-draws", type=int, default=200)
    parser.add_argument("--json", help="also write the figures to this JSON file (with the command)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = {"command": "python " + " ".join(sys.argv), "steps": list(STEPS), "cases": {}}
    for label, model, x, y_soft in cases(args):
        model.train()
        case = {}
        for name, exact, fd in (
            ("IR", InputGradientNorm(0.5), InputGradientNormFD),
            ("ER", WeightGradientNorm(0.05), WeightGradientNormFD),
        ):
            case[f"{name} cosine, pattern held"] = gradient_cosines(model, exact, fd, x, y_soft, free=False)
            case[f"{name} cosine, free second pass"] = gradient_cosines(model, exact, fd, x, y_soft, free=True)
            print(label, name, "held", case[f"{name} cosine, pattern held"], flush=True)
            print(label, name, "free", case[f"{name} cosine, free second pass"], flush=True)
        case["JR"] = jr_comparison(model, x, y_soft, args.jr_draws, step=INPUT_STEP)
        print(label, "JR", json.dumps(case["JR"]), flush=True)
        report["cases"][label] = case
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
