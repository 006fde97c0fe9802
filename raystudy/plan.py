"""What a study costs before it runs: per trial and in total, from per-mechanism step costs.

Costs come from `benchmarks/throughput.py --json` (measured seconds per training step of every
mechanism, and the trial-end hook's seconds per part), or, by default, from the per-surrogate GPU
minutes quoted for the published recipe on one H100 (ResNet-18, CIFAR-10, batch 128, fp32, 200
epochs), marked as quoted rather than measured. A step's cost is taken per image, so another batch
size scales it; another model or dataset than the costs' is reported as an assumption. Wall time
on N GPUs uses the measured packing gain (aggregate throughput of k trials sharing one GPU relative
to one trial alone), not k.

No Ray here: `raystudy plan` calls this on a loaded study.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from raystudy.config import StudySpec, TrainConfig
from raystudy.config.study import TrialPlan
from raystudy.errors import RaystudyError
from raystudy.mechanisms import ORDER

DATASET_TRAIN_IMAGES = {"cifar10": 50_000, "imagenette": 9_469, "synthetic": 512}

# Quoted (not measured by this repository): GPU minutes per 200-epoch ResNet-18 surrogate on one
# H100 with the published recipe. MU/CM/CO/LS cost what ST does (a batch transform or a target
# change); the SAM combinations are taken as SAM's two passes of IR's or JR's step.
_QUOTED_MINUTES = {"ST": 14.3, "SAM": 33.5, "IR": 61.4, "JR": 61.8, "ER": 80.3, "AT": 120.6}
_QUOTED_STEPS = 200 * (50_000 // 128)
_QUOTED_SECONDS = {m: minutes * 60 / _QUOTED_STEPS for m, minutes in _QUOTED_MINUTES.items()}
_QUOTED_SECONDS.update({m: _QUOTED_SECONDS["ST"] for m in ("MU", "CM", "CO", "LS")})
_QUOTED_SECONDS["SAM&IR"] = 2 * _QUOTED_SECONDS["IR"]
_QUOTED_SECONDS["SAM&JR"] = 2 * _QUOTED_SECONDS["JR"]
# Aggregate throughput of k ResNet-18 trainings sharing one H100, relative to one alone (quoted).
QUOTED_PACKING_GAIN = {1: 1.0, 4: 2.36}


@dataclass(frozen=True)
class StepCosts:
    """Seconds per training step per (mechanism, penalty_gradient) at `batch_size`, and the hook."""

    source: str
    measured: bool
    model: str
    dataset: str
    batch_size: int
    seconds: Mapping[tuple[str, str], float]
    packing_gain: Mapping[int, float]
    hook_seconds: Mapping[str, float] | None = None  # per part, at hook_n_eval images
    hook_n_eval: int = 0
    hook_attack_runs: int = 0  # attack x mode x budget combinations the hook's timings covered

    def step_seconds(self, train: TrainConfig) -> tuple[float, str]:
        """Seconds per step of `train`'s mechanism at its batch size, and a note where estimated."""
        key = (train.mechanism, train.penalty_gradient)
        note = ""
        if key not in self.seconds:
            if (train.mechanism, "exact") not in self.seconds:
                known = sorted({m for m, _ in self.seconds}, key=ORDER.index)
                raise RaystudyError(
                    f"the costs ({self.source}) have no {train.mechanism}; they have {', '.join(known)}"
                )
            key, note = (train.mechanism, "exact"), "finite-difference cost not in the costs: exact's used"
        return self.seconds[key] * train.batch_size / self.batch_size, note


def quoted_h100() -> StepCosts:
    return StepCosts(
        source="quoted H100 minutes per 200-epoch surrogate (ResNet-18, CIFAR-10, batch 128, fp32); not measured here",
        measured=False,
        model="resnet18",
        dataset="cifar10",
        batch_size=128,
        seconds={(m, "exact"): s for m, s in _QUOTED_SECONDS.items()},
        packing_gain=QUOTED_PACKING_GAIN,
    )


