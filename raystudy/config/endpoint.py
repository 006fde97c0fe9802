"""Black-box targets: image-labelling services a targets study names instead of weights.

    trials:
      - endpoint:
          name: our_api                 # the target's name in tables
          kind: http                    # http (a JSON image-labelling API) or rekognition (AWS DetectLabels)
          url: https://labels.example.com/v1/classify
          request: bytes                # bytes: the PNG is the body; base64: JSON {image_field: <base64>}
          labels_path: labels           # where the answer's list of labels is (dotted path)
          label_key: label              # each item's label (null: the items are the labels)
          top_k: 1                      # count only the first k labels (default: all returned)
          label_map: labels.json        # {returned label: dataset class name or index, or a list of them}
          rate: 5                       # queries per second at most
          budget: 20000                 # queries this endpoint may be sent by one study, at most
          price_per_1000: 1.0           # for `raystudy plan`'s cost
          auth_env: OUR_API_TOKEN       # the *name* of the variable holding a bearer token

Credentials come from the environment (auth_env) or, for rekognition, boto3's own chain: the
study file, the records and the report hold only the variable's name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from raystudy.errors import RaystudyError

ENDPOINT_KINDS = ("http", "rekognition")
REQUEST_FORMATS = ("bytes", "base64")


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    kind: str = "http"
    url: str | None = None
    request: str = "bytes"
    image_field: str = "image"
    labels_path: str = "labels"
    label_key: str | None = "label"
    top_k: int | None = None
    label_map: tuple[tuple[str, tuple[str, ...]], ...] | None = None  # read from its file at load
    rate: float = 5.0
    budget: int | None = None
    price_per_1000: float | None = None
    auth_env: str | None = None
    timeout_s: float = 30.0
    retries: int = 6
    region: str | None = None  # rekognition
    min_confidence: float = 50.0  # rekognition's MinConfidence, in %

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["label_map"] = None if self.label_map is None else {k: list(v) for k, v in self.label_map}
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EndpointSpec":
        values = dict(values)
        if values.get("label_map") is not None:
            values["label_map"] = tuple((k, tuple(v)) for k, v in values["label_map"].items())
        return cls(**values)

    def identity(self) -> str:
        """What an answer depends on (the cache key's part besides the image): not the rate,
        budget or credentials."""
        return json.dumps(
            {"kind": self.kind, "url": self.url, "request": self.request, "field": self.image_field,
             "region": self.region, "min_confidence": self.min_confidence},
            sort_keys=True,
        )  # fmt: skip


def parse_endpoint(values: Any, where: str) -> EndpointSpec:
    if not isinstance(values, Mapping):
        raise RaystudyError(f"{where}: endpoint must be a mapping (name, kind, url, ...)")
    known = set(EndpointSpec.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise RaystudyError(
            f"{where}: endpoint: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    values = dict(values)
    if "label_map" in values and values["label_map"] is not None:
        values["label_map"] = _read_label_map(values["label_map"], where)
    try:
        spec = EndpointSpec(**values)
    except TypeError as err:
        raise RaystudyError(f"{where}: endpoint: {err}") from None
    _check(spec, where)
    return spec


def _check(spec: EndpointSpec, where: str) -> None:
    def fail(why: str) -> None:
        raise RaystudyError(f"{where}: endpoint {spec.name!r}: {why}")

    if not spec.name or any(c in spec.name for c in "/\\ ") or spec.name in ("mean", "objective", "held_out"):
        fail("name must be a plain name (no slashes or spaces; not mean, objective or held_out)")
    if spec.kind not in ENDPOINT_KINDS:
        fail(f"kind={spec.kind!r}; known: {', '.join(ENDPOINT_KINDS)}")
    if spec.kind == "http" and not (spec.url or "").startswith(("http://", "https://")):
        fail(f"url={spec.url!r} must be an http:// or https:// address")
    if spec.request not in REQUEST_FORMATS:
        fail(f"request={spec.request!r}; known: {', '.join(REQUEST_FORMATS)}")
    if not spec.rate > 0:
        fail(f"rate={spec.rate!r} must be > 0 queries per second")
    if spec.budget is not None and spec.budget < 0:
        fail(f"budget={spec.budget!r} must be >= 0")
    if spec.top_k is not None and spec.top_k < 1:
        fail(f"top_k={spec.top_k!r} must be >= 1")
    if spec.retries < 0 or spec.timeout_s <= 0:
        fail("retries must be >= 0 and timeout_s > 0")


def _read_label_map(path: str, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """{returned label: class or [classes]} from a JSON file, kept in the spec (the file need not
    travel to the nodes); the classes are checked against the dataset when the study loads it."""
    file = Path(path).expanduser()
    try:
        mapping = json.loads(file.read_text())
    except OSError:
        raise RaystudyError(f"{where}: endpoint: label_map {path!r} cannot be read") from None
    except ValueError as err:
        raise RaystudyError(f"{where}: endpoint: label_map {path!r} is not JSON ({err})") from None
    if not isinstance(mapping, dict):
        raise RaystudyError(f"{where}: endpoint: label_map {path!r} must map returned labels to classes")
    out = []
    for label, classes in sorted(mapping.items()):
        classes = classes if isinstance(classes, list) else [classes]
        out.append((str(label), tuple(str(c) for c in classes)))
    return tuple(out)


def check_label_map(spec: EndpointSpec, class_names: tuple[str, ...]) -> None:
    """Every class the label map names must be one of the dataset's (by name or index)."""
    if spec.label_map is None:
        return
    known = set(class_names) | {str(i) for i in range(len(class_names))}
    for label, classes in spec.label_map:
        bad = [c for c in classes if c not in known]
        if bad:
            raise RaystudyError(
                f"endpoint {spec.name!r}: label_map maps {label!r} to {bad[0]!r}, not a class of the dataset "
                f"(classes by name or index 0-{len(class_names) - 1})"
            )
