"""The configuration layer: typed, frozen settings validated once, at the YAML / CLI boundary.

    TrainConfig   one training run (raystudy.config.train; presets per dataset family)
    EvalConfig    what the trial-end hook measures (raystudy.config.evaluation)
    LgvPhase      the LGV phase after training (raystudy.config.lgv, imported from there)
    StudySpec     a search-space file, with its resolved TrialPlans (raystudy.config.study)

It imports nothing of the package above it (no models, metrics, training or Ray): everything
below takes these objects, never raw dicts.
"""

from raystudy.config.evaluation import EvalConfig
from raystudy.config.study import STUDY_MANIFEST, StudySpec, TrialPlan, load_space, parse_space, read_space
from raystudy.config.train import FAITHFUL, PRESETS, TrainConfig

__all__ = [
    "FAITHFUL",
    "PRESETS",
    "STUDY_MANIFEST",
    "EvalConfig",
    "StudySpec",
    "TrainConfig",
    "TrialPlan",
    "load_space",
    "parse_space",
    "read_space",
]
