"""Search-space files: YAML in, one frozen, validated `StudySpec` out (no Ray here).

A grid or targets study is expanded at load into resolved `TrialPlan`s (trials x seeds, each with
its full `TrainConfig`); a search sample becomes a plan through `StudySpec.plan_for_sample`. Ray
passes plans (`TrialPlan.to_dict`) to the trainable; every check runs here, once.

A study file names what to train and how to measure it:

    name: table                    # experiment name under the storage path
    kind: grid                     # grid (trials x seeds), targets (train the targets), or search (Optuna)
    preset: fast                   # faithful | fast (raystudy.config.PRESETS)
    dataset: cifar10
    model: resnet18
    seeds: [0, 1, 2]
    targets: targets               # the targets study whose models the trials attack
    train: {epochs: 40}            # overrides of the preset (any TrainConfig field)
    evaluation: {n_eval: 1000, budgets: [4, 8, 16], attacks: [pgd]}   # EvalConfig fields
    resources: {cpu: 2, gpu: 0.25} # per trial; `custom: {name: amount}` pins trials to nodes
    max_failures: 3                # retries of a crashed trial, from its last checkpoint
    trials:
      - mechanism: ST
      - {mechanism: MU, magnitudes: {p: [0.1, 0.9]}}   # a list is a grid: one trial per value
      - {mechanism: SAM, lgv: true}                     # then an LGV ensemble from it
      - {mechanism: ST, train: {lr: 0.05}}              # per-trial training overrides
    search:                        # kind: search only
      mechanism: SAM&JR
      num_samples: 32
      params: {rho: {low: 0.01, high: 0.5, log: true}, lambda_jr: {low: 1.0e-6, high: 1.0, log: true}}
      metric: asr/pgd/untargeted/8/mean
      mode: max

Every error names the file and the key, on one line. What a file may hold (module constants):
at most MAX_FILE_BYTES of UTF-8 YAML, MAX_YAML_NODES nodes once aliases are expanded, nested at
most MAX_YAML_DEPTH deep; at most MAX_TRIALS trials (grid entries x magnitude values x seeds, or a
search's samples and confirmation runs) and MAX_SEEDS seeds; names that become folders (`name`,
`targets`, target names) are single path components; each number within the bounds its error
message states (raystudy.config.train.LIMITS and the other LIMITS).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from raystudy.config.endpoint import EndpointSpec, parse_endpoint
from raystudy.config.evaluation import EvalConfig
from raystudy.config.lgv import LGV_BASES, LgvPhase
from raystudy.config.loaded import LoadedModel, parse_loaded
from raystudy.config.sampler import SamplerSpec, check_sampler_fits, parse_sampler
from raystudy.config.torchattack import check_attack, has_targeted_mode, is_torchattack
from raystudy.config.train import (
    FINITE,
    MAX_NAME,
    MAX_SEED,
    MAX_TEXT,
    PRESETS,
    Range,
    TrainConfig,
    check_flag,
    check_model_name,
    check_name,
    check_setting,
    check_text,
    show,
)
from raystudy.config.train import LIMITS as TRAIN_LIMITS
from raystudy.errors import RaystudyError
from raystudy.persist.record import DEFENSE_KINDS, is_defended

KINDS = ("grid", "targets", "search")
IMAGENET_SIZED = ("imagenette", "imagenet")  # 224-pixel images: timm models
STUDY_MANIFEST = "raystudy-study.json"  # written beside Ray's files in every experiment
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {
    "dataset",
    "model",
    "mechanism",
    "magnitudes",
    "seed",
    "data_path",
}
SEARCHABLE_TRAIN_KEYS = ("epochs", "lr")
# What a study file may hold (the module docstring): generous for real studies (the shipped ones
# have at most 63 trials, 3 seeds and 64 samples), small enough for `raystudy plan` to cost at once.
MAX_FILE_BYTES = 1_000_000
MAX_YAML_NODES = 100_000  # after aliases: 450 bytes of nested aliases otherwise make 9**8 items
MAX_YAML_DEPTH = 32
MAX_TRIALS = 10_000
MAX_SEEDS = 100
MAX_ITEMS = 1_000  # values of one magnitude's grid, choices of a search parameter, objective targets
MAX_FEW = 100  # search parameters, custom resources, mechanisms, metrics, confirmation baselines


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0
    custom: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TrialSpec:
    """One point of a grid study: a mechanism with fixed magnitudes (and, for targets, a model)."""

    mechanism: str = "ST"
    magnitudes: tuple[tuple[str, float], ...] = ()
    model: str | None = None
    lgv: LgvPhase | None = (
        None  # after training, collect an LGV ensemble (raystudy.training.lgv_ensemble) and attack with it
    )
    train: tuple[tuple[str, Any], ...] = ()  # this trial's overrides of the study's training settings
    loaded: LoadedModel | None = None  # a model loaded, not trained (raystudy.config.loaded)
    endpoint: EndpointSpec | None = None  # targets studies: a black-box target (raystudy.config.endpoint)


@dataclass(frozen=True)
class TrialPlan:
    """One trial, resolved: what Ray passes to the trainable and what the trial's record holds."""

    train: TrainConfig
    lgv: LgvPhase | None = None  # after training, collect an LGV ensemble and attack with it
    target_name: str | None = None  # targets studies: the name the trained target is saved under
    loaded: LoadedModel | None = None  # a model loaded, not trained: `train` only names its data

    def to_dict(self) -> dict[str, Any]:
        """Plain nested JSON (Ray's params.json); `from_dict` reads it back."""
        values = {
            "train": self.train.to_dict(),
            "lgv": None if self.lgv is None else dataclasses.asdict(self.lgv),
            "target_name": self.target_name,
        }
        if self.loaded is not None:  # absent otherwise: plans written before loaded models keep their keys
            values["loaded"] = self.loaded.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrialPlan":
        lgv = values.get("lgv")
        phase = None if lgv is None else LgvPhase(**lgv)
        loaded = LoadedModel.from_dict(values.get("loaded"))
        return cls(TrainConfig.from_dict(values["train"]), phase, values.get("target_name"), loaded)

    def identity(self) -> dict[str, Any]:
        """Who the trial is: the columns of progress tables and of the analysis."""
        return {
            "mechanism": "loaded" if self.loaded else self.train.mechanism,
            "magnitudes": dict(self.train.magnitudes),
            "seed": self.train.seed,
            "model": self.train.model,
            "lgv": self.lgv is not None,
            "target_name": self.target_name,
            **({"loaded": self.loaded.name} if self.loaded else {}),
        }

    def key(self) -> str:
        """The plan's identity within its study (where the data lives is not part of it)."""
        values = self.to_dict()
        values["train"].pop("data_path", None)
        return json.dumps(values, sort_keys=True)


