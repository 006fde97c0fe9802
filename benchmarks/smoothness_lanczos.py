"""Benchmark: how close power iteration comes to Lanczos (the published estimator) on trained models.

    python benchmarks/smoothness_lanczos.py --checkpoint runs/st/model.pt --checkpoint runs/sam/model.pt \\
        --dataset cifar10 --data ../shared/data/cifar10-jpeg --n 100 --json results/smoothness_lanczos.json

Per model, on the same `--n` test images (a seeded class-balanced subset) and the same start
vectors: Lanczos with `--reference-iterations` Hessian-vector products is the reference (its
convergence shown by Lanczos at fewer iterations); power iteration at each of `--power-iterations`
caps, with the default early-stopping tolerance, is compared per sample with it. Prints and writes,
per estimator, the median, 95th percentile and maximum relative difference |est - ref| / ref of the
per-sample |eigenvalue|, the mean smoothness, and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from raystudy.config.evaluation import DEFAULT_TOLERANCE
from raystudy.core.checkpoint import load_model
from raystudy.core.data import load_dataset
from raystudy.metrics.smoothness import smoothness


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compare(estimate: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    rel = (estimate - reference).abs() / reference.abs().clamp_min(1e-12)
    return {
        "median_rel": float(rel.median()),
        "p95_rel": float(rel.quantile(0.95)),
        "max_rel": float(rel.max()),
        "mean_smoothness": float(estimate.mean()),
    }


def measure(path: str, x, y, args) -> dict:
    model = load_model(path, "cpu")[0].eval()
    run = lambda **kw: timed(lambda: smoothness(model, x, y, args.batch_size, seed=args.seed, **kw))  # noqa: E731
    reference, seconds = run(method="lanczos", lanczos_iterations=args.reference_iterations)
    rows = {"reference": {"method": "lanczos", "iterations": args.reference_iterations, "seconds": seconds}}
    rows["reference"].update(compare(reference, reference))
    for k in args.lanczos_iterations:
        values, seconds = run(method="lanczos", lanczos_iterations=k)
        rows[f"lanczos_{k}"] = {"method": "lanczos", "iterations": k, "seconds": seconds, **compare(values, reference)}
    for k in args.power_iterations:
        values, seconds = run(method="power", iterations=k, tolerance=DEFAULT_TOLERANCE)
        rows[f"power_{k}"] = {"method": "power", "iterations": k, "seconds": seconds, **compare(values, reference)}
    return {"checkpoint": path, "rows": rows, "reference_values": reference.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--reference-iterations", type=int, default=100)
    parser.add_argument("--lanczos-iterations", type=int, nargs="*", default=[20, 40])
    parser.add_argument("--power-iterations", type=int, nargs="*", default=[10, 20, 40, 80, 160])
    parser.add_argument("--json", help="also write the figures to this JSON file (with the command)")
    args = parser.parse_args()

    data = load_dataset(args.dataset, args.data, n_test=args.n, n_train=10)
    x, y = data.test.images.float().div(255), data.test.labels
    models = [measure(path, x, y, args) for path in args.checkpoint]
    print(f"{len(x)} test images; reference: Lanczos with {args.reference_iterations} Hessian-vector products")
    print(f"{'model':40s} {'estimator':12s} {'median':>9s} {'p95':>9s} {'max':>9s} {'mean':>10s} {'s':>7s}")
    for result in models:
        for name, row in result["rows"].items():
            print(
                f"{result['checkpoint'][-40:]:40s} {name:12s} {row['median_rel']:9.2e} {row['p95_rel']:9.2e} "
                f"{row['max_rel']:9.2e} {row['mean_smoothness']:10.4g} {row['seconds']:7.1f}"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"command": " ".join(["python"] + sys.argv), "images": len(x), "models": models}, handle, indent=1
            )


if __name__ == "__main__":
    main()
