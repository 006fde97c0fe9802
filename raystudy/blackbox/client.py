"""Querying black-box endpoints (raystudy.config.endpoint): rate-limited, retried, paid once per image.

The labels of every answer are kept in the experiment, addressed by the SHA-256 of the endpoint's
identity and the image's PNG bytes (`<experiment>/endpoint-cache/<name>/<digest>.json`), written as
soon as they arrive: a resumed or repeated query phase reads them back instead of paying again, and
a crash loses at most the answer in flight. 429, 5xx, timeouts and refused connections are retried
with exponential backoff and full jitter (honouring Retry-After up to MAX_RETRY_AFTER_S), at most
`retries` times; anything else is one line naming the endpoint, the status and the start of the
answer.

An endpoint is not trusted: an answer is read as a stream of at most MAX_ANSWER_BYTES, the whole
request (connect, headers and body) ends `timeout_s` after it starts, a redirect is refused (nothing
goes to its target), and an answer that is not JSON, or nested too deeply to read, is one line.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import os
import random
import socket
import threading
import time
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

import requests
import requests.adapters

from raystudy.config.endpoint import EndpointSpec, token_transport_ok
from raystudy.errors import RaystudyError, require_extra
from raystudy.persist import storage

CACHE_DIR = "endpoint-cache"
RETRY_STATUSES = {429, 500, 502, 503, 504}
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
MAX_RETRY_AFTER_S = 300.0  # a Retry-After beyond this (or not a number) cannot stall a study for longer
# An image-labelling answer is a few kB; anything over 1 MiB is refused unread (Content-Length) or as
# soon as the streamed bytes pass it, so a hostile endpoint costs at most about this much memory.
MAX_ANSWER_BYTES = 1 << 20
CHUNK_BYTES = 64 << 10
EXCERPT_BYTES = 160  # of an answer quoted in an error
# A kept entry holds labels cut from an answer of at most MAX_ANSWER_BYTES; re-encoded as JSON they
# are at most ~3 times as long (an astral character becomes \\ud83d\\ude00): more is not ours.
MAX_CACHE_ENTRY_BYTES = 4 * MAX_ANSWER_BYTES
KEPT_LABELS = "labels/2"  # the mark of a kept entry (earlier versions kept the endpoint's whole answer)


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
    """The labels each image got from the endpoint, kept in the experiment, one small JSON object per
    image: {"kept": KEPT_LABELS, "labels": [...all returned, before top_k...], "labels_path": ...,
    "label_key": ...}. It lives in the study's storage (a bucket other nodes write): what is read back
    is checked, and a bad entry is one line naming its file (not silently paid for again)."""

    def __init__(self, experiment: str, endpoint: str):
        self.location = storage.join(experiment, CACHE_DIR, endpoint)
        # sizes from the one listing, so that an oversized entry is refused before it is read
        self.sizes = {
            e.path[: -len(".json")]: e.size
            for e in storage.list_tree(self.location)
            if "/" not in e.path and e.path.endswith(".json")
        }
        self.present = set(self.sizes)

    def get(self, digest: str, spec: EndpointSpec) -> list[str] | None:
        """Every label kept for this image (top_k not applied), or None if it was never answered."""
        if digest not in self.present:
            return None
        where = storage.join(self.location, f"{digest}.json")
        if self.sizes[digest] > MAX_CACHE_ENTRY_BYTES:
            raise RaystudyError(f"{where}: {self.sizes[digest]} bytes, more than a kept answer holds: not read")
        data = storage.read_bytes(where)
        if len(data) > MAX_CACHE_ENTRY_BYTES:
            raise RaystudyError(f"{where}: {len(data)} bytes, more than a kept answer holds: not read")
        try:
            entry = json.loads(data)
        except (ValueError, RecursionError):
            raise RaystudyError(f"{where}: not a kept answer (not JSON, or nested too deeply)") from None
        if not (isinstance(entry, dict) and entry.get("kept") == KEPT_LABELS):
            return _labels_of_old_entry(spec, entry, where)
        labels = entry.get("labels")
        if not (isinstance(labels, list) and all(isinstance(label, str) for label in labels)):
            raise RaystudyError(f"{where}: a kept answer's labels must be a list of strings")
        read_as = (entry.get("labels_path"), entry.get("label_key"))
        if read_as != (spec.labels_path, spec.label_key):
            raise RaystudyError(
                f"{where}: kept with labels_path={read_as[0]!r}, label_key={read_as[1]!r}; endpoint {spec.name!r} "
                f"now says {spec.labels_path!r}, {spec.label_key!r} (only the labels are kept: restore those "
                f"settings, or move {self.location} away to ask again, paying again)"
            )
        return labels

    def put(self, digest: str, spec: EndpointSpec, labels: list[str]) -> None:
        """Keep the labels only, never the endpoint's whole answer (what else it says is not ours to keep)."""
        entry = {"kept": KEPT_LABELS, "labels": labels, "labels_path": spec.labels_path, "label_key": spec.label_key}
        data = json.dumps(entry, separators=(",", ":")).encode()
        storage.write_bytes(storage.join(self.location, f"{digest}.json"), data)
        self.present.add(digest)
        self.sizes[digest] = len(data)


