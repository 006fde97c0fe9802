"""Input-transformation defenses a target can be measured through (`evaluation: {defenses: [...]}`):
the typed spec, validated on load (no torch here; raystudy.metrics.defenses applies them).

A defense is one transformation or several composed with `+`, applied left to right before the
target sees its input:

    jpeg:Q          JPEG compression at quality Q (1-100), as PIL encodes it (4:2:0 chroma)
    bits:B          bit-depth reduction to B bits per channel (1-8)
    resize_pad      random resize-and-pad (Xie et al. 2018): resize to a random side in
                    [side, padded) and zero-pad at a random offset to padded = floor(side * R),
                    R = 331/299 unless given as resize_pad:R (1 < R <= 2); seeded
    median:K        K x K median smoothing (K odd, 3-15), reflecting at the border

Each target `t` of a study is then also measured as `t+<defense>` (e.g. `resnet50+jpeg:75`),
a column of its own in every table.
"""

from __future__ import annotations

from dataclasses import dataclass

from raystudy.errors import RaystudyError
from raystudy.persist.record import DEFENSE_KINDS, is_defended  # noqa: F401 (is_defended re-exported)

RESIZE_PAD_RATIO = 331 / 299  # the published setting: 299-pixel inputs padded to 331
# kind -> (whether it takes a value, its bounds, whether it must be whole)
KINDS: dict[str, tuple[str, float, float, bool]] = {
    "jpeg": ("required", 1, 100, True),
    "bits": ("required", 1, 8, True),
    "median": ("required", 3, 15, True),
    "resize_pad": ("optional", 1, 2, False),
}
MAX_STEPS = 8
assert tuple(sorted(KINDS)) == tuple(sorted(DEFENSE_KINDS))  # one list of the kinds, where rows are read


@dataclass(frozen=True)
class DefenseStep:
    kind: str
    value: float | None = None

    @property
    def name(self) -> str:
        if self.value is None:
            return self.kind
        return f"{self.kind}:{int(self.value) if float(self.value).is_integer() else self.value!r}"

    @property
    def differentiable(self) -> bool:
        """Whether gradients through it mean anything (JPEG and bit-depth round; the median selects)."""
        return self.kind == "resize_pad"


def parse_defense(text: object) -> tuple[DefenseStep, ...]:
    """`jpeg:75+median:3` -> its steps; one line naming the valid kinds on a mistake."""
    if not isinstance(text, str) or not text.strip():
        raise RaystudyError(f"defense {text!r} must be text such as jpeg:75 or bits:4+median:3")
    parts = text.split("+")
    if len(parts) > MAX_STEPS:
        raise RaystudyError(f"defense {text!r} composes {len(parts)} steps; at most {MAX_STEPS}")
    return tuple(_step(part.strip(), text) for part in parts)


def _step(part: str, text: str) -> DefenseStep:
    kind, _, given = part.partition(":")
    if kind not in KINDS:
        raise RaystudyError(f"defense {text!r}: unknown defense {kind!r}; valid: {', '.join(KINDS)}")
    takes, low, high, whole = KINDS[kind]
    if not given:
        if takes == "required":
            raise RaystudyError(f"defense {text!r}: {kind} needs a value ({kind}:N, N in {low:g}..{high:g})")
        return DefenseStep(kind)
    try:
        value = float(given)
    except ValueError:
        raise RaystudyError(f"defense {text!r}: {kind}:{given} is not a number") from None
    inside = low < value <= high if kind == "resize_pad" else low <= value <= high
    if not inside or (whole and not value.is_integer()):
        what = "a whole number" if whole else "a number"
        bounds = f"in ({low:g}, {high:g}]" if kind == "resize_pad" else f"in {low:g}..{high:g}"
        raise RaystudyError(f"defense {text!r}: {kind} takes {what} {bounds}, not {given}")
    if kind == "median" and int(value) % 2 == 0:
        raise RaystudyError(f"defense {text!r}: median takes an odd window (3, 5, ...), not {given}")
    return DefenseStep(kind, int(value) if whole else value)


def defense_name(steps: tuple[DefenseStep, ...]) -> str:
    """The defense as it names a target's column (`resnet50+jpeg:75`)."""
    return "+".join(step.name for step in steps)
