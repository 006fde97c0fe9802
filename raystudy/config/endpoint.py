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
          auth_env: RAYSTUDY_TOKEN_OUR_API  # the *name* of the variable holding a bearer token
                                        # (RAYSTUDY_TOKEN_*; sent only over https://)

Credentials come from the environment (auth_env) or, for rekognition, boto3's own chain: the
study file, the records and the report hold only the variable's name.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

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
    def from_dict(cls, values: Any, where: str = "a stored endpoint") -> "EndpointSpec":
        """A spec read back from storage (`to_dict`'s output): untrusted, so checked as the YAML is."""
        if isinstance(values, Mapping) and isinstance(values.get("label_map"), Mapping):
            values = {**values, "label_map": _label_map_entries(values["label_map"], where)}
        return _validated(values, where)

    def identity(self) -> str:
        """What an answer depends on (the cache key's part besides the image): not the rate,
        budget or credentials."""
        return json.dumps(
            {"kind": self.kind, "url": self.url, "request": self.request, "field": self.image_field,
             "region": self.region, "min_confidence": self.min_confidence},
            sort_keys=True,
        )  # fmt: skip


def is_loopback_url(url: str) -> bool:
    """An http(s) URL whose host is this machine (127.0.0.0/8, ::1, localhost)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_transport_ok(url: str) -> bool:
    """A bearer token goes only over https://, or plain http:// to this machine (a test service)."""
    scheme = urlsplit(url).scheme
    return scheme == "https" or (scheme == "http" and is_loopback_url(url))


def parse_endpoint(values: Any, where: str) -> EndpointSpec:
    """An endpoint of a study file; its label_map names a JSON file, read now."""
    if isinstance(values, Mapping) and values.get("label_map") is not None:
        values = {**values, "label_map": _read_label_map(values["label_map"], where)}
    return _validated(values, where)


# Each key's type (None: the key may be null). bool is refused where a number is meant.
FIELD_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), False),
    "kind": ((str,), False),
    "url": ((str,), True),
    "request": ((str,), False),
    "image_field": ((str,), False),
    "labels_path": ((str,), False),
    "label_key": ((str,), True),
    "top_k": ((int,), True),
    "label_map": ((tuple,), True),
    "rate": ((int, float), False),
    "budget": ((int,), True),
    "price_per_1000": ((int, float), True),
    "auth_env": ((str,), True),
    "timeout_s": ((int, float), False),
    "retries": ((int,), False),
    "region": ((str,), True),
    "min_confidence": ((int, float), False),
}
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")  # one path component: no '.', '..' or '/'
TOKEN_VARIABLE_PREFIX = "RAYSTUDY_TOKEN_"
TOKEN_VARIABLE_PATTERN = re.compile(TOKEN_VARIABLE_PREFIX + r"[A-Z0-9_]{1,64}")
RESERVED_NAMES = ("mean", "objective", "held_out")
MAX_RETRIES, MAX_TIMEOUT_S, MAX_RATE = 100, 3600.0, 10_000.0
MAX_LABEL_MAP_BYTES = 16 << 20


def _validated(values: Any, where: str) -> EndpointSpec:
    if not isinstance(values, Mapping):
        raise RaystudyError(f"{where}: endpoint must be a mapping (name, kind, url, ...)")
    unknown = sorted(str(k) for k in set(values) - set(FIELD_TYPES))
    if unknown:
        raise RaystudyError(
            f"{where}: endpoint: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELD_TYPES))}"
        )
    if "name" not in values:
        raise RaystudyError(f"{where}: endpoint: give its name")
    for key, value in values.items():
        _check_type(key, value, where)
    spec = EndpointSpec(**values)
    _check(spec, where)
    return spec


def _check_type(key: str, value: Any, where: str) -> None:
    kinds, nullable = FIELD_TYPES[key]
    if value is None and nullable:
        return
    is_number = kinds[-1] is float
    wrong = isinstance(value, bool) or not isinstance(value, kinds)
    if not wrong and is_number and not math.isfinite(value):
        wrong = True
    if not wrong and isinstance(value, str) and (len(value) > 2048 or any(ord(c) < 32 for c in value)):
        wrong = True
    if wrong:
        what = {str: "a string", int: "a whole number", float: "a finite number", tuple: "a label map"}[kinds[-1]]
        raise RaystudyError(f"{where}: endpoint: {key}={_short(value)} must be {what}" + (" or null" * nullable))


def _short(value: Any) -> str:
    text = repr(value)
    return text[:80] + ("..." if len(text) > 80 else "")