def _labels_of_old_entry(spec: EndpointSpec, answer: Any, where: str) -> list[str]:
    """Compatibility: an entry written by an earlier version is the endpoint's whole answer; its labels
    are read from it as from a fresh answer (so an experiment already paid for is not paid again)."""
    try:
        return _answer_labels(spec, answer)
    except RaystudyError as err:
        raise RaystudyError(f"{where}: not a kept answer ({err})") from None


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
        labels = self.cache.get(digest, self.spec)
        if labels is None:
            labels = self._query(png)
            self.cache.put(digest, self.spec, labels)
            self.queries += 1
        return labels[: self.spec.top_k] if self.spec.top_k else labels

    def _query(self, png: bytes) -> list[str]:
        for attempt in range(self.spec.retries + 1):
            self.limiter.wait()
            outcome, retry_after, detail = self._send(png)
            if outcome == "answer":
                return _answer_labels(self.spec, detail)  # a wrong shape fails now, before anything is kept
            if outcome == "fatal" or attempt == self.spec.retries:
                break
            self.sleep(backoff_seconds(attempt, retry_after, self.rng))
        kind = EndpointUnreachable if outcome == "retry" else RaystudyError
        raise kind(f"endpoint {self.spec.name!r}: {detail} (after {attempt + 1} attempt(s); answers so far are kept)")


def returned_labels(spec: EndpointSpec, answer: Any) -> list[str]:
    """The labels an answer returns, in its order (first k with top_k)."""
    labels = _answer_labels(spec, answer)
    return labels[: spec.top_k] if spec.top_k else labels


def _answer_labels(spec: EndpointSpec, answer: Any) -> list[str]:
    """Every label an answer returns, in its order."""
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
    return labels


def _excerpt(answer: Any) -> str:
    try:
        text = json.dumps(answer) if not isinstance(answer, str) else answer
    except (ValueError, RecursionError):  # parsed near the recursion limit, too deep to write back
        text = f"a {type(answer).__name__} nested too deeply to show"
    return text[:EXCERPT_BYTES] + ("..." if len(text) > EXCERPT_BYTES else "")


# ---------------------------------------------------------------------------------------------
# HTTP endpoints


def _http_sender(spec: EndpointSpec):
    session = requests.Session()
    session.auth = _no_other_credentials  # else requests adds ~/.netrc's login to any host, http:// too
    adapter = _DeadlineAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # The byte limit counts what is parsed: no compressed answers (a few kB of gzip can inflate to GBs).
    headers = {"Accept-Encoding": "identity"}
    if spec.auth_env:
        if not token_transport_ok(spec.url):
            raise RaystudyError(
                f"endpoint {spec.name!r}: its token ({spec.auth_env}) would travel unencrypted to "
                f"{urlsplit(spec.url).hostname}: use https:// (plain http:// only to this machine)"
            )
        token = os.environ.get(spec.auth_env)
        if not token:
            raise RaystudyError(f"endpoint {spec.name!r}: the variable {spec.auth_env} (its token) is not set")
        headers["Authorization"] = f"Bearer {token}"

    def send(png: bytes) -> tuple[str, float | None, Any]:
        if spec.request == "bytes":
            payload = {"data": png, "headers": {**headers, "Content-Type": "image/png"}}
        else:
            payload = {"json": {spec.image_field: base64.b64encode(png).decode()}, "headers": headers}
        with _Watchdog(spec.timeout_s) as watchdog:
            try:
                # requests' timeout bounds the connect and each read; the watchdog bounds them all together.
                # Redirects are refused: nothing (the image, a token) goes anywhere but spec.url.
                response = session.post(spec.url, **payload, timeout=spec.timeout_s, stream=True, allow_redirects=False)
            except (requests.ConnectionError, requests.Timeout) as err:
                return "retry", None, watchdog.late() or f"{spec.url} unreachable ({type(err).__name__})"
            except requests.RequestException as err:  # an invalid URL or header: asking again will not help
                return "fatal", None, f"{spec.url}: {type(err).__name__}: {str(err)[:160]}"
            with response:  # closed on every way out: a refused answer is not read any further
                return _judge(spec, response, watchdog)

    return send


def _no_other_credentials(request):
    return request  # the only credential sent is the endpoint's own token (its Authorization header)


