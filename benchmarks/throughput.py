"""Benchmark: a training step of every mechanism side by side, and the trial-end hook's parts.

    python benchmarks/throughput.py --device cuda --model resnet18 --batch-size 128 --json results/throughput_h100.json
    python benchmarks/throughput.py --device cpu --model tiny_cnn --batch-size 128 --json results/throughput_cpu.json

Every mechanism (ST ... SAM&JR; IR, JR, ER, SAM&IR and SAM&JR with both penalty gradients) takes
`--rounds` rounds of `--steps` timed steps after `--warmup` untimed ones, on the same model, batch and
device, with the faithful recipe and with `fast` (the same step: fast only shortens the schedule, so
the two columns are a check, not a speed-up); each round times ST right before them, so every ratio
to ST is taken within a round. CUDA is synchronized around each timed block. Prints the median
images/s and the median ratio to ST with its spread over rounds, and the ratio to the faithful recipe.
`--packing K` also runs K copies of each step at once and reports their aggregate throughput over
one alone (the packing gain `raystudy plan` uses per mechanism). Then the trial-end hook of one surrogate (accuracy,
smoothness, similarity, each attack) against `--targets`, each part as a fraction of that
surrogate's training time under `fast` (epochs x 50000/batch steps at the measured ST...SAM&JR
rates). `--settings` also times torch.compile and channels_last for the mechanisms without double
backprop and reports how far one step's update moves from eager's (raystudy turns each on in
`fast` only where it is faster and leaves the update unchanged).

`raystudy plan --costs THIS.json` reads the JSON this writes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Callable

import torch

from raystudy.config import EvalConfig, TrainConfig
from raystudy.core.models import build_model
from raystudy.core.precision import tf32, tf32_allowed
from raystudy.mechanisms import ORDER, training_step
from raystudy.metrics.hook import EvalSet, measure_surrogate

TRAIN_IMAGES = 50_000  # CIFAR-10's training split: steps per epoch = TRAIN_IMAGES // batch (drop last)
PENALIZED = ("IR", "JR", "ER", "SAM&IR", "SAM&JR")
PAPER_TARGETS = ("resnet50", "vgg16", "inception_v3", "densenet121")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def training_layout(device: torch.device) -> Callable:
    """What training runs (raystudy/training/loop.py): channels_last models and batches on CUDA, else as built."""

    def channels_last(t):  # a batch or a model
        if isinstance(t, torch.Tensor):
            return t.contiguous(memory_format=torch.channels_last)
        return t.to(memory_format=torch.channels_last)

    return channels_last if device.type == "cuda" else (lambda t: t)


def under_training_flags(config: TrainConfig, step: Callable[[], object], recipe=None) -> Callable[[], object]:
    """`step` under the precision training runs `config` with (raystudy.core.precision: TF32 per phase,
    bf16 autocast where asked), set around every call so no timer leaves a flag to the next one;
    `recipe`: whose TF32 setting to use (ST timed beside a mechanism runs under the mechanism's)."""
    allowed = tf32_allowed(recipe or config.recipe())
    device_type = "cuda" if torch.cuda.is_available() else "cpu"

    def flagged():
        autocast = torch.autocast(device_type, torch.bfloat16) if config.precision == "bf16" else nullcontext()
        with tf32(allowed), autocast:
            return step()

    return flagged


def step_timer(config: TrainConfig, args, device: torch.device, layout: Callable | None = None) -> Callable[[], object]:
    """One training step of `config` as training runs it (layout, precision; cudnn.benchmark is set
    once in main as training sets it), on random images of the benchmark's shape."""
    layout = layout or training_layout(device)
    torch.manual_seed(0)
    model = layout(build_model(args.model, 10, input_size=args.image_size).to(device))
    recipe = config.recipe()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=config.weight_decay)
    from raystudy.mechanisms.sam import SAM

    sam = SAM(model.parameters(), recipe.sam_rho) if recipe.sam_rho else None
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.rand(4 * config.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    labels = torch.randint(0, 10, (4 * config.batch_size,), generator=generator).to(device)

    def draw():
        idx = torch.randint(0, len(labels), (config.batch_size,), device=device)
        return layout(images[idx]), labels[idx]

    def step():
        x, y = draw()
        return training_step(model, recipe, optimizer, x, y, 10, sam, partners=draw)

    return step


def planned_step_bytes(config: TrainConfig, args) -> float | None:
    """What raystudy.budget.memory plans for one step's activations (slack included), to hold against
    peak_step_bytes; None for a model it has no measurement of."""
    from raystudy.budget import memory

    model = memory.model_bytes(args.model, args.image_size)
    if model is None:
        return None
    kwargs = dict(pixels=args.image_size, train_images=0, eval_batch=0, eval_images=0)
    planned = memory.trial_memory("", model, [], train_batch=config.batch_size, shape=config.shape(), **kwargs)
    return planned.training_per_image * config.batch_size


def peak_step_bytes(step: Callable[[], object], device: torch.device) -> int | None:
    """The most memory one step allocates on a CUDA device beyond what was allocated before it (the
    models, optimizer states and image buffers of every timer alive): its activations and transients.
    None on the CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def variants(mechanism: str) -> list[str]:
    return ["exact", "finite_difference"] if mechanism in PENALIZED else ["exact"]


def time_mechanisms(args, device) -> list[dict]:
    """Every mechanism is timed beside ST: each round times ST, then the mechanism's faithful and
    fast steps, back to back, so a machine that slows down or speeds up (other jobs, clocks,
    allocator warm-up) moves both sides of a ratio alike; ST runs under the mechanism's precision.
    Each row reports the median over rounds, the spread (min, max) of its seconds per step and of
    its per-round ratio to ST, and (CUDA) one step's peak memory beyond what was allocated before it, beside
    raystudy.budget.memory's planned figure for it."""

    def config_of(mechanism: str, preset: str, gradient: str = "exact") -> TrainConfig:
        return TrainConfig.from_preset(
            preset, mechanism=mechanism, batch_size=args.batch_size, penalty_gradient=gradient
        )

    def timer(mechanism: str, preset: str, gradient: str = "exact"):
        config = config_of(mechanism, preset, gradient)
        return under_training_flags(config, step_timer(config, args, device))

    st_config = config_of("ST", "fast")
    st_raw = step_timer(st_config, args, device)
    seconds_per_call(under_training_flags(st_config, st_raw), device, args.steps, args.warmup)
    st_rounds: list[float] = []
    rows = []
    for mechanism in ORDER:
        for gradient in variants(mechanism):
            steps = {preset: timer(mechanism, preset, gradient) for preset in ("faithful", "fast")}
            # ST timed under this mechanism's precision, so a ratio compares steps, not TF32 with fp32
            st_step = under_training_flags(st_config, st_raw, config_of(mechanism, "fast", gradient).recipe())
            rounds: dict[str, list[float]] = {preset: [] for preset in steps}
            ratios: dict[str, list[float]] = {preset: [] for preset in steps}
            for round_ in range(args.rounds):
                st = seconds_per_call(st_step, device, args.steps, 0)
                st_rounds.append(st)
                for preset, step in steps.items():
                    seconds = seconds_per_call(step, device, args.steps, args.warmup if round_ == 0 else 0)
                    rounds[preset].append(seconds)
                    ratios[preset].append(seconds / st)
            for preset in steps:
                rows.append(_row(mechanism, gradient, preset, rounds[preset], ratios[preset], args.batch_size))
                r = rows[-1]
                r["peak_step_bytes"] = peak_step_bytes(steps[preset], device)
                r["planned_step_bytes"] = planned_step_bytes(config_of(mechanism, preset, gradient), args)
                print(
                    f"  {mechanism:7s} {gradient:17s} {preset:8s} {r['images_per_second']:10.1f} img/s  "
                    f"x ST {r['ratio_to_st']:.2f} [{r['ratio_to_st_min']:.2f}, {r['ratio_to_st_max']:.2f}]",
                    flush=True,
                )
    faithful = {
        (r["mechanism"], r["penalty_gradient"]): r["seconds_per_step"] for r in rows if r["preset"] == "faithful"
    }
    for r in rows:
        r["ratio_to_faithful"] = r["seconds_per_step"] / faithful[(r["mechanism"], r["penalty_gradient"])]
        r["ratio_to_exact"] = r["seconds_per_step"] / next(
            q["seconds_per_step"]
            for q in rows
            if (q["mechanism"], q["preset"], q["penalty_gradient"]) == (r["mechanism"], r["preset"], "exact")
        )
    low, middle, high = min(st_rounds), statistics.median(st_rounds), max(st_rounds)
    print(f"  ST over all {len(st_rounds)} rounds: median {middle:.4f} s/step, min {low:.4f}, max {high:.4f}")
    return rows


def _row(mechanism: str, gradient: str, preset: str, seconds: list[float], ratios: list[float], batch: int) -> dict:
    median = statistics.median(seconds)
    return {
        "mechanism": mechanism,
        "penalty_gradient": gradient,
        "preset": preset,
        "seconds_per_step": median,
        "seconds_per_step_min": min(seconds),
        "seconds_per_step_max": max(seconds),
        "images_per_second": batch / median,
        "ratio_to_st": statistics.median(ratios),
        "ratio_to_st_min": min(ratios),
        "ratio_to_st_max": max(ratios),
        "rounds": len(seconds),
    }


PACKING_TIMEOUT = 600  # seconds a packed copy may take to start or to finish its steps


def _packed_worker(args, device, mechanism: str, gradient: str, barrier, queue) -> None:
    """One of `--packing` processes timing the same step at once (as trials sharing a GPU do)."""
    try:
        torch.backends.cudnn.benchmark = True
        torch.set_num_threads(max(1, torch.get_num_threads() // args.packing))
        config = TrainConfig.from_preset(
            "fast", mechanism=mechanism, batch_size=args.batch_size, penalty_gradient=gradient
        )
        step = under_training_flags(config, step_timer(config, args, device))
        seconds_per_call(step, device, 1, args.warmup)
        barrier.wait(timeout=PACKING_TIMEOUT)
        queue.put(("seconds", seconds_per_call(step, device, args.steps, 0)))
    except BaseException as error:  # an OOM, a broken barrier: the parent reports it, never hangs
        barrier.abort()
        queue.put(("error", f"{type(error).__name__}: {str(error)[:200]}"))


def time_packing(args, device, rows) -> dict[str, dict[str, float]]:
    """Aggregate throughput of `--packing` copies of each mechanism's step running at once, relative
    to one alone (its median step from the rounds above): the gain `raystudy plan` applies to trials
    that share a device (gpu: 1/k). A copy that fails or hangs past PACKING_TIMEOUT is reported and
    that mechanism gets no gain (the plan falls back to ST's)."""
    import multiprocessing
    import queue as queues

    context = multiprocessing.get_context("spawn")
    alone = {
        (r["mechanism"], r["penalty_gradient"]): r["seconds_per_step"]
        for r in rows
        if r["preset"] == "fast" and (not args.packing_mechanisms or r["mechanism"] in args.packing_mechanisms)
    }
    gains: dict[str, dict[str, float]] = {}
    for (mechanism, gradient), single in alone.items():
        key = mechanism if gradient == "exact" else f"{mechanism}:{gradient}"
        barrier, results = context.Barrier(args.packing), context.Queue()
        workers = [
            context.Process(target=_packed_worker, args=(args, device, mechanism, gradient, barrier, results))
            for _ in range(args.packing)
        ]
        for worker in workers:
            worker.start()
        answers = []
        try:
            answers = [results.get(timeout=2 * PACKING_TIMEOUT) for _ in workers]
        except queues.Empty:
            answers.append(("error", f"a copy gave no answer within {2 * PACKING_TIMEOUT} s"))
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
        failed = [text for kind, text in answers if kind == "error"]
        failed += [f"a copy exited with {w.exitcode}" for w in workers if w.exitcode not in (0, None)]
        if failed:
            print(f"  {key:28s} {args.packing} at once: failed ({failed[0]})", flush=True)
            continue
        gain = args.packing * single / max(seconds for _, seconds in answers)  # k steps in the slowest copy's time
        gains[key] = {str(args.packing): gain}
        print(f"  {key:28s} {args.packing} at once: {gain:.2f}x one alone", flush=True)
    return gains


def time_hook(args, device, rows) -> dict:
    """The hook's parts for one surrogate, and each as a fraction of that surrogate's fast training."""
    torch.manual_seed(0)
    surrogate = build_model(args.model, 10, input_size=args.image_size).to(device)
    names = PAPER_TARGETS if args.targets == "paper" else (args.targets,) * 4
    targets = {
        f"{name}_{i}": build_model(name, 10, input_size=args.image_size).to(device) for i, name in enumerate(names)
    }
    n = args.n_eval
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=generator)
    eval_set = EvalSet(
        torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=generator),
        labels,
        (labels + 1) % 10,
        torch.arange(n).numpy(),
    )
    config = EvalConfig(n_eval=n)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measured = measure_surrogate(surrogate, targets, eval_set, config)
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    parts = {row.statistic: row.value for row in measured if row.name == "seconds"}
    fast = TrainConfig.from_preset("fast")
    steps = fast.epochs * (TRAIN_IMAGES // args.batch_size)
    per_step = {
        r["mechanism"]: r["seconds_per_step"]
        for r in rows
        if r["preset"] == "fast" and r["penalty_gradient"] == "exact"
    }
    training = {m: s * steps for m, s in per_step.items()}
    return {
        "n_eval": n,
        "targets": list(names),
        "evaluation": {"budgets": list(config.budgets), "attacks": list(config.attacks), "modes": list(config.modes)},
        "seconds": parts,
        "peak_bytes": peak,  # CUDA: the hook's peak at EvalConfig's batch, every model on the device
        "fast_training_seconds": training,
        "fraction_of_fast_training": {m: {p: s / t for p, s in parts.items()} for m, t in training.items()},
    }


def time_settings(args, device) -> list[dict]:
    """torch.compile and channels_last for the mechanisms without double backprop (eager NCHW = 1)."""

    def channels_last(t):  # a batch or a model
        if isinstance(t, torch.Tensor):
            return t.contiguous(memory_format=torch.channels_last)
        return t.to(memory_format=torch.channels_last)

    def compiled(t):  # the model only; batches stay as they are
        return t if isinstance(t, torch.Tensor) else torch.compile(t)

    out = []
    for mechanism in ("ST", "MU", "SAM", "AT"):
        config = TrainConfig.from_preset("fast", mechanism=mechanism, batch_size=args.batch_size)
        base = seconds_per_call(
            under_training_flags(config, step_timer(config, args, device, lambda t: t)), device, args.steps, args.warmup
        )
        for name, layout in (("channels_last", channels_last), ("compile", compiled)):
            try:
                seconds = seconds_per_call(
                    under_training_flags(config, step_timer(config, args, device, layout)),
                    device,
                    args.steps,
                    args.warmup + 2,
                )
            except Exception as error:  # a compiler missing on this machine is a result, not a crash
                out.append({"mechanism": mechanism, "setting": name, "error": f"{type(error).__name__}: {error}"[:300]})
                continue
            out.append(
                {
                    "mechanism": mechanism,
                    "setting": name,
                    "speedup": base / seconds,
                    "update_difference": update_difference(config, args, device, layout),
                }
            )
            print(f"  {mechanism:5s} {name:14s} x{base / seconds:.2f}  {out[-1]['update_difference']:.1e}", flush=True)
    return out


def update_difference(config, args, device, layout) -> float:
    """Largest parameter difference after one identical step with and without the setting, relative
    to the largest change the eager step makes."""
    results = []
    for wrap in (lambda t: t, layout):
        torch.manual_seed(0)
        model = build_model(args.model, 10, input_size=args.image_size).to(device)
        wrapped = wrap(model)
        torch.manual_seed(1)
        x = torch.rand(config.batch_size, 3, args.image_size, args.image_size).to(device)
        y = torch.randint(0, 10, (config.batch_size,)).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(2)
        x = wrap(x)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        training_step(wrapped, config.recipe(), optimizer, x, y, 10, partners=lambda: (x.flip(0), y.flip(0)))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - start)
    return float((results[0] - results[1]).abs().max() / results[0].abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds, each timing ST beside the mechanism; medians count"
    )
    parser.add_argument("--targets", default=None, help="'paper' (the 4 CIFAR targets) or one model name x4")
    parser.add_argument("--n-eval", type=int, default=1000, help="evaluation images of the hook")
    parser.add_argument("--no-hook", action="store_true", help="skip timing the trial-end hook")
    parser.add_argument("--settings", action="store_true", help="also time torch.compile and channels_last")
    parser.add_argument("--settings-only", action="store_true", help="time only torch.compile and channels_last")
    parser.add_argument(
        "--packing", type=int, default=0, help="also time K copies of each step at once (the packing gain; 0: no)"
    )
    parser.add_argument(
        "--packing-mechanisms",
        type=lambda text: text.split(","),
        default=None,
        help="comma list: time the packing of these mechanisms only (default: every one)",
    )
    parser.add_argument("--json", help="also write the figures to this JSON file (with the command)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as training sets it (raystudy/training/loop.py, not deterministic)
    args.targets = args.targets or ("paper" if device.type == "cuda" else args.model)
    report = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "dataset": "cifar10",  # random images of CIFAR-10's shape; steps per epoch from its 50000 images
        "train_images": TRAIN_IMAGES,
    }
    if not args.settings_only:
        print(f"training steps ({args.model}, batch {args.batch_size}, {device}):", flush=True)
        report["mechanisms"] = time_mechanisms(args, device)
        print_table(report["mechanisms"])
    if args.packing > 1 and not args.settings_only:
        print(f"packing ({args.packing} copies of a step at once on one {device.type}):", flush=True)
        report["packing_gain"] = time_packing(args, device, report["mechanisms"])
    if not args.no_hook and not args.settings_only:
        print(f"trial-end hook ({args.n_eval} images, targets {args.targets}):", flush=True)
        report["hook"] = time_hook(args, device, report["mechanisms"])
        for part, seconds in report["hook"]["seconds"].items():
            share = report["hook"]["fraction_of_fast_training"]["ST"][part]
            print(f"  {part:12s} {seconds:8.2f} s  = {share:.3f} of an ST surrogate's fast training", flush=True)
    if args.settings or args.settings_only:
        print(
            "settings (speed-up over eager NCHW; largest weight-update difference after one step, relative):",
            flush=True,
        )
        report["settings"] = time_settings(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


def print_table(rows: list[dict]) -> None:
    header = ("mechanism", "gradient", "img/s faithful", "img/s fast", "x ST", "fast/faithful", "vs exact")
    print(f"{header[0]:9s} {header[1]:17s} " + " ".join(f"{h:>14s}" for h in header[2:]))
    for r in rows:
        if r["preset"] != "fast":
            continue
        faithful = next(
            q
            for q in rows
            if q["preset"] == "faithful"
            and (q["mechanism"], q["penalty_gradient"]) == (r["mechanism"], r["penalty_gradient"])
        )
        print(
            f"{r['mechanism']:9s} {r['penalty_gradient']:17s} {faithful['images_per_second']:14.1f} "
            f"{r['images_per_second']:14.1f} {r['ratio_to_st']:14.2f} {r['ratio_to_faithful']:14.2f} "
            f"{r['ratio_to_exact']:14.2f}"
        )


if __name__ == "__main__":
    main()