def _check(spec: EndpointSpec, where: str) -> None:
    def fail(why: str) -> None:
        raise RaystudyError(f"{where}: endpoint {_short(spec.name)}: {why}")

    if not NAME_PATTERN.fullmatch(spec.name) or spec.name in RESERVED_NAMES:
        fail(
            "name must be one plain name of letters, digits, _ . + - (at most 64, not starting with '.'; "
            f"not {', '.join(RESERVED_NAMES)}): it names the endpoint's answer folder"
        )
    if spec.kind not in ENDPOINT_KINDS:
        fail(f"kind={spec.kind!r}; known: {', '.join(ENDPOINT_KINDS)}")
    if spec.kind == "http" and not (spec.url or "").startswith(("http://", "https://")):
        fail(f"url={spec.url!r} must be an http:// or https:// address")
    if spec.url:
        _check_url(spec.url, fail)
    if spec.region is not None and not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d{1,2}", spec.region):
        fail(f"region={_short(spec.region)} is not an AWS region name (such as us-east-1)")
    if spec.request not in REQUEST_FORMATS:
        fail(f"request={spec.request!r}; known: {', '.join(REQUEST_FORMATS)}")
    if not 0 < spec.rate <= MAX_RATE:
        fail(f"rate={spec.rate!r} must be > 0 and <= {MAX_RATE:g} queries per second")
    if spec.budget is not None and spec.budget < 0:
        fail(f"budget={spec.budget!r} must be >= 0")
    if spec.top_k is not None and spec.top_k < 1:
        fail(f"top_k={spec.top_k!r} must be >= 1")
    if not 0 <= spec.retries <= MAX_RETRIES or not 0 < spec.timeout_s <= MAX_TIMEOUT_S:
        fail(f"retries must be in [0, {MAX_RETRIES}] and timeout_s in (0, {MAX_TIMEOUT_S:g}]")
    if spec.auth_env is not None:
        _check_token_variable(spec, fail)


def _check_url(url: str, fail: Callable[[str], None]) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port out of range)
    except ValueError as err:
        fail(f"url={_short(url)} is not a URL ({err})")
    if not parts.hostname or any(c.isspace() for c in url):
        fail(f"url={_short(url)} names no host")
    if parts.username or parts.password:
        fail("url holds a user name or password: give the token's variable as auth_env instead")


def _check_token_variable(spec: EndpointSpec, fail: Callable[[str], None]) -> None:
    """A study file (or a planted copy of one) must not be able to send any variable of the
    environment (AWS_SECRET_ACCESS_KEY...) to any address: only variables made for it, over TLS."""
    if spec.kind != "http":
        fail("auth_env applies to kind: http (rekognition takes boto3's own credentials)")
    if not TOKEN_VARIABLE_PATTERN.fullmatch(spec.auth_env):
        fail(
            f"auth_env={_short(spec.auth_env)}: an endpoint's token variable must be named "
            f"{TOKEN_VARIABLE_PREFIX}<NAME> (capitals, digits, _), so that no other variable of the environment "
            "can be sent"
        )
    if not token_transport_ok(spec.url or ""):
        fail(f"url={spec.url!r}: a token is sent only over https:// (plain http:// to this machine only)")


def _read_label_map(path: Any, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """{returned label: class or [classes]} from a JSON file, kept in the spec (the file need not
    travel to the nodes); the classes are checked against the dataset when the study loads it."""
    if not isinstance(path, str):
        raise RaystudyError(f"{where}: endpoint: label_map={_short(path)} must be the path of a JSON file")
    try:
        file = Path(path).expanduser()
        if not file.is_file() or file.stat().st_size > MAX_LABEL_MAP_BYTES:
            raise OSError("not a file of at most 16 MiB")
        mapping = json.loads(file.read_bytes())
    except (OSError, RuntimeError):  # RuntimeError: ~user that does not exist
        raise RaystudyError(
            f"{where}: endpoint: label_map {path!r} cannot be read (a JSON file of at most 16 MiB)"
        ) from None
    except (ValueError, RecursionError) as err:
        raise RaystudyError(f"{where}: endpoint: label_map {path!r} is not JSON ({type(err).__name__})") from None
    return _label_map_entries(mapping, f"{where}: endpoint: label_map {path!r}")


def _label_map_entries(mapping: Any, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(mapping, Mapping):
        raise RaystudyError(f"{where}: must map returned labels to classes")
    out = []
    for label, classes in sorted(mapping.items()):
        classes = classes if isinstance(classes, list) else [classes]
        if any(not isinstance(c, (str, int)) or isinstance(c, bool) for c in classes):
            raise RaystudyError(f"{where}: {_short(label)} maps to {_short(classes)}: give class names or indices")
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
