"""Trial-end metrics: smoothness, gradient similarity, transfer attacks and ASR (no Ray here).
The hook that runs them is raystudy.metrics.hook (`measure_surrogate`)."""

from raystudy.metrics.asr import transfer_success
from raystudy.metrics.attacks import LinfAttack, autoattack, make_attack
from raystudy.metrics.hook import EvalConfig, evaluate_surrogate, make_eval_set
from raystudy.metrics.similarity import gradient_cosine, input_gradients
from raystudy.metrics.smoothness import input_hessian_top_eigenvalue, smoothness

__all__ = [
    "EvalConfig",
    "LinfAttack",
    "autoattack",
    "evaluate_surrogate",
    "gradient_cosine",
    "input_gradients",
    "input_hessian_top_eigenvalue",
    "make_attack",
    "make_eval_set",
    "smoothness",
    "transfer_success",
]