@dataclass(frozen=True)
class SearchParam:
    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    integer: bool = False  # whole numbers only (a magnitude in pixels)


@dataclass(frozen=True)
class ConfirmSpec:
    """After a search: retrain its top_k configurations with fresh seeds, next to baseline
    mechanisms (at their default magnitudes) trained with the same seeds, as a grid study named
    `<search>_confirm` beside it."""

    top_k: int = 3
    seeds: tuple[int, ...] = (1, 2, 3)
    baselines: tuple[str, ...] = ("ST", "SAM")


@dataclass(frozen=True)
class SearchSpec:
    mechanism: str
    num_samples: int
    params: tuple[SearchParam, ...]
    # One objective, or several (a multi-objective search: Optuna's TPE in its multi-objective
    # mode, reporting a Pareto front); each metric with its mode.
    metrics: tuple[str, ...] = ("asr/pgd/untargeted/8/mean",)
    modes: tuple[str, ...] = ("max",)
    seed: int = 0
    # ASHA early stopping on a small-sample PGD ASR reported every `proxy_every` epochs (0 = off).
    proxy_every: int = 0
    proxy_n_eval: int = 100
    proxy_budget: int = 8  # the proxy's L-inf budget in 1/255 (one of the evaluation's budgets)
    grace_period: int = 1
    # Targets the objective averages over (empty: all); the others are held out, measured by every
    # trial's hook and reported apart, so the winner is not scored on the targets it was selected on.
    objective_targets: tuple[str, ...] = ()
    # A search over several mechanisms (`mechanism: any` or a list): the mechanism is a searched
    # choice and each one's magnitudes come from the registry's ranges (conditional on the choice).
    mechanisms: tuple[str, ...] = ()
    confirm: ConfirmSpec | None = None
    # Optuna's sampler with every setting raystudy relies on resolved (raystudy.config.sampler).
    sampler: SamplerSpec = SamplerSpec()
    # Earlier experiments (local folders or storage URIs) whose finished trials inside this space
    # the sampler is told before its first suggestion (raystudy.cluster.warm_start).
    warm_start: tuple[str, ...] = ()

    @property
    def conditional(self) -> bool:
        return len(self.mechanisms) > 1

    def magnitude_params(self, mechanism: str, dataset: str) -> tuple[SearchParam, ...]:
        """A mechanism's magnitudes as search ranges from its registered grid: min to max of the
        dataset's grid, log-uniform where the grid spans a factor of 10 or more (geometric in
        METHOD.md), integers where the magnitude is whole pixels. Named `<mechanism>.<magnitude>`."""
        from raystudy.mechanisms import get_mechanism
        from raystudy.mechanisms.base import grid_family

        params = []
        for p in get_mechanism(mechanism).params:
            grid = p.grids[grid_family(dataset)]
            low, high = min(grid), max(grid)
            log = low > 0 and high / low >= 10
            params.append(SearchParam(f"{mechanism}.{p.name}", low, high, log=log, integer=p.integer))
        return tuple(params)

    @property
    def metric(self) -> str:
        """The first (with one objective, the only) metric."""
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def objective_metrics(self) -> tuple[str, ...]:
        """What Optuna optimizes: each metric, where objective targets are named and the metric is a
        mean over targets, its mean over the objective targets only (`.../objective`)."""
        return tuple(
            _objective_name(m) if self.objective_targets and averaged_over_targets(m) else m for m in self.metrics
        )

    @property
    def objective_metric(self) -> str:
        return self.objective_metrics[0]

    @property
    def held_out_metric(self) -> str | None:
        """The held-out counterpart of the first target-averaged metric (None without objective targets)."""
        over = [m for m in self.metrics if averaged_over_targets(m)]
        return over[0].rsplit("/", 1)[0] + "/held_out" if self.objective_targets and over else None


def _sampled(key: str, value: Any) -> Any:
    """A searched training setting as TrainConfig takes it: Tune samples epochs from a uniform range,
    and a trial trains a whole number of them."""
    return round(value) if key == "epochs" and isinstance(value, float) and math.isfinite(value) else value


def _inside(param: SearchParam, value: Any) -> bool:
    """Whether a value is one the search draws for `param`."""
    if param.choices:
        return value in param.choices
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return param.low <= value <= param.high and (not param.integer or float(value).is_integer())


def averaged_over_targets(metric: str) -> bool:
    return metric.startswith(("asr/", "asr_all/")) and metric.endswith("/mean")


def _objective_name(metric: str) -> str:
    return metric.rsplit("/", 1)[0] + "/objective"


