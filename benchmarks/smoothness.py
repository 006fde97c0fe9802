"""Benchmark: batched input-Hessian power iteration against a per-sample loop, side by side.

    python benchmarks/smoothness.py --model resnet18 --n 1000 --iterations 20            # GPU
    python benchmarks/smoothness.py --model tiny_cnn --n 64 --iterations 20 --device cpu  # CPU

Same samples, same iteration cap, tolerance 0 (both run every iteration, so the times compare
like for like). Prints each way's seconds, the speed-up, and how far the two estimates agree.
With --reference-iterations it also reports how far the default cap is from a long run (how the
defaults were chosen). --checkpoint evaluates a trained model file; otherwise weights are random.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from raystudy.core.checkpoint import load_model
from raystudy.core.data import load_dataset
from raystudy.core.models import build_model
from raystudy.metrics.smoothness import smoothness


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--checkpoint")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--reference-iterations", type=int, default=0)
    parser.add_argument(
        "--loop-samples", type=int, help="time the per-sample loop on this many and scale (default: all)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the figures to this JSON file (with the command)")
    args = parser.parse_args()

    data = load_dataset(
        args.dataset,
        args.data,
        n_test=args.n if args.dataset != "synthetic" else None,
        n_train=64 if args.dataset == "synthetic" else None,
    )
    x = data.test.images[: args.n].float().div(255).to(args.device)
    y = data.test.labels[: args.n].to(args.device)
    if args.checkpoint:
        model = load_model(args.checkpoint, args.device)[0]
    else:
        model = build_model(args.model, data.num_classes, input_size=data.image_size, mean=data.mean, std=data.std).to(
            args.device
        )
    model.eval()
    k = args.loop_samples or len(x)

    batched, t_batched = timed(lambda: smoothness(model, x, y, args.batch_size, args.iterations, tolerance=0.0))
    looped, t_loop = timed(
        lambda: torch.cat(
            [smoothness(model, x[i : i + 1], y[i : i + 1], 1, args.iterations, 0.0, seed=i) for i in range(k)]
        )
    )
    t_loop_all = t_loop * len(x) / k
    rel = (batched[:k] - looped).abs() / looped.abs().clamp_min(1e-12)
    print(
        f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
        f"model {args.checkpoint or args.model}, {len(x)} samples x {args.iterations} iterations"
    )
    print(f"batched (batch {args.batch_size}): {t_batched:.2f} s")
    print(f"per-sample loop: {t_loop:.2f} s on {k} samples -> {t_loop_all:.2f} s for {len(x)}")
    print(f"speed-up: {t_loop_all / t_batched:.1f}x")
    print(
        f"agreement: median relative difference {rel.median():.2e}, max {rel.max():.2e}; "
        f"smoothness mean {batched[:k].mean():.4g} (batched) vs {looped.mean():.4g} (loop) on the same {k} samples"
    )
    figures = {
        "command": " ".join(["python"] + sys.argv),
        "device": args.device,
        "samples": len(x),
        "iterations": args.iterations,
        "batched_s": t_batched,
        "loop_s_scaled": t_loop_all,
        "speedup": t_loop_all / t_batched,
        "agreement_median_rel": float(rel.median()),
        "agreement_max_rel": float(rel.max()),
    }
    if args.reference_iterations:
        reference, _ = timed(lambda: smoothness(model, x, y, args.batch_size, args.reference_iterations, tolerance=0.0))
        gap = (batched - reference).abs() / reference.abs().clamp_min(1e-12)
        print(
            f"{args.iterations} vs {args.reference_iterations} iterations: median relative gap {gap.median():.2e}, "
            f"90th percentile {gap.quantile(0.9):.2e}, max {gap.max():.2e}"
        )
        figures.update(
            reference_iterations=args.reference_iterations,
            gap_median=float(gap.median()),
            gap_p90=float(gap.quantile(0.9)),
            gap_max=float(gap.max()),
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
