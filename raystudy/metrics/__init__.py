"""Trial-end metrics: smoothness, gradient similarity, transfer attacks and ASR (no Ray here)."""

from raystudy.metrics.asr import TransferCount, fooling_rate, transfer_success
from raystudy.metrics.attacks import ATTACKS, LinfAttack, autoattack, make_attack
from raystudy.metrics.hook import EvalConfig, EvalSet, evaluate_surrogate, make_eval_set, measure_surrogate
from raystudy.metrics.similarity import gradient_cosine, input_gradients
from raystudy.metrics.smoothness import input_hessian_top_eigenvalue, smoothness

__all__ = [
    "ATTACKS",
    "EvalConfig",
    "EvalSet",
    "LinfAttack",
    "TransferCount",
    "autoattack",
    "evaluate_surrogate",
    "fooling_rate",
    "gradient_cosine",
    "input_gradients",
    "input_hessian_top_eigenvalue",
    "make_attack",
    "make_eval_set",
    "measure_surrogate",
    "smoothness",
    "transfer_success",
]