@dataclass(frozen=True)
class StudySpec:
    name: str
    kind: str
    preset: str
    dataset: str
    model: str
    seeds: tuple[int, ...]
    plans: tuple[TrialPlan, ...]  # grid and targets studies: every trial x seed, in file order
    endpoints: tuple[EndpointSpec, ...] = ()  # targets studies: black-box targets (nothing to train)
    train: tuple[tuple[str, Any], ...] = ()
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    resources: Resources = field(default_factory=Resources)
    targets: str | None = None
    search: SearchSpec | None = None
    max_failures: int = 3
    data: str | None = None
    description: str = ""
    source: str = ""  # the file it came from, for messages

    def plan_for_sample(self, values: Mapping[str, Any]) -> TrialPlan:
        """A search sample (magnitudes, and searchable training settings) as a trial plan."""
        search = self.search
        overrides = {k: _sampled(k, v) for k, v in values.items() if k in SEARCHABLE_TRAIN_KEYS}
        if search.conditional:  # {"mechanism": "MU", "MU.p": 0.3, ...}: the chosen mechanism's magnitudes
            mechanism = values["mechanism"]
            prefix = f"{mechanism}."
            magnitudes = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
        else:
            mechanism = search.mechanism
            magnitudes = {k: v for k, v in values.items() if k not in SEARCHABLE_TRAIN_KEYS}
        return TrialPlan(_train_config(self, mechanism, magnitudes, self.model, self.seeds[0], overrides))

    def sample_of_plan(self, plan: TrialPlan) -> tuple[dict[str, Any] | None, str]:
        """The search's values that make `plan` (the inverse of plan_for_sample), and "", or None and
        why the plan lies outside this search. The seed is not compared: it is not searched, and a
        trial of another seed is another draw of the same configuration."""
        search = self.search
        mechanism = plan.train.mechanism
        searched = search.mechanisms if search.conditional else (search.mechanism,)
        if plan.loaded is not None:
            return None, "a loaded model"
        if mechanism not in searched:
            return None, "another mechanism"
        values: dict[str, Any] = {"mechanism": mechanism} if search.conditional else {}
        params = search.params + (search.magnitude_params(mechanism, self.dataset) if search.conditional else ())
        magnitudes = dict(plan.train.magnitudes)
        for p in params:
            if p.name in SEARCHABLE_TRAIN_KEYS:
                value = getattr(plan.train, p.name)
            else:
                value = magnitudes.get(p.name.split(".", 1)[-1] if search.conditional else p.name)
            if not _inside(p, value):
                return None, "outside the searched ranges"
            values[p.name] = int(value) if p.integer else value
        rebuilt = self.plan_for_sample(values)
        # Not searched, and not what the trial came to: its seed, how often it kept a checkpoint,
        # whether its kernels were deterministic.
        same = {k: getattr(plan.train, k) for k in ("seed", "checkpoint_every", "deterministic")}
        rebuilt = dataclasses.replace(rebuilt, train=dataclasses.replace(rebuilt.train, **same))
        if rebuilt.key() != plan.key():
            theirs, ours = plan.to_dict(), rebuilt.to_dict()
            differ = sorted(
                k for k in set(theirs["train"]) | set(ours["train"]) if theirs["train"].get(k) != ours["train"].get(k)
            )
            differ += [k for k in ("lgv", "target_name") if theirs.get(k) != ours.get(k)]
            return None, f"trained otherwise ({', '.join(k for k in differ if k != 'data_path') or 'plan'} differ)"
        return values, ""

    def plan_from_ray(self, config: Mapping[str, Any]) -> TrialPlan:
        """The plan of a trial from the config Ray gave it (and recorded in params.json)."""
        if "plan" in config:
            return TrialPlan.from_dict(config["plan"])
        return self.plan_for_sample(config)

    def search_corner(self, corner: str = "low") -> TrialPlan:
        """The plan at one corner of the search box (choices: the first; several mechanisms: the
        first mechanism's corner)."""
        params = self.search.params
        values: dict[str, Any] = {}
        if self.search.conditional:
            values["mechanism"] = self.search.mechanisms[0]
            params = params + self.search.magnitude_params(self.search.mechanisms[0], self.dataset)
        values.update({p.name: p.choices[0] if p.choices else getattr(p, corner) for p in params})
        return self.plan_for_sample(values)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=list)


def target_name(config: TrainConfig, n_seeds: int) -> str:
    """A target's name says how it was trained: `vgg16`, `vgg16_MU_p0.5`, `vgg16_AT_epsilon0.1_s1`."""
    parts = [config.model]
    if config.mechanism != "ST":
        parts.append(config.mechanism.replace("&", "and"))
        parts.extend(f"{name}{value:g}" for name, value in config.magnitudes)
    if n_seeds > 1:
        parts.append(f"s{config.seed}")
    return "_".join(parts)


def _train_config(
    spec,
    mechanism: str,
    magnitudes: Mapping[str, float],
    model: str | None,
    seed: int,
    overrides: Mapping[str, Any] = (),
) -> TrainConfig:
    """The one place a trial's TrainConfig is made: the preset, the study's settings, the trial's."""
    values = {**dict(spec.train), **dict(overrides)}
    return TrainConfig.from_preset(
        spec.preset,
        dataset=spec.dataset,
        model=model or spec.model,
        mechanism=mechanism,
        magnitudes=dict(magnitudes),
        seed=seed,
        data_path=spec.data,
        **values,
    )


def _plans(spec, entries: tuple[TrialSpec, ...]) -> tuple[TrialPlan, ...]:
    """Every entry x seed of a grid or targets study, resolved, in file order."""
    plans = []
    for entry in entries:
        if entry.endpoint is not None:  # queried, not trained: StudySpec.endpoints
            continue
        if entry.loaded is not None:  # trains nothing: one trial, whatever the seeds
            loaded = entry.loaded
            config = _train_config(spec, "ST", {}, loaded.architecture, spec.seeds[0])
            plans.append(TrialPlan(config, None, loaded.name if spec.kind == "targets" else None, loaded))
            continue
        for seed in spec.seeds:
            config = _train_config(spec, entry.mechanism, dict(entry.magnitudes), entry.model, seed, dict(entry.train))
            name = target_name(config, len(spec.seeds)) if spec.kind == "targets" else None
            plans.append(TrialPlan(config, entry.lgv, name))
    return tuple(plans)


