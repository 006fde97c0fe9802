"""The Optuna sampler of a search (`search: {sampler: {name: cmaes, popsize: 8}}`), every setting
raystudy relies on written out: Optuna's own defaults change between versions (Optuna 5 turned
TPE's `constant_liar` on), and a seeded search file must draw the same samples wherever it runs.
The resolved settings are recorded with the experiment (manifest, `best_config.json`) beside the
Optuna version; raystudy.cluster.searcher builds the sampler from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raystudy.errors import RaystudyError, require_extra

# Per sampler: each option raystudy sets, with its value unless the study file gives another, and
# the types it may take (None where Optuna accepts None). Options Optuna 5 deprecates are left out.
SAMPLER_OPTIONS: dict[str, dict[str, tuple[Any, tuple[type, ...]]]] = {
    # Tree-structured Parzen estimator: 10 random trials first; constant_liar: trials still running
    # count as bad ones, so trials Ray runs side by side are not drawn at the same point.
    "tpe": {
        "n_startup_trials": (10, (int,)),
        "n_ei_candidates": (24, (int,)),
        "multivariate": (True, (bool,)),  # Optuna 5 decides by itself (True for one objective)
        "constant_liar": (True, (bool,)),
        "group": (False, (bool,)),
    },
    # CMA-ES (the `cmaes` package: `pip install -e ".[cmaes]"`): for continuous spaces such as
    # SAM&JR's (rho, lambda); one objective, no conditional mechanism choice.
    "cmaes": {
        "n_startup_trials": (1, (int,)),
        "popsize": (None, (int, type(None))),
        "use_separable_cma": (False, (bool,)),
        "with_margin": (False, (bool,)),
        "consider_pruned_trials": (False, (bool,)),
    },
    # Gaussian-process Bayesian optimization (Matern 5/2, log EI; log EHVI with several objectives).
    "gp": {
        "n_startup_trials": (10, (int,)),
        "deterministic_objective": (False, (bool,)),
    },
    "random": {},
    # Quasi-Monte Carlo (a scrambled Sobol sequence): even coverage of a fixed space.
    "qmc": {
        "qmc_type": ("sobol", (str,)),
        "scramble": (True, (bool,)),
    },
}
# How the report ranks the searched parameters (analysis/figures.py): named with its settings, not
# left to Optuna's default (fANOVA up to Optuna 4, PED-ANOVA from Optuna 5). PED-ANOVA needs nothing
# beyond Optuna (fANOVA needs scikit-learn) and is deterministic.
IMPORTANCE_EVALUATOR = "PED-ANOVA"
IMPORTANCE_SETTINGS = {"target_quantile": 0.1, "region_quantile": 1.0, "evaluate_on_local": True}
ONE_OBJECTIVE_ONLY = ("cmaes",)
FIXED_SPACE_ONLY = ("cmaes", "qmc")  # they would draw a conditional (mechanism-dependent) space at random
# A search whose record names no sampler (started before samplers were named): Optuna's TPE with
# the installed Optuna's defaults, as it was built then; its settings are not known.
UNRECORDED_TPE_OPTIONS: tuple[tuple[str, Any], ...] = ()
QMC_TYPES = ("sobol", "halton")
# Samplers that learn from finished trials, and so from a warm start's (random and QMC draw the
# same points whatever is known). CMA-ES takes them as its source trials (WS-CMA-ES, Optuna's
# `source_trials`), from which it draws its first generation: from the best 10% of them, so it
# needs at least CMAES_WARM_START_MIN; fewer leave its first generation at the middle of the space.
LEARNS_FROM_TRIALS = ("tpe", "cmaes", "gp")
CMAES_WARM_START_MIN = 10


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "tpe"
    options: tuple[tuple[str, Any], ...] = tuple((k, v) for k, (v, _) in SAMPLER_OPTIONS["tpe"].items())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.options)}


def parse_sampler(values: Any, where: str) -> SamplerSpec:
    """`sampler: tpe` or `sampler: {name: cmaes, sigma0: 0.5}`: every option of that sampler resolved."""
    if values is None:
        return SamplerSpec()
    if isinstance(values, str):
        values = {"name": values}
    if not isinstance(values, dict):
        raise RaystudyError(f"{where}: sampler must be a name or a mapping with a name")
    given = dict(values)
    name = given.pop("name", "tpe")
    if not isinstance(name, str) or name not in SAMPLER_OPTIONS:
        raise RaystudyError(f"{where}: unknown sampler {name!r}; valid: {', '.join(SAMPLER_OPTIONS)}")
    known = SAMPLER_OPTIONS[name]
    unknown = sorted(map(str, set(given) - set(known)))
    if unknown:
        valid = ", ".join(known) or "none"
        raise RaystudyError(f"{where}: sampler {name}: unknown option(s) {', '.join(unknown)}; valid: {valid}")
    options = {}
    for key, (default, types) in known.items():
        value = given.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool) and float in types and int not in types:
            value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise RaystudyError(f"{where}: sampler {name}: {key}={value!r} must be {kinds}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
            if not (key == "n_startup_trials" and value == 0):
                raise RaystudyError(f"{where}: sampler {name}: {key}={value!r} must be positive")
        options[key] = value
    if name == "qmc" and options["qmc_type"] not in QMC_TYPES:
        raise RaystudyError(f"{where}: sampler qmc: qmc_type={options['qmc_type']!r}; valid: {', '.join(QMC_TYPES)}")
    if name == "cmaes":
        try:
            require_extra("cmaes", "cmaes", "the sampler cmaes")
        except RaystudyError as err:
            raise RaystudyError(f"{where}: {err}") from None
    if name == "tpe" and options["group"] and not options["multivariate"]:
        raise RaystudyError(f"{where}: sampler tpe: group needs multivariate: true")
    if name == "tpe" and options["n_startup_trials"] < 1:
        raise RaystudyError(f"{where}: sampler tpe: n_startup_trials must be at least 1")
    return SamplerSpec(name, tuple(options.items()))


def check_sampler_fits(
    sampler: SamplerSpec, objectives: int, conditional: bool, where: str, warm_start: bool = False
) -> None:
    """One line where the sampler cannot search this space as asked."""
    if warm_start and sampler.name not in LEARNS_FROM_TRIALS:
        raise RaystudyError(
            f"{where}: sampler {sampler.name} draws its samples whatever trials are known: warm_start "
            f"would change nothing; use {', '.join(LEARNS_FROM_TRIALS)}"
        )
    if warm_start and sampler.name == "cmaes" and dict(sampler.options)["use_separable_cma"]:
        raise RaystudyError(f"{where}: sampler cmaes: warm_start needs use_separable_cma: false (Optuna's rule)")
    if objectives > 1 and sampler.name in ONE_OBJECTIVE_ONLY:
        raise RaystudyError(f"{where}: sampler {sampler.name} optimizes one objective; use tpe, gp, random or qmc")
    if conditional and sampler.name in FIXED_SPACE_ONLY:
        raise RaystudyError(
            f"{where}: sampler {sampler.name} needs a fixed space; a search over several mechanisms "
            "needs tpe, gp or random"
        )


def search_settings(sampler: SamplerSpec, seed: int) -> dict[str, Any]:
    """What drew a search's samples, for its record (manifest, best_config.json): the sampler with
    every setting, the seed, the Optuna version (what raystudy does not set is that version's), and
    the evaluator of the report's parameter importances."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        optuna_version = version("optuna")
    except PackageNotFoundError:
        optuna_version = None
    return {
        "sampler": sampler.to_dict(),
        "seed": seed,
        "optuna": optuna_version,
        "importance_evaluator": {"name": IMPORTANCE_EVALUATOR, **IMPORTANCE_SETTINGS},
    }