def read_costs(path: str | Path) -> StepCosts:
    """Costs from a `benchmarks/throughput.py --json` file."""
    try:
        data = json.loads(Path(path).read_text())
        rows = data["mechanisms"]
        preferred = "fast" if any(r["preset"] == "fast" for r in rows) else rows[0]["preset"]
        seconds = {
            (r["mechanism"], r["penalty_gradient"]): float(r["seconds_per_step"])
            for r in rows
            if r["preset"] == preferred
        }
        hook = data.get("hook")
        evaluation = (hook or {}).get("evaluation", {})
        runs = (
            len(evaluation.get("budgets", ())) * len(evaluation.get("modes", ())) * len(evaluation.get("attacks", ()))
        )
        return StepCosts(
            source=f"{path} ({data.get('device', '?')}, measured)",
            measured=True,
            model=data["model"],
            dataset=data.get("dataset", "cifar10"),
            batch_size=int(data["batch_size"]),
            seconds=seconds,
            packing_gain={int(k): float(v) for k, v in data.get("packing_gain", QUOTED_PACKING_GAIN).items()},
            hook_seconds=hook["seconds"] if hook else None,
            hook_n_eval=int(hook["n_eval"]) if hook else 0,
            hook_attack_runs=runs,
        )
    except FileNotFoundError:
        raise RaystudyError(f"--costs {path}: no such file") from None
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise RaystudyError(
            f"--costs {path}: not a benchmarks/throughput.py JSON ({type(error).__name__}: {error})"
        ) from None


def packing_gain(gains: Mapping[int, float], per_gpu: int) -> float:
    """Aggregate throughput gain of `per_gpu` trials on one GPU: measured points, linear between
    them, and no further gain beyond the largest measured packing."""
    points = sorted(gains.items())
    if per_gpu >= points[-1][0]:
        return points[-1][1]
    for (k0, g0), (k1, g1) in zip(points, points[1:]):
        if k0 <= per_gpu <= k1:
            return g0 + (g1 - g0) * (per_gpu - k0) / (k1 - k0)
    return float(per_gpu)


@dataclass(frozen=True)
class TrialCost:
    label: str
    plan: TrialPlan
    steps: int
    train_seconds: float
    hook_seconds: float
    note: str

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.hook_seconds