class _Reader:
    """Reads one mapping (text keys only), remembering which keys were used, so leftovers are
    reported as unknown. `get` returns a value as given (of `kind`, where named); the typed readers
    (`integer`, `number`, `text`, `name`, `flag`, `texts`, `items`, `mapping`) check it, naming the
    file, the key and what is allowed, and return the default for an absent key (or for null where
    the default is None)."""

    def __init__(self, values: Any, where: str):
        self.values, self.where, self.used = _mapping(values, where), where, set()

    def get(self, key: str, default: Any = ..., kind: type | tuple[type, ...] | None = None) -> Any:
        self.used.add(key)
        if key not in self.values:
            if default is ...:
                raise RaystudyError(f"{self.where}: missing key {key!r}")
            return default
        value = self.values[key]
        if (
            kind is not None
            and value is not None
            and (not isinstance(value, kind) or isinstance(value, bool) and bool not in _tuple(kind))
        ):
            names = "/".join(k.__name__ for k in _tuple(kind))
            raise RaystudyError(f"{self.where}: {key}={show(value)} must be {names}")
        return value

    def checked(self, key: str, default: Any, check: Callable[[str, Any], Any]) -> Any:
        """The value of `key` as `check(key, value)` returns it; its error prefixed with where it is."""
        value = self.get(key, default)
        if key not in self.values or (value is None and default is None):
            return value
        try:
            return check(key, value)
        except RaystudyError as err:
            raise RaystudyError(f"{self.where}: {err}") from None

    def integer(self, key: str, default: Any, low: int, high: int) -> int:
        return self.checked(key, default, Range(low, high).check)

    def number(self, key: str, default: Any, low: float, high: float, open_low: bool = False) -> float:
        return self.checked(key, default, Range(low, high, whole=False, open_low=open_low).check)

    def text(self, key: str, default: Any, max_length: int = MAX_NAME, lines: bool = False) -> str:
        return self.checked(key, default, lambda k, v: check_text(k, v, max_length, lines))

    def name(self, key: str, default: Any) -> str:
        return self.checked(key, default, _folder_name)

    def flag(self, key: str, default: Any) -> bool:
        return self.checked(key, default, check_flag)

    def texts(self, key: str, default: Any) -> tuple[str, ...]:
        """One text, or a list of 1 to MAX_FEW texts, as a tuple."""
        return self.checked(key, default, lambda k, v: _items(k, [v] if isinstance(v, str) else v, 1, MAX_FEW))

    def items(self, key: str, default: Any, max_items: int, check: Callable = check_text) -> tuple:
        """A list of at most `max_items` values, each as `check(key, value)` returns it."""
        return self.checked(key, default, lambda k, v: _items(k, v, 0, max_items, check))

    def mapping(self, key: str, default: Any, max_items: int = MAX_FEW) -> dict[str, Any]:
        return self.checked(key, default, lambda k, v: _mapping(v, k, max_items))

    def finish(self) -> None:
        unknown = sorted(set(self.values) - self.used)
        if unknown:
            raise RaystudyError(
                f"{self.where}: unknown key(s) {', '.join(map(show, unknown))}; known: {', '.join(sorted(self.used))}"
            )


def _tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _mapping(values: Any, where: str, max_items: int | None = None) -> dict[str, Any]:
    """`values` as a dict whose keys are plain text (YAML also makes numbers, booleans and null keys)."""
    if not isinstance(values, Mapping):
        raise RaystudyError(f"{where}: expected a mapping of keys, found {type(values).__name__}")
    if max_items is not None and len(values) > max_items:
        raise RaystudyError(f"{where}: {len(values)} keys; at most {max_items}")
    for key in values:
        if not isinstance(key, str):
            raise RaystudyError(f"{where}: the key {show(key)} is a {type(key).__name__}: keys are text (quote it)")
        check_text(f"{where}: key", key)
    return dict(values)


def _items(key: str, values: Any, min_items: int, max_items: int, check: Callable = check_text) -> tuple:
    if not isinstance(values, list) or not min_items <= len(values) <= max_items:
        raise RaystudyError(f"{key}={show(values)} must be a list of {min_items} to {max_items} values")
    return tuple(check(key, value) for value in values)


def _folder_name(key: str, value: Any) -> str:
    """A study's name (its experiment's folder), or the name of the targets study: one plain folder
    name, without spaces, not hidden."""
    name = check_name(key, value)
    if " " in name or name.startswith("."):
        raise RaystudyError(f"{key}={show(name)} must be a plain folder name (no slashes or spaces, no leading .)")
    return name


def _scalar(key: str, value: Any) -> Any:
    """A search choice: text, true/false or a finite number (what Optuna's categorical takes)."""
    if isinstance(value, bool):
        return value
    return check_text(key, value) if isinstance(value, str) else FINITE.check(key, value)


def load_space(path: str | Path, data: str | None = None) -> StudySpec:
    """Read and validate a study file; `data` (a path) overrides the file's `data`."""
    return read_space(path, data)[0]


def read_space(path: str | Path, data: str | None = None) -> tuple[StudySpec, Any]:
    """(spec, the file's parsed YAML): the raw values are recorded with the experiment."""
    path = Path(path)
    if not path.is_file():
        raise RaystudyError(f"search space {str(path)!r} does not exist")
    values = _read_yaml(path)
    if data is None and isinstance(values, dict) and values.get("data") is not None:
        data = values["data"]
    if data is not None:
        data = _absolute(check_path("data", data, str(path)))
    return parse_space(values, str(path), data), values