def _judge(spec: EndpointSpec, response: requests.Response, watchdog: _Watchdog) -> tuple[str, float | None, Any]:
    status = response.status_code
    if 300 <= status < 400:
        try:
            target = urlsplit(urljoin(spec.url, response.headers.get("Location", ""))).hostname
        except ValueError:  # a Location that is not a URL
            target = "an address that is not a URL"
        return "fatal", None, f"redirected to {target!r} (HTTP {status}): redirects are refused"
    if status in RETRY_STATUSES:
        return "retry", _retry_after(response.headers.get("Retry-After")), f"HTTP {status}"
    if status != 200:
        return "fatal", None, f"HTTP {status} {_first_bytes(response)!r}"
    encoding = response.headers.get("Content-Encoding", "identity")
    if encoding.lower() != "identity":
        return "fatal", None, f"answered with Content-Encoding {encoding[:40]!r} (asked for none)"
    declared = _content_length(response)
    if declared is not None and declared > MAX_ANSWER_BYTES:
        return "fatal", None, f"answer of {declared} bytes refused unread (Content-Length; limit {MAX_ANSWER_BYTES})"
    data = bytearray()
    try:
        for chunk in response.iter_content(CHUNK_BYTES):
            data += chunk
            if len(data) > MAX_ANSWER_BYTES:
                return "fatal", None, f"answer of more than {MAX_ANSWER_BYTES} bytes refused (read no further)"
            if watchdog.late():
                break
    except (requests.RequestException, OSError) as err:
        return "retry", None, watchdog.late() or f"{spec.url} dropped the answer ({type(err).__name__})"
    if watchdog.late():  # a socket shut at the deadline ends an answer without a length early: not all of it
        return "retry", None, watchdog.late()
    try:
        return "answer", None, json.loads(data)
    except RecursionError:
        return "fatal", None, f"answered JSON nested too deeply to read ({len(data)} bytes)"
    except ValueError:
        return "fatal", None, f"answered {bytes(data[:EXCERPT_BYTES]).decode('utf-8', 'replace')!r}, not JSON"


def _first_bytes(response: requests.Response) -> str:
    """The start of an error answer, for its one line: never more of it."""
    try:
        return response.raw.read(EXCERPT_BYTES, decode_content=False).decode("utf-8", "replace")
    except Exception:  # an excerpt is a courtesy: the status alone says what went wrong
        return ""


def _content_length(response: requests.Response) -> int | None:
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None  # none, or not a number: the streamed bytes are counted instead


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the backoff alone decides
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


_in_flight = threading.local()  # .watchdog: the _Watchdog of the request this thread is sending


class _Watchdog:
    """The deadline of one request: `seconds` after it starts, the socket its answer is read from is
    shut down, so that a read blocked on an endpoint dripping its headers or body ends at once
    (requests' timeouts bound each read, not their sum). `late()` says whether the deadline passed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.fired = False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def __enter__(self) -> _Watchdog:
        _in_flight.watchdog = self
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        _in_flight.watchdog = None

    def watch(self, sock: socket.socket) -> None:
        """Called by the connection (below) just before it reads the answer from `sock`."""
        with self.lock:
            self.sock = sock
            if self.fired:
                _shut_down(sock)

    def _fire(self) -> None:
        with self.lock:
            self.fired = True
            if self.sock is not None:
                _shut_down(self.sock)

    def late(self) -> str | None:
        if self.fired or time.monotonic() >= self.deadline:
            return f"no whole answer within timeout_s={self.seconds:g} s"
        return None


def _shut_down(sock) -> None:
    try:  # the TCP socket itself, even under TLS: a reader blocked on it in another thread wakes up
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, TypeError):
        pass  # already closed, or not a plain socket (TLS in TLS): its per-read timeout still applies


class _WatchedConnection:
    """Mixed into urllib3's connection class of each pool of a _DeadlineAdapter: shows this thread's
    watchdog the socket an answer is about to be read from (a kept-alive connection's too)."""

    def getresponse(self, *args, **kwargs):
        watchdog = getattr(_in_flight, "watchdog", None)
        if watchdog is not None:
            watchdog.watch(self.sock)
        return super().getresponse(*args, **kwargs)


@functools.cache
def _watched(connection_class: type) -> type:
    return type(f"Watched{connection_class.__name__}", (_WatchedConnection, connection_class), {})


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, its pools making _WatchedConnections (so that a request's deadline holds)."""

    def get_connection_with_tls_context(self, *args, **kwargs):
        pool = super().get_connection_with_tls_context(*args, **kwargs)
        if not issubclass(pool.ConnectionCls, _WatchedConnection):
            pool.ConnectionCls = _watched(pool.ConnectionCls)
        return pool


# ---------------------------------------------------------------------------------------------
# AWS Rekognition


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
        return "answer", None, {"labels": labels}  # read as an answer of the generic shape

    return send
