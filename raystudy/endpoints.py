"""Querying black-box endpoints (raystudy.config.endpoint): rate-limited, retried, paid once per image.

Every answer is kept in the experiment, addressed by the SHA-256 of the endpoint's identity and
the image's PNG bytes (`<experiment>/endpoint-cache/<name>/<digest>.json`), written as soon as it
arrives: a resumed or repeated query phase reads it back instead of paying again, and a crash
loses at most the answer in flight. 429, 5xx, timeouts and refused connections are retried with
exponential backoff and full jitter (honouring Retry-After), at most `retries` times; anything
else is one line naming the endpoint, the status and the start of the answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import threading
import time
from typing import Any, Callable

from raystudy import storage
from raystudy.config.endpoint import EndpointSpec
from raystudy.errors import RaystudyError, require_extra

CACHE_DIR = "endpoint-cache"
RETRY_STATUSES = {429, 500, 502, 503, 504}
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0


class EndpointUnreachable(RaystudyError):
    """The endpoint kept failing after every retry: what was answered is kept; resume later."""


class RateLimiter:
    """At most `rate` calls per second, spaced evenly (no bursts against a service's own limiter)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic, sleep=time.sleep):
        self.interval, self.clock, self.sleep = 1.0 / rate, clock, sleep
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = self.clock()
            if now < self.next_at:
                self.sleep(self.next_at - now)
                now = self.next_at
            self.next_at = now + self.interval


def backoff_seconds(attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """Full jitter over an exponentially growing ceiling; a server's Retry-After is a floor."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)
    return max(retry_after or 0.0, rng.uniform(0, ceiling))


def image_digest(spec: EndpointSpec, png: bytes) -> str:
    return hashlib.sha256(spec.identity().encode() + b"\0" + png).hexdigest()


class AnswerCache:
    """The endpoint's answers kept in the experiment, one small JSON object per image."""

    def __init__(self, experiment: str, endpoint: str):
        self.location = storage.join(experiment, CACHE_DIR, endpoint)
        self.present = {name[: -len(".json")] for name in storage.list_files(self.location, ".json")}

    def get(self, digest: str) -> Any | None:
        if digest not in self.present:
            return None
        return json.loads(storage.read_bytes(storage.join(self.location, f"{digest}.json")))

    def put(self, digest: str, answer: Any) -> None:
        storage.write_bytes(storage.join(self.location, f"{digest}.json"), json.dumps(answer).encode())
        self.present.add(digest)


class EndpointClient:
    """Labels for PNG images from one endpoint: cached answers first, then queries within its rate."""

    def __init__(self, spec: EndpointSpec, cache: AnswerCache, sleep=time.sleep, seed: int = 0):
        self.spec, self.cache, self.sleep = spec, cache, sleep
        self.limiter = RateLimiter(spec.rate, sleep=sleep)
        self.rng = random.Random(seed)
        self.queries = 0  # answered queries this client paid for
        self._send = _rekognition_sender(spec) if spec.kind == "rekognition" else _http_sender(spec)

    def labels(self, png: bytes) -> list[str]:
        digest = image_digest(self.spec, png)
        answer = self.cache.get(digest)
        if answer is None:
            answer = self._query(png)
            self.cache.put(digest, answer)
            self.queries += 1
        return returned_labels(self.spec, answer)

    def _query(self, png: bytes) -> Any:
        for attempt in range(self.spec.retries + 1):
            self.limiter.wait()
            outcome, retry_after, detail = self._send(png)
            if outcome == "answer":
                returned_labels(self.spec, detail)  # a wrong shape fails now, before it is kept
                return detail
            if outcome == "fatal" or attempt == self.spec.retries:
                break
            self.sleep(backoff_seconds(attempt, retry_after, self.rng))
        kind = EndpointUnreachable if outcome == "retry" else RaystudyError
        raise kind(f"endpoint {self.spec.name!r}: {detail} (after {attempt + 1} attempt(s); answers so far are kept)")


def returned_labels(spec: EndpointSpec, answer: Any) -> list[str]:
    """The labels an answer returns, in its order (first k with top_k)."""
    items = answer
    for part in spec.labels_path.split(".") if spec.labels_path else ():
        if not isinstance(items, dict) or part not in items:
            raise RaystudyError(f"endpoint {spec.name!r} answered {_excerpt(answer)}: no {spec.labels_path!r} in it")
        items = items[part]
    if not isinstance(items, list):
        raise RaystudyError(f"endpoint {spec.name!r} answered {_excerpt(answer)}: {spec.labels_path!r} is not a list")
    labels = []
    for item in items:
        label = item.get(spec.label_key) if spec.label_key and isinstance(item, dict) else item
        if not isinstance(label, (str, int)):
            raise RaystudyError(
                f"endpoint {spec.name!r} answered {_excerpt(answer)}: an item has no label {spec.label_key!r}"
            )
        labels.append(str(label))
    return labels[: spec.top_k] if spec.top_k else labels


def _excerpt(answer: Any) -> str:
    text = json.dumps(answer) if not isinstance(answer, str) else answer
    return text[:160] + ("..." if len(text) > 160 else "")


def _http_sender(spec: EndpointSpec):
    import requests

    session = requests.Session()
    headers = {}
    if spec.auth_env:
        token = os.environ.get(spec.auth_env)
        if not token:
            raise RaystudyError(f"endpoint {spec.name!r}: the variable {spec.auth_env} (its token) is not set")
        headers["Authorization"] = f"Bearer {token}"

    def send(png: bytes) -> tuple[str, float | None, Any]:
        try:
            if spec.request == "bytes":
                response = session.post(
                    spec.url, data=png, headers={**headers, "Content-Type": "image/png"}, timeout=spec.timeout_s
                )
            else:
                body = {spec.image_field: base64.b64encode(png).decode()}
                response = session.post(spec.url, json=body, headers=headers, timeout=spec.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as err:
            return "retry", None, f"{spec.url} unreachable ({type(err).__name__})"
        if response.status_code in RETRY_STATUSES:
            return "retry", _retry_after(response.headers.get("Retry-After")), f"HTTP {response.status_code}"
        if response.status_code != 200:
            return "fatal", None, f"HTTP {response.status_code} {response.text[:160]!r}"
        try:
            return "answer", None, response.json()
        except ValueError:
            return "fatal", None, f"answered {response.text[:160]!r}, not JSON"

    return send


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the backoff alone decides


def _rekognition_sender(spec: EndpointSpec):
    """AWS Rekognition DetectLabels; credentials from boto3's own chain (environment, profile, role)."""
    require_extra("boto3", "rekognition", f"endpoint {spec.name!r} (kind: rekognition)")
    import boto3
    import botocore.exceptions

    region = spec.region or boto3.session.Session().region_name
    if not region:
        raise RaystudyError(f"endpoint {spec.name!r}: give its region (no AWS region is configured here)")
    endpoint_url = os.environ.get("AWS_ENDPOINT_URL_REKOGNITION")
    if endpoint_url is None and os.environ.get("AWS_ENDPOINT_URL") == os.environ.get("RAYSTUDY_S3_ENDPOINT"):
        # raystudy pointed AWS clients at the study's S3 server (RAYSTUDY_S3_ENDPOINT): not Rekognition's
        endpoint_url = f"https://rekognition.{region}.amazonaws.com"
    client = boto3.client("rekognition", region_name=region, endpoint_url=endpoint_url)
    throttled = {"ThrottlingException", "ProvisionedThroughputExceededException", "InternalServerError"}

    def send(png: bytes) -> tuple[str, float | None, Any]:
        try:
            answer = client.detect_labels(Image={"Bytes": png}, MinConfidence=spec.min_confidence)
        except botocore.exceptions.ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            return ("retry" if code in throttled else "fatal"), None, f"Rekognition {code}"
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ReadTimeoutError) as err:
            return "retry", None, f"Rekognition unreachable ({type(err).__name__})"
        labels = [{"label": label["Name"], "score": label.get("Confidence")} for label in answer.get("Labels", [])]
        return "answer", None, {"labels": labels}  # kept in the cache as the generic shape

    return send
