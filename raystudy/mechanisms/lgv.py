"""LGV (Gubri et al. 2022): an ensemble collected along a high-constant-lr fine-tuning run.

LGV is a schedule, not a loss: from a trained checkpoint, fine-tune with a base mechanism (ST's
SGD, SAM or SAM&JR) at constant lr 0.05 and save `LGV_MODELS_PER_EPOCH` snapshots per epoch. The
training loop does this when `TrainConfig.mechanism == "LGV"` (see raystudy.train).
"""

from __future__ import annotations

from raystudy.mechanisms.base import MechanismSpec, Recipe, register

LGV_LR = 0.05
LGV_EPOCHS = 10
LGV_MODELS_PER_EPOCH = 4
LGV_BATCH = 256
LGV_BASES = ("ST", "SAM", "SAM&JR")

register(MechanismSpec(
    "LGV", f"ensemble of {LGV_MODELS_PER_EPOCH}/epoch snapshots over {LGV_EPOCHS} epochs at constant lr {LGV_LR} "
    f"from a trained surrogate (base update: {', '.join(LGV_BASES)})", (),
    lambda m, family: Recipe(),
))
