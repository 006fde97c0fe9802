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

from raystudy.budget import memory
from raystudy.config import StudySpec, TrainConfig
from raystudy.config.study import TrialPlan
from raystudy.config.torchattack import gradients_per_step
from raystudy.config.train import show
from raystudy.errors import RaystudyError
from raystudy.mechanisms import ORDER

DATASET_TRAIN_IMAGES = {"cifar10": 50_000, "imagenette": 9_469, "imagenet": 0, "synthetic": 512}
DATASET_TEST_IMAGES = {"cifar10": 10_000, "imagenette": 3_925, "imagenet": 0, "synthetic": 256}
# A forward pass costs about a third of a training step (forward and backward) per image.
FORWARD_OVER_STEP = 1 / 3

# Quoted (not measured by this repository): GPU minutes per 200-epoch ResNet-18 surrogate on one
# H100 with the published recipe. MU/CM/CO/LS cost what ST does (a batch transform or a target
# change); the SAM combinations are taken as SAM's two passes of IR's or JR's step.
_QUOTED_MINUTES = {"ST": 14.3, "SAM": 33.5, "IR": 61.4, "JR": 61.8, "ER": 80.3, "AT": 120.6}
_QUOTED_STEPS = 200 * (50_000 // 128)
_QUOTED_SECONDS = {m: minutes * 60 / _QUOTED_STEPS for m, minutes in _QUOTED_MINUTES.items()}
_QUOTED_SECONDS.update({m: _QUOTED_SECONDS["ST"] for m in ("MU", "CM", "CO", "LS")})
_QUOTED_SECONDS["SAM&IR"] = 2 * _QUOTED_SECONDS["IR"]
_QUOTED_SECONDS["SAM&JR"] = 2 * _QUOTED_SECONDS["JR"]
# Finite-difference penalty gradients: ~2.5 ST steps on an H100 (quoted with the exact ~10x in
# PITFALLS.md); JR adds its pilot forward pass without a graph (about a third of an ST step); the
# SAM combinations run two of them.
QUOTED_FD_OVER_ST = 2.5
JR_PILOT_OVER_ST = 1 / 3
PENALIZED = ("IR", "JR", "ER", "SAM&IR", "SAM&JR")  # the mechanisms a penalty gradient applies to
_QUOTED_FD_SECONDS = {
    m: (2 if m.startswith("SAM&") else 1)
    * (QUOTED_FD_OVER_ST + (JR_PILOT_OVER_ST if m.endswith("JR") else 0.0))
    * _QUOTED_SECONDS["ST"]
    for m in PENALIZED
}
# Aggregate throughput of k ResNet-18 ST trainings sharing one H100, relative to one alone (quoted).
QUOTED_PACKING_GAIN = {1: 1.0, 4: 2.36}
MEASURED, QUOTED, ESTIMATED = "measured", "quoted", "estimated"
MAX_GPUS = 100_000


@dataclass(frozen=True)
class StepCosts:
    """Seconds per training step per (mechanism, penalty_gradient) at `batch_size`, the packing gain
    per mechanism ({trials per GPU: aggregate gain}), and the hook."""

    source: str
    measured: bool
    model: str
    dataset: str
    batch_size: int
    seconds: Mapping[tuple[str, str], float]
    packing_gain: Mapping[str, Mapping[int, float]]  # mechanism -> gains; "ST" at least
    hook_seconds: Mapping[str, float] | None = None  # per part, at hook_n_eval images
    hook_n_eval: int = 0
    hook_attack_runs: int = 0  # attack x mode x budget combinations the hook's timings covered
    provenance: str = MEASURED  # of `seconds`: measured or quoted
    packing_provenance: str = QUOTED  # of `packing_gain`

    def step_seconds(self, train: TrainConfig) -> tuple[float, str]:
        """Seconds per step of `train`'s mechanism and penalty gradient at its batch size, and where
        the figure comes from: measured, quoted, or estimated (a finite-difference step the costs
        lack: the exact step times the FD/exact ratio measured on other mechanisms, else the quoted
        ~2.5 ST steps)."""
        mechanism = train.mechanism
        gradient = train.penalty_gradient if mechanism in PENALIZED else "exact"
        per_image = train.batch_size / self.batch_size
        if (mechanism, gradient) in self.seconds:
            return self.seconds[(mechanism, gradient)] * per_image, self.provenance
        if (mechanism, "exact") not in self.seconds:
            known = sorted({m for m, _ in self.seconds}, key=ORDER.index)
            raise RaystudyError(f"the costs ({self.source}) have no {mechanism}; they have {', '.join(known)}")
        ratios = [
            fd / self.seconds[(m, "exact")]
            for (m, g), fd in self.seconds.items()
            if g == "finite_difference" and (m, "exact") in self.seconds
        ]
        if ratios:
            ratio = sorted(ratios)[len(ratios) // 2]
            return self.seconds[(mechanism, "exact")] * ratio * per_image, f"{ESTIMATED} (exact x {ratio:.2f})"
        st = self.seconds.get(("ST", "exact"), self.seconds[(mechanism, "exact")])
        fd = _QUOTED_FD_SECONDS[mechanism] / _QUOTED_SECONDS["ST"] * st
        return (
            fd * per_image,
            f"{ESTIMATED} ({_QUOTED_FD_SECONDS[mechanism] / _QUOTED_SECONDS['ST']:.3g} ST steps, quoted)",
        )

    def gain(self, train: TrainConfig, per_gpu: int) -> tuple[float, str]:
        """The packing gain of `per_gpu` trials like `train` on one GPU, and where it comes from
        (the benchmark keys a finite-difference step as 'IR:finite_difference')."""
        if per_gpu == 1:
            return 1.0, "none"
        gradient = train.penalty_gradient if train.mechanism in PENALIZED else "exact"
        for key in (f"{train.mechanism}:{gradient}", train.mechanism) if gradient != "exact" else (train.mechanism,):
            if key in self.packing_gain:
                return packing_gain(self.packing_gain[key], per_gpu), self.packing_provenance
        st = self.packing_gain.get("ST", QUOTED_PACKING_GAIN)
        return packing_gain(st, per_gpu), f"{ESTIMATED} (ST's)"


def quoted_h100() -> StepCosts:
    seconds = {(m, "exact"): s for m, s in _QUOTED_SECONDS.items()}
    seconds.update({(m, "finite_difference"): s for m, s in _QUOTED_FD_SECONDS.items()})
    return StepCosts(
        source="quoted H100 minutes per 200-epoch surrogate (ResNet-18, CIFAR-10, batch 128, fp32); not measured here",
        measured=False,
        model="resnet18",
        dataset="cifar10",
        batch_size=128,
        seconds=seconds,
        packing_gain={"ST": QUOTED_PACKING_GAIN},
        provenance=QUOTED,
        packing_provenance=QUOTED,
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
        costs = StepCosts(
            source=f"{path} ({data.get('device', '?')}, measured)",
            measured=True,
            model=data["model"],
            dataset=data.get("dataset", "cifar10"),
            batch_size=int(data["batch_size"]),
            seconds=seconds,
            packing_gain=_gains(data.get("packing_gain")),
            packing_provenance=MEASURED if data.get("packing_gain") else QUOTED,
            hook_seconds={part: float(s) for part, s in hook["seconds"].items()} if hook else None,
            hook_n_eval=int(hook["n_eval"]) if hook else 0,
            hook_attack_runs=runs,
        )
        _check_costs(costs)
        return costs
    except FileNotFoundError:
        raise RaystudyError(f"--costs {path}: no such file") from None
    except OSError as error:  # a folder, no permission
        raise RaystudyError(f"--costs {path}: cannot be read ({error.strerror or error})") from None
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise RaystudyError(
            f"--costs {path}: not a benchmarks/throughput.py JSON ({type(error).__name__}: {error})"
        ) from None


def _check_costs(costs: StepCosts) -> None:
    """Numbers a plan can divide by and add up (a ValueError, reported by read_costs as its file's)."""
    seconds = [*costs.seconds.values(), *(costs.hook_seconds or {}).values()]
    gains = [(k, g) for mechanism in costs.packing_gain.values() for k, g in mechanism.items()]
    if (
        costs.batch_size < 1
        or (costs.hook_seconds is not None and costs.hook_n_eval < 1)
        or not all(math.isfinite(s) and s >= 0 for s in seconds)
        or not all(k >= 1 and math.isfinite(g) and g > 0 for k, g in gains)
    ):
        raise ValueError(
            "batch_size and the hook's n_eval must be >= 1, seconds finite and >= 0, packing gains finite and > 0"
        )


def _gains(values: Any) -> dict[str, dict[int, float]]:
    """A benchmark's packing gains: per mechanism ({"ST": {"4": 2.4}, ...}), or one set ({"4": 2.4},
    an older file) taken as ST's; none measured: the quoted ST gain."""
    if not values:
        return {"ST": dict(QUOTED_PACKING_GAIN)}
    if all(isinstance(v, Mapping) for v in values.values()):
        return {m: {1: 1.0, **{int(k): float(v) for k, v in g.items()}} for m, g in values.items()}
    return {"ST": {1: 1.0, **{int(k): float(v) for k, v in values.items()}}}


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
    cost_source: str  # of the step cost: measured, quoted or estimated (how)

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.hook_seconds


def trial_steps(train: TrainConfig) -> int:
    images = train.n_train or DATASET_TRAIN_IMAGES[train.dataset]
    return train.epochs * max(1, images // train.batch_size)


def test_pass_seconds(train: TrainConfig, st_step: float) -> float:
    """Every epoch ends with the test accuracy: a forward pass over the test split. Measured step
    costs time steps alone, so it is added to them (the quoted per-surrogate minutes include it);
    it dominates where a small training subset meets a large test split."""
    images = train.n_test or DATASET_TEST_IMAGES[train.dataset]
    return train.epochs * images * FORWARD_OVER_STEP * st_step / train.batch_size


def hook_seconds(spec: StudySpec, costs: StepCosts, st_step: float, batch_size: int) -> float:
    """The trial-end hook: scaled from measured parts, else estimated from ST's step cost (each
    attack iteration, power iteration and gradient about one ST step's cost per image)."""
    ev = spec.evaluation
    n = ev.n_eval or 10_000
    runs = len(ev.attacks) * len(ev.modes) * len(ev.budgets)
    # Targeted attacks may take their own, longer schedule (`targeted_steps`), and some of
    # torchattack's take several gradients a step: the gradients of every run, against `steps`
    # one-gradient steps in each (what measured timings were taken at).
    attack_steps = sum(
        gradients_per_step(attack, ev.options_of(attack)) * len(ev.budgets) * sum(ev.steps_for(m) for m in ev.modes)
        for attack in ev.attacks
    )
    if costs.hook_seconds:
        scale = n / costs.hook_n_eval
        parts = costs.hook_seconds
        fixed = sum(parts.get(p, 0.0) for p in ("accuracy", "smoothness", "similarity"))
        attacks = sum(v for p, v in parts.items() if p not in ("accuracy", "smoothness", "similarity"))
        longer = attack_steps / max(1, runs * ev.steps)
        return scale * (fixed + attacks * runs * longer / max(1, costs.hook_attack_runs))
    per_image = st_step / batch_size
    smoothness = ev.lanczos_iterations if ev.smoothness_method == "lanczos" else ev.power_iterations
    iterations = attack_steps + 2 * smoothness + 5  # + clean passes and target gradients
    return n * iterations * per_image


def plan_costs(spec: StudySpec, costs: StepCosts) -> list[TrialCost]:
    out = []
    for i, plan in enumerate(trial_plans(spec)):
        train = plan.train
        seconds, source = costs.step_seconds(train)
        steps = 0 if plan.loaded else trial_steps(train)  # a loaded model trains nothing
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
        if costs.measured and not plan.loaded:
            total += test_pass_seconds(train, st_step)
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
        out.append(TrialCost(label, plan, steps, total, hook, source))
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


def wall_seconds(
    trials: list[TrialCost], spec: StudySpec, costs: StepCosts, gpus: int, cpus_per_gpu: float | None = None
) -> tuple[float, int, float]:
    """(wall seconds, trials per GPU, overall packing gain) on `gpus` GPUs with the study's packing
    (by GPU share and, where the node's CPUs per GPU are known, by CPUs), each trial sped up by its
    own mechanism's gain."""
    gpu = spec.resources.gpu
    per_gpu = max(1, int(math.floor(1 / gpu + 1e-9))) if gpu > 0 else 1
    if gpu > 0 and cpus_per_gpu is not None:
        per_gpu = max(1, min(per_gpu, int(math.floor(cpus_per_gpu / spec.resources.cpu + 1e-9))))
    total = sum(t.seconds for t in trials)
    packed = sum(t.seconds / costs.gain(t.plan.train, per_gpu)[0] for t in trials)
    longest = max((t.seconds * per_gpu / costs.gain(t.plan.train, per_gpu)[0] for t in trials), default=0.0)
    # Perfect load balance, but never shorter than the longest trial run at its packed speed.
    return max(packed / gpus, longest), per_gpu, total / packed if packed else 1.0


def setting_rows(trials: list[TrialCost], costs: StepCosts, per_gpu: int) -> list[dict[str, Any]]:
    """One row per setting (its seeds folded): trials, epochs, steps, hours per trial and in all,
    the step's cost relative to ST, and where the step cost and the packing gain come from."""
    rows: dict[str, dict[str, Any]] = {}
    for t in trials:
        train = t.plan.train
        st, _ = costs.step_seconds(_as_mechanism(train, "ST"))
        step, _ = costs.step_seconds(train)
        row = rows.setdefault(
            t.label,
            {
                "setting": t.label,
                "trials": 0,
                "epochs": 0 if t.plan.loaded else train.epochs,
                "steps": t.steps,
                "x_st": step / st,
                "cost": t.cost_source,
                "packing": "{:.2f}x {}".format(*costs.gain(train, per_gpu)),
                "hours": 0.0,
                "hook_hours": 0.0,
            },
        )
        row["trials"] += 1
        row["hours"] += t.train_seconds / 3600
        row["hook_hours"] += t.hook_seconds / 3600
    return list(rows.values())


def render_plan(spec: StudySpec, costs: StepCosts, gpus: int, card: memory.Card | None = None) -> str:
    if not 1 <= gpus <= MAX_GPUS:  # --gpus: a count a float can divide by
        raise RaystudyError(f"--gpus {show(gpus)}: give 1 to {MAX_GPUS} GPUs")
    trials = plan_costs(spec, costs)
    wall, per_gpu, gain = wall_seconds(trials, spec, costs, gpus, card.cpus_per_gpu if card else None)
    unit = "GPU" if spec.resources.gpu > 0 else "device"
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
    header = (
        f"{'setting':38s} {'trials':>6s} {'epochs':>6s} {'steps':>7s} {'x ST':>5s} {unit + '-h':>8s} {'hook-h':>7s}"
    )
    lines.append(header + "  step cost; packing gain")
    for r in setting_rows(trials, costs, per_gpu):
        lines.append(
            f"{r['setting'][:38]:38s} {r['trials']:6d} {r['epochs']:6d} {r['steps']:7d} {r['x_st']:5.1f} "
            f"{r['hours']:8.3f} {r['hook_hours']:7.3f}  {r['cost']}; {r['packing']}"
        )
    train_h = sum(t.train_seconds for t in trials) / 3600
    hook_h = sum(t.hook_seconds for t in trials) / 3600
    lines += [
        "",
        f"total: {train_h + hook_h:.2f} {unit}-hours ({train_h:.2f} training, {hook_h:.2f} trial-end hook = "
        f"{100 * hook_h / max(train_h + hook_h, 1e-12):.1f}%)",
        f"wall time on {gpus} {unit}(s) at {per_gpu} trial(s) per {unit} (gpu: {spec.resources.gpu:g}; packing gain "
        f"{gain:.2f}x over the trials, not {per_gpu}x): {wall / 3600:.2f} h",
    ]
    if spec.search is not None and spec.search.conditional:
        lines.append(
            f"note: every sample is costed as {spec.search.mechanisms[0]}; "
            f"the search picks among {spec.search.mechanism}"
        )
    if spec.search is not None and spec.search.proxy_every:
        lines.append("note: an upper bound: ASHA stops some search trials early")
    if spec.resources.gpu == 0:
        lines.append("note: this study asks for no GPU (resources.gpu: 0): the hours are on the costs' device")
    packing = cpu_packing(spec, card)
    if packing:
        lines.append(packing)
    return "\n".join(lines)


def _label(plan: TrialPlan) -> str:
    from raystudy.mechanisms import mechanism_label

    train = plan.train
    if plan.loaded:
        return f"{plan.loaded.name} (loaded)"
    label, _ = mechanism_label(train.mechanism, dict(train.magnitudes), train.dataset, lgv=plan.lgv is not None)
    if plan.target_name:
        label = f"{plan.target_name} ({train.model})"
    return label + (" [FD]" if train.penalty_gradient == "finite_difference" and train.shape().has_penalties else "")


def endpoint_queries(spec: StudySpec, endpoints) -> list[dict[str, Any]]:
    """Per endpoint: the queries the study's query phase sends at most (the clean evaluation images
    once, shared by every trial, then each trial's AEs: attacks x modes x budgets) and their cost."""
    ev = spec.evaluation
    n = ev.n_eval or 10_000
    sets = sum(len(ev.modes) - (attack == "autoattack" and "targeted" in ev.modes) for attack in ev.attacks)
    trials = len(trial_plans(spec))
    queries = n + trials * n * sets * len(ev.budgets)
    out = []
    for endpoint in endpoints:
        price = endpoint.price_per_1000
        out.append(
            {
                "endpoint": endpoint.name,
                "queries": queries,
                "budget": endpoint.budget,
                "cost": None if price is None else queries / 1000 * price,
            }
        )
    return out


def render_endpoint_queries(rows: list[dict[str, Any]]) -> str:
    lines = ["", "black-box targets (raystudy query; answers already kept in the experiment are not sent again):"]
    for r in rows:
        cost = "no price given (price_per_1000)" if r["cost"] is None else f"{r['cost']:.2f} at its price per 1,000"
        budget = "no budget" if r["budget"] is None else f"budget {r['budget']}"
        over = (
            "  OVER BUDGET: the query phase will refuse"
            if r["budget"] is not None and r["queries"] > r["budget"]
            else ""
        )
        lines.append(f"  {r['endpoint']}: at most {r['queries']} queries ({budget}); cost {cost}{over}")
    return "\n".join(lines)


def _model_of(plan: TrialPlan) -> str:
    """The architecture a plan trains or loads (a loaded raystudy model file names none: its stem)."""
    if plan.loaded is not None:
        return plan.loaded.architecture or plan.loaded.name
    return plan.train.model


def _pixels(train: TrainConfig) -> int:
    return memory.DATASET_PIXELS.get(train.dataset, train.image_size)


def trial_memories(spec: StudySpec, target_plans: list[TrialPlan] | None) -> list[memory.TrialMemory]:
    """Each setting's planned peak memory (raystudy.budget.memory), once per label; `target_plans`: the
    plans of the study's targets study (None: unknown, the hook is planned without targets)."""
    out: dict[str, memory.TrialMemory] = {}
    for plan in _memory_plans(spec):
        label = _label(plan)
        if label in out:
            continue
        train, pixels = plan.train, _pixels(plan.train)
        shape = None if plan.loaded else train.shape()
        is_target = spec.kind == "targets"
        targets = [] if is_target else [memory.model_bytes(_model_of(t), pixels) for t in target_plans or []]
        out[label] = memory.trial_memory(
            label,
            memory.model_bytes(_model_of(plan), pixels),
            targets,
            pixels=pixels,
            train_batch=train.batch_size,
            train_images=(train.n_train or DATASET_TRAIN_IMAGES[train.dataset])
            + (train.n_test or DATASET_TEST_IMAGES[train.dataset]),
            eval_batch=0 if is_target else spec.evaluation.batch_size,
            eval_images=0 if is_target else (spec.evaluation.n_eval or DATASET_TEST_IMAGES[train.dataset]),
            shape=shape,
            trains=plan.loaded is None,
            lgv_members=plan.lgv.epochs * plan.lgv.models_per_epoch if plan.lgv else 0,
            lgv_batch=plan.lgv.batch_size if plan.lgv else 0,
            lgv_shape=_as_mechanism(train, plan.lgv.base_for(train)).shape() if plan.lgv else None,
            hook_shape=memory.HookShape.of(spec.evaluation),
        )
    return list(out.values())


def _memory_plans(spec: StudySpec) -> list[TrialPlan]:
    """The plans whose memory bounds the study's: a grid's own; a search's at the high corner of its
    box (the largest batch and magnitudes), once per mechanism it samples, and its confirmation."""
    if spec.search is None:
        return list(spec.plans)
    corner = spec.search_corner("high")
    mechanisms = [TrialPlan(_as_mechanism(corner.train, m), corner.lgv) for m in spec.search.mechanisms[1:]]
    return [corner, *mechanisms, *trial_plans(spec)[spec.search.num_samples :]]


def render_memory(
    spec: StudySpec, memories: list[memory.TrialMemory], card: memory.Card | None, targets_known: bool
) -> str:
    """Each setting's planned peaks against its share of the card. Training must fit at its batch
    (the method's setting); the hook runs at its batch halved until it fits (as it does on an
    out-of-memory error). A setting that cannot fit is refused in one line (RaystudyError) naming
    it, the estimate, the share and the fix."""
    share = spec.resources.gpu
    cap = memory.share_bytes(share, card.memory) if share > 0 and card is not None else None
    lines = [
        "",
        f"memory (planned per trial, {memory.ALLOCATOR_SLACK:.2f}x allocator slack; raystudy/budget/memory.py):",
    ]
    if cap is not None:
        lines.append(
            f"  share: gpu {share:g} of {memory.gib(card.memory)} ({card.what}) = {memory.gib(cap)} after the context"
        )
    elif share > 0:
        lines.append("  no card named (--gpu-memory 24GiB, or a cluster.yaml with a known GPU worker type)")
    if not targets_known and spec.kind != "targets":
        lines.append(
            f"  targets study {spec.targets!r} not found beside the study file: the hook is planned without it"
        )
    for m in memories:
        unknown = f" (not measured: {', '.join(m.unknown)}; left out)" if m.unknown else ""
        hook = f"hook {memory.gib(m.hook):>9s} at batch {m.eval_batch} ({m.hook_part})" if m.eval_batch else ""
        if cap is not None and m.eval_batch:
            fits = m.hook_batch_within(cap)
            hook += f", runs at batch {fits}" if 0 < fits < m.eval_batch else ""
        lines.append(f"  {m.label[:38]:38s} training {memory.gib(m.training):>9s}  {hook}{unknown}")
        if cap is not None:
            _refuse_unfit(m, cap, share, card.memory)
    return "\n".join(lines)


def _refuse_unfit(m: memory.TrialMemory, cap: float, share: float, card: float) -> None:
    where = f"its share is {memory.gib(cap)} (gpu {share:g} of {memory.gib(card)}, less the CUDA context)"
    if m.training > cap:
        need = memory.fitting_share(m.training, card)
        fix = f"raise resources.gpu to {need:g}" if need <= 1 else "no share of this card holds it"
        largest = m.largest_train_batch(cap)
        fix += f", or train at batch <= {largest} (train.batch_size)" if largest >= 1 else ""
        raise RaystudyError(f"trial {m.label!r} needs about {memory.gib(m.training)} to train but {where}: {fix}")
    if m.eval_batch and m.hook_batch_within(cap) == 0:
        need = memory.fitting_share(m.hook_at(1), card)
        fix = f"raise resources.gpu to {need:g}" if need <= 1 else "use a larger card"
        raise RaystudyError(
            f"trial {m.label!r}'s hook needs about {memory.gib(m.hook_at(1))} even at batch 1 but {where}: {fix}"
        )


def cpu_packing(spec: StudySpec, card: memory.Card | None) -> str | None:
    """A line where the trials' CPUs, not their GPU shares, bound how many share a GPU; else None."""
    gpu, cpu = spec.resources.gpu, spec.resources.cpu
    if gpu <= 0 or card is None or card.cpus_per_gpu is None:
        return None
    by_gpu, by_cpu = int(math.floor(1 / gpu + 1e-9)), int(math.floor(card.cpus_per_gpu / cpu + 1e-9))
    if by_cpu >= by_gpu:
        return None
    return (
        f"note: cpu {cpu:g} per trial of {card.cpus_per_gpu:g} per GPU ({card.what}) fits {by_cpu} trial(s) per GPU, "
        f"not the {by_gpu} that gpu {gpu:g} asks for: set resources.cpu to {card.cpus_per_gpu / by_gpu:g}"
    )