def trial_steps(train: TrainConfig) -> int:
    images = train.n_train or DATASET_TRAIN_IMAGES[train.dataset]
    return train.epochs * max(1, images // train.batch_size)


def hook_seconds(spec: StudySpec, costs: StepCosts, st_step: float, batch_size: int) -> float:
    """The trial-end hook: scaled from measured parts, else estimated from ST's step cost (each
    attack iteration, power iteration and gradient about one ST step's cost per image)."""
    ev = spec.evaluation
    n = ev.n_eval or 10_000
    runs = len(ev.attacks) * len(ev.modes) * len(ev.budgets)
    if costs.hook_seconds:
        scale = n / costs.hook_n_eval
        parts = costs.hook_seconds
        fixed = sum(parts.get(p, 0.0) for p in ("accuracy", "smoothness", "similarity"))
        attacks = sum(v for p, v in parts.items() if p not in ("accuracy", "smoothness", "similarity"))
        return scale * (fixed + attacks * runs / max(1, costs.hook_attack_runs))
    per_image = st_step / batch_size
    iterations = runs * ev.steps + 2 * ev.power_iterations + 5  # + clean passes and target gradients
    return n * iterations * per_image


def plan_costs(spec: StudySpec, costs: StepCosts) -> list[TrialCost]:
    out = []
    for i, plan in enumerate(trial_plans(spec)):
        train = plan.train
        seconds, note = costs.step_seconds(train)
        steps = trial_steps(train)
        total = steps * seconds
        if plan.lgv is not None:
            base = _as_mechanism(train, plan.lgv.base_for(train), batch_size=plan.lgv.batch_size)
            lgv_seconds, _ = costs.step_seconds(base)
            total += (
                plan.lgv.epochs
                * max(1, (train.n_train or DATASET_TRAIN_IMAGES[train.dataset]) // plan.lgv.batch_size)
                * lgv_seconds
            )
        st_step, _ = costs.step_seconds(_as_mechanism(train, "ST"))
        hook = hook_seconds(spec, costs, st_step, train.batch_size)
        samples = spec.search.num_samples if spec.search else 0
        if spec.search and i < samples:
            label = f"{spec.search.mechanism} sample {i + 1}"
        elif spec.search and i < samples + spec.search.confirm.top_k * len(spec.search.confirm.seeds):
            label = f"confirm: search #{(i - samples) // len(spec.search.confirm.seeds) + 1}"
        elif spec.search:
            label = f"confirm: {_label(plan)}"
        else:
            label = _label(plan)
        out.append(TrialCost(label, plan, steps, total, hook, note))
    return out


def _as_mechanism(train: TrainConfig, mechanism: str, **changes: Any) -> TrainConfig:
    """`train` with another mechanism at its default magnitudes (for that mechanism's step cost)."""
    return dataclasses.replace(train, mechanism=mechanism, magnitudes=(), **changes)


def trial_plans(spec: StudySpec) -> list[TrialPlan]:
    """Grid and targets studies: their plans. Searches: num_samples trials at the search box's
    midpoint of epochs (if searched) or the preset's; a search over several mechanisms is costed at
    its first mechanism (the plan says so)."""
    if spec.search is None:
        return list(spec.plans)
    corner = spec.search_corner("low")
    epochs = next((p for p in spec.search.params if p.name == "epochs"), None)
    if epochs is not None:
        middle = int(round((epochs.low + epochs.high) / 2))
        train = dataclasses.replace(
            corner.train, epochs=middle, warmup_epochs=min(corner.train.warmup_epochs, middle - 1)
        )
        corner = TrialPlan(train, corner.lgv, corner.target_name)
    plans = [corner] * spec.search.num_samples
    confirm = spec.search.confirm
    if confirm is not None:  # the top_k retrained with each confirm seed, and the baselines
        retrained = [
            dataclasses.replace(corner, train=dataclasses.replace(corner.train, seed=s)) for s in confirm.seeds
        ]
        baselines = [
            TrialPlan(_as_mechanism(corner.train, name, seed=s)) for name in confirm.baselines for s in confirm.seeds
        ]
        plans += retrained * confirm.top_k + baselines
    return plans


def wall_seconds(trials: list[TrialCost], spec: StudySpec, costs: StepCosts, gpus: int) -> tuple[float, int, float]:
    """(wall seconds, trials per GPU, packing gain) on `gpus` GPUs with the study's packing."""
    gpu = spec.resources.gpu
    per_gpu = max(1, int(math.floor(1 / gpu + 1e-9))) if gpu > 0 else 1
    gain = packing_gain(costs.packing_gain, per_gpu)
    total = sum(t.seconds for t in trials)
    longest = max((t.seconds for t in trials), default=0.0)
    # Perfect load balance, but never shorter than the longest trial run at its packed speed.
    return max(total / (gpus * gain), longest * per_gpu / gain), per_gpu, gain


def render_plan(spec: StudySpec, costs: StepCosts, gpus: int) -> str:
    trials = plan_costs(spec, costs)
    wall, per_gpu, gain = wall_seconds(trials, spec, costs, gpus)
    lines = [
        f"study {spec.name!r} ({spec.kind}, preset {spec.preset}, {spec.dataset}/{spec.model}): {len(trials)} trials"
    ]
    lines.append(f"costs: {costs.source}")
    if (spec.model, spec.dataset) != (costs.model, costs.dataset):
        lines.append(
            f"  assumption: the costs are for {costs.model} on {costs.dataset}; "
            f"this study trains {spec.model} on {spec.dataset}"
        )
    if not costs.hook_seconds:
        lines.append("  the hook is estimated from ST's step cost (no measured hook in the costs)")
    lines.append("")
    lines.append(f"{'trial':34s} {'seed':>4s} {'epochs':>6s} {'steps':>8s} {'train GPU-h':>11s} {'hook GPU-h':>10s}")
    for t in trials:
        train = t.plan.train
        lines.append(
            f"{t.label[:34]:34s} {train.seed:4d} {train.epochs:6d} {t.steps:8d} {t.train_seconds / 3600:11.3f} "
            f"{t.hook_seconds / 3600:10.3f}" + (f"  ({t.note})" if t.note else "")
        )
    train_h = sum(t.train_seconds for t in trials) / 3600
    hook_h = sum(t.hook_seconds for t in trials) / 3600
    lines += [
        "",
        f"total: {train_h + hook_h:.2f} GPU-hours ({train_h:.2f} training, {hook_h:.2f} trial-end hook = "
        f"{100 * hook_h / max(train_h + hook_h, 1e-12):.1f}%)",
        f"wall time on {gpus} GPU(s) at {per_gpu} trial(s) per GPU (gpu: {spec.resources.gpu:g}; packing gain "
        f"{gain:.2f}x, not {per_gpu}x): {wall / 3600:.2f} h",
    ]
    if spec.search is not None and spec.search.conditional:
        lines.append(
            f"note: every sample is costed as {spec.search.mechanisms[0]}; "
            f"the search picks among {spec.search.mechanism}"
        )
    if spec.search is not None and spec.search.proxy_every:
        lines.append("note: an upper bound: ASHA stops some search trials early")
    if spec.resources.gpu == 0:
        lines.append("note: this study asks for no GPU (resources.gpu: 0); the figures are for GPUs")
    return "\n".join(lines)


def _label(plan: TrialPlan) -> str:
    from raystudy.mechanisms import mechanism_label

    train = plan.train
    label, _ = mechanism_label(train.mechanism, dict(train.magnitudes), train.dataset, lgv=plan.lgv is not None)
    if plan.target_name:
        label = f"{plan.target_name} ({train.model})"
    return label + (" [FD]" if train.penalty_gradient == "finite_difference" and train.recipe().penalties else "")