def _read_yaml(path: Path) -> Any:
    """The file's one YAML document: at most MAX_FILE_BYTES of UTF-8, read by _StudyLoader."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise RaystudyError(f"{path}: cannot be read ({err.strerror or err})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise RaystudyError(f"{path}: over {MAX_FILE_BYTES} bytes: not a study file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RaystudyError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        return yaml.load(text, Loader=_StudyLoader)
    except yaml.YAMLError as err:
        raise RaystudyError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise RaystudyError(f"{path}: nested too deeply (at most {MAX_YAML_DEPTH} levels)") from None
    except (ValueError, TypeError, OverflowError) as err:  # a value YAML's constructors cannot make
        raise RaystudyError(f"{path}: not valid YAML ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    except RaystudyError as err:
        raise RaystudyError(f"{path}: {err}") from None


class _StudyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that measures the composed document before constructing any value: at most
    MAX_YAML_NODES nodes counting each alias as the nodes it repeats, nested at most MAX_YAML_DEPTH
    deep, no alias inside the node it names (a "billion laughs" is refused in microseconds)."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self.depth += 1  # refused as it nests, before PyYAML's recursion runs deep
        try:
            if self.depth > MAX_YAML_DEPTH + 1:
                raise RaystudyError(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _measure(node, 0, {}, set())
        return super().construct_document(node)


def _measure(node: yaml.Node, depth: int, seen: dict[int, tuple[int, int]], open_: set[int]) -> tuple[int, int]:
    """(nodes, height) of `node` with its aliases expanded; each distinct node is measured once."""
    if id(node) in seen:
        size, height = seen[id(node)]
    else:
        if id(node) in open_:
            raise RaystudyError("an alias refers to a node that contains it")
        if depth > MAX_YAML_DEPTH:
            raise RaystudyError(f"nested more than {MAX_YAML_DEPTH} levels deep")
        open_.add(id(node))
        children = _children(node)
        measured = [_measure(child, depth + 1, seen, open_) for child in children]
        size = 1 + sum(s for s, _ in measured)
        height = 1 + max((h for _, h in measured), default=0)
        open_.discard(id(node))
        seen[id(node)] = size, height
    if size > MAX_YAML_NODES:
        raise RaystudyError(f"over {MAX_YAML_NODES} YAML nodes once its aliases are expanded")
    if depth + height > MAX_YAML_DEPTH + 1:
        raise RaystudyError(f"nested more than {MAX_YAML_DEPTH} levels deep")
    return size, height


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def check_path(key: str, value: Any, where: str) -> str:
    """A local path or a URI given as text (no control characters, at most MAX_TEXT long)."""
    try:
        return check_text(key, value, MAX_TEXT)
    except RaystudyError as err:
        raise RaystudyError(f"{where}: {err}") from None


def _absolute(data: str | None) -> str | None:
    """A local data path as an absolute one: trials run in their own folders, maybe on other nodes."""
    if data is None or "://" in data:
        return data
    try:
        return str(Path(data).expanduser().resolve())
    except (OSError, RuntimeError, ValueError) as err:  # ~nobody/data, a loop of links
        raise RaystudyError(f"data={show(data)} is not a usable path ({err})") from None


def parse_space(values: Any, where: str, data: str | None = None) -> StudySpec:
    r = _Reader(values, where)
    kind = r.text("kind", "grid")
    if kind not in KINDS:
        raise RaystudyError(f"{where}: kind={kind!r}; known: {', '.join(KINDS)}")
    preset = r.text("preset", "fast")
    if preset not in PRESETS:
        raise RaystudyError(f"{where}: preset={preset!r}; known: {', '.join(PRESETS)}")
    spec = StudySpec(
        name=r.name("name", ...),
        kind=kind,
        preset=preset,
        dataset=_dataset(r.text("dataset", "cifar10"), where),
        model=r.text("model", "resnet18"),
        seeds=_seeds(r.get("seeds", [0]), where),
        plans=(),  # expanded from the entries below, once the spec is complete
        train=_train(r.get("train", {}), where),
        evaluation=_evaluation(r.get("evaluation", {}), where),
        resources=_resources(r.get("resources", {}), where),
        targets=r.name("targets", None),
        search=_search(r.get("search", None), where) if kind == "search" else _no_search(r.get("search", None), where),
        max_failures=r.integer("max_failures", 3, 0, 100),
        data=_data(r, data),
        description=r.text("description", None, MAX_TEXT, lines=True) or "",  # null: none
        source=where,
    )
    entries = _trials(r.get("trials", [] if kind == "search" else ..., list), kind, where, len(spec.seeds))
    r.finish()
    return _validate(spec, entries, where)


def _data(r: _Reader, data: str | None) -> str | None:
    """--data, else the file's `data` (read_space resolved either to an absolute path)."""
    in_file = r.checked("data", None, lambda k, v: check_text(k, v, MAX_TEXT))
    return data if data is not None else in_file


def _dataset(name: str, where: str) -> str:
    from raystudy.mechanisms.base import grid_family

    try:
        grid_family(name)
    except RaystudyError as err:
        raise RaystudyError(f"{where}: dataset: {err}") from None
    return name


def _seeds(seeds: Any, where: str) -> tuple[int, ...]:
    seed = Range(0, MAX_SEED)
    if not isinstance(seeds, list) or not 1 <= len(seeds) <= MAX_SEEDS or not all(seed.is_kind(s) for s in seeds):
        raise RaystudyError(f"{where}: seeds={show(seeds)} must be a list of 1 to {MAX_SEEDS} whole numbers >= 0")
    for s in seeds:
        seed.check(f"{where}: seeds: seed", s)
    if len(set(seeds)) != len(seeds):
        raise RaystudyError(f"{where}: seeds={show(seeds)} repeats a seed")
    return tuple(seeds)


def _trials(entries: Any, kind: str, where: str, n_seeds: int) -> tuple[TrialSpec, ...]:
    if not isinstance(entries, list):
        raise RaystudyError(f"{where}: trials={show(entries)} must be a list of trial entries")
    if kind != "search" and not entries:
        raise RaystudyError(f"{where}: trials is empty")
    out: list[TrialSpec] = []
    for i, entry in enumerate(entries):
        at = f"{where}: trials[{i}]"
        r = _Reader(entry, at)
        if "endpoint" in r.values:
            if kind != "targets":
                raise RaystudyError(f"{at}: endpoints are targets: name them in a kind: targets study")
            out.append(TrialSpec(endpoint=parse_endpoint(r.get("endpoint"), at)))
            r.finish()
            continue
        loaded = _loaded_entry(r, at)
        if loaded is not None:
            out.append(TrialSpec(loaded=loaded))
            continue
        out.extend(_trained_entries(r, kind, at))
        if len(out) * n_seeds > MAX_TRIALS:
            raise RaystudyError(f"{where}: trials: over {MAX_TRIALS} trials (entries x magnitude values x seeds)")
    if len(set(out)) != len(out):
        raise RaystudyError(f"{where}: trials lists the same mechanism and magnitudes twice")
    return tuple(out)


