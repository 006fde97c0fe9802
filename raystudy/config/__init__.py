"""The configuration layer: typed, frozen settings validated once, at the YAML / CLI boundary.

    TrainConfig   one training run (raystudy.config.train; presets per dataset family)
    EvalConfig    what the trial-end hook measures (raystudy.config.evaluation)
    LgvPhase      the LGV phase after training (raystudy.config.lgv)
    StudySpec     a search-space file, with its resolved TrialPlans (raystudy.config.study)

It imports nothing of the package above it (no models, metrics, training or Ray): everything
below takes these objects, never raw dicts.
"""

from raystudy.config.evaluation import EvalConfig
from raystudy.config.lgv import LGV_BASES, LgvPhase
from raystudy.config.study import (
    STUDY_MANIFEST,
    SearchParam,
    SearchSpec,
    StudySpec,
    TrialPlan,
    load_space,
    parse_space,
    read_space,
)
from raystudy.config.train import FAITHFUL, PRECISIONS, PRESETS, SAM_BN_MODES, TrainConfig

__all__ = [
    "FAITHFUL",
    "LGV_BASES",
    "PRECISIONS",
    "PRESETS",
    "SAM_BN_MODES",
    "STUDY_MANIFEST",
    "EvalConfig",
    "LgvPhase",
    "SearchParam",
    "SearchSpec",
    "StudySpec",
    "TrainConfig",
    "TrialPlan",
    "load_space",
    "parse_space",
    "read_space",
]