def _trained_entries(r: _Reader, kind: str, at: str) -> list[TrialSpec]:
    """A trained entry: one TrialSpec per point of its magnitude grid."""
    mechanism = r.text("mechanism", "ST")
    model = r.text("model", None)
    grid = r.mapping("magnitudes", {})
    try:
        lgv = LgvPhase.parse(r.get("lgv", False))
    except RaystudyError as err:
        raise RaystudyError(f"{at}: {err}") from None
    train = _train(r.get("train", {}), at)
    r.finish()
    if kind == "targets" and (model is None or lgv):
        raise RaystudyError(f"{at}: a targets study names each target's model (and no lgv)")
    if lgv and (lgv.base or mechanism) not in LGV_BASES:
        raise RaystudyError(f"{at}: LGV fine-tunes with {', '.join(LGV_BASES)}, not {mechanism}")
    value_lists = [_magnitude_values(name, given, at) for name, given in grid.items()]
    if math.prod(len(values) for values in value_lists) > MAX_TRIALS:
        raise RaystudyError(f"{at}: magnitudes: over {MAX_TRIALS} combinations")
    return [
        TrialSpec(mechanism, tuple(zip(grid, map(float, combo))), model, lgv, train)
        for combo in itertools.product(*value_lists)
    ]


def _magnitude_values(name: str, given: Any, at: str) -> list:
    values = given if isinstance(given, list) else [given]
    if not 1 <= len(values) <= MAX_ITEMS or not all(FINITE.is_kind(v) and FINITE.holds(v) for v in values):
        raise RaystudyError(
            f"{at}: magnitude {name}={show(given)} must be a number or a list of numbers "
            f"(finite; 1 to {MAX_ITEMS} of them)"
        )
    return values


def _loaded_entry(r: _Reader, where: str) -> LoadedModel | None:
    """The entry's loaded model (and nothing about training), or None when the entry is trained."""
    model = r.text("model", None)
    pretrained = r.flag("pretrained", False)
    weights = r.checked("weights", None, lambda k, v: check_text(k, v, MAX_TEXT))
    try:
        loaded = parse_loaded(model, pretrained, weights)
    except RaystudyError as err:
        raise RaystudyError(f"{where}: {err}") from None
    if loaded is None:
        return None
    trained_keys = sorted({"mechanism", "magnitudes", "lgv", "train"} & set(r.values))
    if trained_keys:
        raise RaystudyError(f"{where}: {loaded.name} is loaded, not trained: {', '.join(trained_keys)} do not apply")
    r.finish()
    return loaded


def _train(values: Any, where: str) -> tuple[tuple[str, Any], ...]:
    if not isinstance(values, Mapping):
        raise RaystudyError(f"{where}: train must be a mapping of training settings")
    values = _mapping(values, f"{where}: train")
    unknown = sorted(set(values) - TRAIN_KEYS)
    if unknown:
        raise RaystudyError(
            f"{where}: train: unknown key(s) {', '.join(map(show, unknown))}; known: {', '.join(sorted(TRAIN_KEYS))}"
        )
    try:
        for key, value in values.items():
            check_setting(key, value)
    except RaystudyError as err:
        raise RaystudyError(f"{where}: train: {err}") from None
    return tuple(sorted(values.items()))


def _evaluation(values: Any, where: str) -> EvalConfig:
    if not isinstance(values, Mapping):
        raise RaystudyError(f"{where}: evaluation must be a mapping of evaluation settings")
    values = _smoothness_shorthand(_mapping(values, f"{where}: evaluation"), f"{where}: evaluation")
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RaystudyError(
            f"{where}: evaluation: unknown key(s) {', '.join(map(show, unknown))}; known: {', '.join(sorted(known))}"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return EvalConfig(**kwargs)
    except RaystudyError as err:
        raise RaystudyError(f"{where}: evaluation: {err}") from None


def _check_attacks_fit(spec: "StudySpec") -> None:
    """torchattack's attacks against what the study's surrogates are (their image size, LGV ensembles)."""
    input_size = 224 if spec.dataset in IMAGENET_SIZED else dict(spec.train).get("image_size", 32)
    ensembles = any(plan.lgv is not None for plan in spec.plans)
    for attack in filter(is_torchattack, spec.evaluation.attacks):
        check_attack(attack, spec.evaluation.options_of(attack), input_size, ensembles)


def _smoothness_shorthand(values: dict[str, Any], where: str) -> dict[str, Any]:
    """`smoothness: {method: lanczos, iterations: 40}` as the flat settings it stands for."""
    if "smoothness" not in values:
        return values
    values = dict(values)
    given = values.pop("smoothness")
    if not isinstance(given, Mapping) or set(given) - {"method", "iterations"}:
        raise RaystudyError(f"{where}: smoothness must be a mapping {{method: power|lanczos, iterations: N}}")
    method = given.get("method", "power")
    flat = {"smoothness_method": method}
    if "iterations" in given:
        flat["lanczos_iterations" if method == "lanczos" else "power_iterations"] = given["iterations"]
    twice = sorted(set(flat) & set(values))
    if twice:
        raise RaystudyError(f"{where}: smoothness and {', '.join(twice)} both given: give one")
    return {**values, **flat}


def _resources(values: Any, where: str) -> Resources:
    r = _Reader(values, f"{where}: resources")
    cpu = r.number("cpu", 1, 0, 1_024, open_low=True)
    gpu = r.number("gpu", 0, 0, 8)
    custom = r.mapping("custom", {})
    r.finish()
    if gpu > 1:  # a trial trains and measures on one device (raystudy.core.precision)
        raise RaystudyError(f"{where}: resources: gpu={gpu:g} must be a fraction in [0, 1]: a trial uses one GPU")
    amount = Range(0, 10**9, whole=False, open_low=True)
    for name, value in custom.items():
        amount.check(f"{where}: resources: custom {show(name)}", value)
    return Resources(float(cpu), float(gpu), tuple(sorted((k, float(v)) for k, v in custom.items())))


def _no_search(values: Any, where: str) -> None:
    if values is not None:
        raise RaystudyError(f"{where}: 'search' belongs to kind: search studies")
    return None


def _search(values: Any, where: str) -> SearchSpec:
    if values is None:
        raise RaystudyError(f"{where}: a kind: search study needs a 'search' section")
    r = _Reader(values, f"{where}: search")
    given = r.mapping("params", {})
    params = tuple(_param(name, spec, f"{where}: search: params: {name}") for name, spec in given.items())
    mechanism, mechanisms = _search_mechanisms(r.get("mechanism", kind=(str, list)), where)
    search = SearchSpec(
        mechanism=mechanism,
        mechanisms=mechanisms,
        num_samples=r.integer("num_samples", ..., 1, MAX_TRIALS),
        params=params,
        metrics=r.texts("metric", SearchSpec.metrics),
        modes=r.texts("mode", SearchSpec.modes),
        seed=r.integer("seed", 0, 0, MAX_SEED),
        proxy_every=r.integer("proxy_every", 0, 0, 10_000),
        proxy_n_eval=r.integer("proxy_n_eval", 100, 1, 100_000),
        proxy_budget=r.integer("proxy_budget", 8, 1, 255),
        grace_period=r.integer("grace_period", 1, 1, 10_000),
        objective_targets=r.items("objective_targets", (), MAX_ITEMS, check_name),
        confirm=_confirm(r.get("confirm", None, dict), where),
        sampler=parse_sampler(r.get("sampler", None, (str, dict)), f"{where}: search"),
        warm_start=r.items("warm_start", (), MAX_FEW, _experiment_location),
    )
    r.finish()
    _check_search(search, where)
    return search


def _experiment_location(key: str, value: Any) -> str:
    """An experiment a search starts from: a local folder or a storage URI, not empty."""
    location = check_text(key, value, max_length=MAX_TEXT)
    if not location.strip():
        raise RaystudyError(f"{key}: an experiment's folder or storage URI, not empty")
    return location


def _param(name: str, values: Any, where: str) -> SearchParam:
    p = _Reader(values, where)
    param = SearchParam(
        name,
        p.number("low", None, -math.inf, math.inf),
        p.number("high", None, -math.inf, math.inf),
        p.flag("log", False),
        p.items("choices", (), MAX_ITEMS, _scalar),
    )
    p.finish()
    if not param.choices and (param.low is None or param.high is None or not param.low < param.high):
        raise RaystudyError(f"{where}: give low < high, or choices")
    if param.log and not param.choices and param.low <= 0:
        raise RaystudyError(f"{where}: a log-uniform range needs low > 0")
    if name in SEARCHABLE_TRAIN_KEYS:  # a training setting: each bound or choice one it may take
        limits = TRAIN_LIMITS[name]
        for key, value in [("low", param.low), ("high", param.high)] + [("choices", c) for c in param.choices]:
            if value is not None:
                limits.check(f"{where}: {key}", value)
    return param


def _check_search(search: SearchSpec, where: str) -> None:
    if any(mode not in ("max", "min") for mode in search.modes):
        raise RaystudyError(f"{where}: search: mode={show(list(search.modes))}: each must be max or min")
    if len(search.modes) != len(search.metrics):
        raise RaystudyError(
            f"{where}: search: {len(search.metrics)} metric(s) but {len(search.modes)} mode(s): "
            "give one mode per metric"
        )
    if len(set(search.metrics)) != len(search.metrics):
        raise RaystudyError(f"{where}: search: metric lists a metric twice")
    if not search.params and not search.conditional:
        raise RaystudyError(f"{where}: search: params is empty")
    check_sampler_fits(
        search.sampler, len(search.metrics), search.conditional, f"{where}: search", bool(search.warm_start)
    )
    if len(set(search.warm_start)) != len(search.warm_start):
        raise RaystudyError(f"{where}: search: warm_start lists an experiment twice")
    confirm = search.confirm
    if confirm is not None and confirm.top_k > search.num_samples:
        raise RaystudyError(f"{where}: search: confirm: top_k={confirm.top_k} exceeds num_samples={search.num_samples}")
    runs = 0 if confirm is None else (confirm.top_k + len(confirm.baselines)) * len(confirm.seeds)
    if search.num_samples + runs > MAX_TRIALS:
        raise RaystudyError(
            f"{where}: search: num_samples={search.num_samples} and {runs} confirmation runs exceed {MAX_TRIALS} trials"
        )


def _confirm(values: Mapping[str, Any] | None, where: str) -> ConfirmSpec | None:
    from raystudy.mechanisms import get_mechanism

    if values is None:
        return None
    r = _Reader(values, f"{where}: search: confirm")
    top_k = r.get("top_k", ConfirmSpec.top_k)
    if Range(1, MAX_TRIALS).is_kind(top_k) and top_k < 1:
        raise RaystudyError(f"{where}: search: confirm: top_k must be >= 1, not {top_k}")
    confirm = ConfirmSpec(
        top_k=r.integer("top_k", ConfirmSpec.top_k, 1, MAX_TRIALS),
        seeds=r.items("seeds", ConfirmSpec.seeds, MAX_SEEDS, Range(0, MAX_SEED).check),
        baselines=r.items("baselines", ConfirmSpec.baselines, MAX_FEW),
    )
    r.finish()
    if not confirm.seeds or len(set(confirm.seeds)) != len(confirm.seeds):
        raise RaystudyError(
            f"{where}: search: confirm: seeds must be distinct whole numbers >= 0, got {show(list(confirm.seeds))}"
        )
    for name in confirm.baselines:
        try:
            get_mechanism(name)
        except RaystudyError as err:
            raise RaystudyError(f"{where}: search: confirm: baselines: {err}") from None
    return confirm


def _search_mechanisms(value: Any, where: str) -> tuple[str, tuple[str, ...]]:
    """('SAM&JR', ()) for one mechanism; ('any', every registered name) or ('MU|LS', ('MU', 'LS'))."""
    from raystudy.mechanisms import MECHANISMS, get_mechanism

    if value == "any":
        return "any", tuple(MECHANISMS)
    try:
        names = list(_items("mechanism", [value] if isinstance(value, str) else value, 1, MAX_FEW))
        for name in names:
            get_mechanism(name)
    except RaystudyError as err:
        raise RaystudyError(f"{where}: search: mechanism: {err} (or any, or a list)") from None
    if len(set(names)) != len(names):
        raise RaystudyError(f"{where}: search: mechanism: list each mechanism once")
    return ("|".join(names), tuple(names)) if len(names) > 1 else (names[0], ())


def _validate(spec: StudySpec, entries: tuple[TrialSpec, ...], where: str) -> StudySpec:
    """Resolve every trial's plan once (a bad mechanism, magnitude or setting fails before Ray
    starts), and check what spans several sections; returns the spec with its plans."""
    input_size = 224 if spec.dataset in IMAGENET_SIZED else dict(spec.train).get("image_size", 32)
    try:
        if spec.dataset == "imagenet" and (
            spec.kind == "search" or any(e.loaded is None and e.endpoint is None for e in entries)
        ):
            raise RaystudyError(
                "dataset imagenet is an evaluation set (no training split): every trial loads its model "
                "(model: timm/<name> with pretrained: true, or weights: FILE)"
            )
        check_model_name(spec.model, input_size)
        for entry in entries:
            if entry.model:
                check_model_name(entry.model, input_size)
        endpoints = tuple(e.endpoint for e in entries if e.endpoint is not None)
        spec = dataclasses.replace(spec, plans=_plans(spec, entries), endpoints=endpoints)
        loaded = [plan.loaded.name for plan in spec.plans if plan.loaded]
        twice = sorted({name for name in loaded if loaded.count(name) > 1})
        if twice:
            raise RaystudyError(f"two loaded models are both called {', '.join(twice)}: rename a weights file")
        names = [plan.target_name for plan in spec.plans if plan.target_name] + [e.name for e in spec.endpoints]
        clashes = sorted({name for name in names if names.count(name) > 1})
        if clashes:
            raise RaystudyError(
                f"two targets would be saved as {', '.join(clashes)}: give them other models or magnitudes"
            )
        read_as_defended = sorted({name for name in names + loaded if is_defended(name)})
        if read_as_defended:  # its rows would be taken for another target's column behind a defense
            raise RaystudyError(
                f"the name {', '.join(read_as_defended)} reads as a target behind a defense "
                f"(<target>+<defense>, defenses: {', '.join(DEFENSE_KINDS)}): rename the weights file or endpoint"
            )
        if spec.search is not None:
            _validate_search(spec)
        _check_attacks_fit(spec)
    except RaystudyError as err:
        raise RaystudyError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:  # e.g. epochs: ten
        raise RaystudyError(f"{where}: a setting has the wrong type ({err})") from None
    if spec.kind != "targets" and not spec.targets:
        raise RaystudyError(f"{where}: missing key 'targets' (the name of the targets study to attack)")
    return spec


def _validate_search(spec: StudySpec) -> None:
    from raystudy.mechanisms import get_mechanism

    known = set() if spec.search.conditional else {p.name for p in get_mechanism(spec.search.mechanism).params}
    for param in spec.search.params:
        if param.name not in known | set(SEARCHABLE_TRAIN_KEYS):
            raise RaystudyError(
                f"search: {spec.search.mechanism} has no magnitude {param.name!r}; searchable: "
                f"{', '.join(sorted(known | set(SEARCHABLE_TRAIN_KEYS)))}"
            )
    for metric in spec.search.metrics:
        _check_metric(metric, spec.evaluation, "search: metric")
    objective = spec.search.objective_targets
    if objective:
        if not any(averaged_over_targets(m) for m in spec.search.metrics):
            raise RaystudyError(
                f"search: objective_targets needs a metric averaged over targets (e.g. asr/pgd/untargeted/8/mean), "
                f"not {', '.join(spec.search.metrics)}"
            )
        if len(set(objective)) != len(objective):
            raise RaystudyError(f"search: objective_targets names a target twice: {list(objective)}")
    if spec.search.proxy_every and spec.search.proxy_budget not in spec.evaluation.budgets:
        raise RaystudyError(
            f"search: proxy_budget={spec.search.proxy_budget} is not one of the evaluation budgets "
            f"{list(spec.evaluation.budgets)}"
        )
    for corner in ("low", "high"):  # the corners of the box must be valid magnitudes
        spec.search_corner(corner)


SCALAR_METRICS = ("acc", "smoothness/mean", "smoothness/max", "similarity/mean", "test_acc")


def _check_metric(metric: str, evaluation: EvalConfig, where: str) -> None:
    """A metric the hook computes: asr|asr_all/<attack>/<mode>/<budget>/<target|mean>,
    fooling/<attack>/<mode>/<budget>, or one of SCALAR_METRICS."""
    parts = metric.split("/")
    if metric in SCALAR_METRICS:
        return
    shapes = {"asr": 5, "asr_all": 5, "fooling": 4}
    if parts[0] not in shapes or len(parts) != shapes[parts[0]]:
        raise RaystudyError(
            f"{where}={metric!r} is not a metric the hook reports (e.g. asr/pgd/untargeted/8/mean, fooling/pgd/"
            f"untargeted/8, {', '.join(SCALAR_METRICS)})"
        )
    attack, mode, budget = parts[1], parts[2], parts[3]
    computed = {
        "attack": (attack, evaluation.attacks),
        "mode": (mode, evaluation.modes),
        "budget": (budget, tuple(str(b) for b in evaluation.budgets)),
    }
    for what, (value, known) in computed.items():
        if value not in known:
            raise RaystudyError(f"{where}={metric!r}: the evaluation computes no {what} {value!r} ({', '.join(known)})")
    if attack == "autoattack" and mode == "targeted":
        raise RaystudyError(f"{where}={metric!r}: AutoAttack runs untargeted only")
    if is_torchattack(attack) and mode == "targeted" and not has_targeted_mode(attack):
        raise RaystudyError(f"{where}={metric!r}: torchattack implements {attack} untargeted only")
