"""EndpointClient against a hostile endpoint on 127.0.0.1: an answer too large, dripped, nested too
deeply, compressed or redirected is one line, bounded in memory and time, and nothing of it is kept;
the cache keeps only labels, reads what earlier versions kept, and refuses an entry tampered with."""

from __future__ import annotations

import gzip
import json
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raystudy.blackbox.client import (
    MAX_ANSWER_BYTES,
    MAX_CACHE_ENTRY_BYTES,
    MAX_RETRY_AFTER_S,
    AnswerCache,
    EndpointClient,
    EndpointUnreachable,
    image_digest,
)
from raystudy.config.endpoint import EndpointSpec
from raystudy.errors import RaystudyError

NO_WAIT = lambda seconds: None  # noqa: E731  (rate and backoff waits)
MiB = 1 << 20


class Hostile:
    """A loopback server answering each request with `answer(handler, server)`, which may write
    anything (raw bytes, slowly, too much); it records (client port, path, headers, body) of each."""

    def __init__(self, answer, protocol: str = "HTTP/1.0"):
        self.requests: list[tuple[int, str, dict, bytes]] = []
        self.release = threading.Event()  # set at teardown: a handler still dripping or waiting stops
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = protocol

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append((self.client_address[1], self.path, dict(self.headers), body))
                try:
                    answer(self, outer)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading, as it should
                    self.close_connection = True

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def drip(self, handler, data: bytes, every_s: float = 0.5) -> None:
        for i in range(len(data)):
            if self.release.wait(every_s):
                return
            handler.wfile.write(data[i : i + 1])


@pytest.fixture
def hostile():
    servers = []

    def make(answer, protocol: str = "HTTP/1.0"):
        servers.append(Hostile(answer, protocol))
        return servers[-1]

    yield make
    for server in servers:
        server.release.set()
        server.httpd.shutdown()
        server.httpd.server_close()


def send_json(handler, status: int, answer, headers: dict | None = None) -> None:
    data = json.dumps(answer).encode() if not isinstance(answer, bytes) else answer
    handler.send_response(status)
    for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)


def spec(url: str, **changes) -> EndpointSpec:
    return EndpointSpec(**{"name": "api", "url": url, "rate": 1000.0, "retries": 0, "timeout_s": 5.0, **changes})


def client(url: str, tmp_path, **changes) -> EndpointClient:
    return EndpointClient(spec(url, **changes), AnswerCache(str(tmp_path), "api"), sleep=NO_WAIT)


def kept(tmp_path) -> list:
    return sorted((tmp_path / "endpoint-cache" / "api").glob("*"))


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize("status, message", [(200, f"more than {MAX_ANSWER_BYTES} bytes"), (403, "HTTP 403")])
def test_an_oversized_answer_costs_little_memory_and_is_not_kept(hostile, tmp_path, status, message):
    """20 MiB streamed without a Content-Length (valid JSON, were it all read): reading stops past
    MAX_ANSWER_BYTES. Python's allocations are traced (tracemalloc) rather than the process's max
    RSS, a high-water mark that importing torch has already raised far past 20 MiB."""
    block = b" " * (64 << 10)

    def answer(handler, server):
        handler.send_response(status)
        handler.end_headers()
        handler.wfile.write(b'{"labels": ["cat"], "pad": "')
        for _ in range(20 * 16):
            handler.wfile.write(block)
        handler.wfile.write(b'"}')

    server = hostile(answer)
    endpoint = client(server.url, tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(RaystudyError) as error:
            endpoint.labels(b"png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in one_line(error) and "'api'" in str(error.value)
    assert not isinstance(error.value, EndpointUnreachable) and len(server.requests) == 1  # not retried
    assert peak < 6 * MiB, f"{peak / MiB:.1f} MiB allocated for a refused answer"
    assert kept(tmp_path) == []


def test_a_content_length_over_the_limit_is_refused_unread(hostile, tmp_path):
    def answer(handler, server):  # says 200 MB, then sends nothing: a client that reads waits for the deadline
        handler.send_response(200)
        handler.send_header("Content-Length", str(200 * 10**6))
        handler.end_headers()
        server.release.wait(60)

    server = hostile(answer)
    started = time.monotonic()
    with pytest.raises(RaystudyError) as error:
        client(server.url, tmp_path, timeout_s=20.0).labels(b"png")
    assert time.monotonic() - started < 10
    assert "200000000 bytes refused unread (Content-Length" in one_line(error) and "'api'" in str(error.value)
    assert not isinstance(error.value, EndpointUnreachable) and kept(tmp_path) == []


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_dripping_answer_ends_at_the_deadline(hostile, tmp_path, where):
    """One byte each 0.5 s, timeout_s 2: requests' per-read timeout never fires; the deadline does,
    for the body and for the status line and headers alike. A timeout: retryable."""
    answer_bytes = json.dumps({"labels": [{"label": "cat"}], "pad": "x" * 20}).encode()

    def answer(handler, server):
        if where == "body":
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(answer_bytes)))
            handler.end_headers()
            server.drip(handler, answer_bytes)
        else:
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(answer_bytes)}\r\n\r\n".encode()
            server.drip(handler, head + answer_bytes)

    server = hostile(answer)
    timeout_s = 2.0
    started = time.monotonic()
    with pytest.raises(EndpointUnreachable) as error:
        client(server.url, tmp_path, timeout_s=timeout_s).labels(b"png")
    elapsed = time.monotonic() - started
    assert "no whole answer within timeout_s=2 s" in one_line(error)
    assert timeout_s * 0.9 <= elapsed <= 2 * timeout_s + 3, f"{elapsed:.1f} s"
    assert kept(tmp_path) == []


def test_the_deadline_holds_on_a_kept_alive_connection(hostile, tmp_path):
    """The second request reuses the first one's connection (HTTP/1.1): its dripped answer ends too."""

    def answer(handler, server):
        if len(server.requests) == 1:
            send_json(handler, 200, {"labels": [{"label": "cat"}]})
        else:
            server.drip(handler, b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")

    server = hostile(answer, protocol="HTTP/1.1")
    endpoint = client(server.url, tmp_path, timeout_s=2.0)
    assert endpoint.labels(b"first") == ["cat"]
    started = time.monotonic()
    with pytest.raises(EndpointUnreachable, match="within timeout_s=2 s"):
        endpoint.labels(b"second")
    assert time.monotonic() - started <= 2 * 2.0 + 3
    assert server.requests[0][0] == server.requests[1][0]  # the same client port: one connection


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,  # the C parser's recursion limit
        b'{"labels": ' + b"[" * 950 + b"]" * 950 + b"}",  # parses, perhaps, but cannot be written back
        b'{"labels": [{"label": "cat"}',  # cut short
        b"\xff\xfe not text",
    ],
)
def test_an_answer_nested_too_deeply_or_not_json_is_one_line(hostile, tmp_path, body):
    server = hostile(lambda handler, server: send_json(handler, 200, body))
    with pytest.raises(RaystudyError) as error:  # a RecursionError is no RaystudyError: it would fail here
        client(server.url, tmp_path).labels(b"png")
    text = one_line(error)
    assert text.startswith("endpoint 'api': ") or text.startswith("endpoint 'api' answered ")
    assert not isinstance(error.value, EndpointUnreachable) and kept(tmp_path) == []


def test_a_compressed_answer_is_refused(hostile, tmp_path):
    """Accept-Encoding: identity is asked for; a gzip answer anyway (a bomb, perhaps) is not inflated."""
    zipped = gzip.compress(json.dumps({"labels": [{"label": "cat"}]}).encode())
    server = hostile(lambda handler, server: send_json(handler, 200, zipped, {"Content-Encoding": "gzip"}))
    with pytest.raises(RaystudyError) as error:
        client(server.url, tmp_path).labels(b"png")
    assert "Content-Encoding 'gzip'" in one_line(error) and kept(tmp_path) == []
    assert server.requests[0][2]["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_refused_and_its_target_gets_nothing(hostile, tmp_path, monkeypatch, status):
    target = hostile(lambda handler, server: send_json(handler, 200, {"labels": [{"label": "cat"}]}))
    redirecting = hostile(lambda handler, server: send_json(handler, status, {}, {"Location": target.url + "steal"}))
    monkeypatch.setenv("API_TOKEN_FOR_TEST", "s3cr3t")
    with pytest.raises(RaystudyError) as error:
        client(redirecting.url, tmp_path, auth_env="API_TOKEN_FOR_TEST", retries=3).labels(b"png")
    assert f"redirected to '127.0.0.1' (HTTP {status}): redirects are refused" in one_line(error)
    assert target.requests == [] and len(redirecting.requests) == 1  # nothing followed, nothing retried
    assert kept(tmp_path) == []


def test_a_hostile_retry_after_cannot_stall_the_study(hostile, tmp_path):
    script = {1: "1e12", 2: "nan", 3: "inf"}

    def answer(handler, server):
        n = len(server.requests)
        if n in script:
            send_json(handler, 429, {}, {"Retry-After": script[n]})
        else:
            send_json(handler, 200, {"labels": [{"label": "cat"}]})

    server = hostile(answer)
    waits = []
    endpoint = EndpointClient(spec(server.url, retries=4), AnswerCache(str(tmp_path), "api"), sleep=waits.append)
    assert endpoint.labels(b"png") == ["cat"] and len(server.requests) == 4
    assert len(waits) == 3 and all(0 <= w <= MAX_RETRY_AFTER_S for w in waits), waits


def test_a_token_is_refused_over_plain_http_to_another_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("API_TOKEN_FOR_TEST", "s3cr3t")
    with pytest.raises(RaystudyError) as error:
        client("http://labels.example.com/v1", tmp_path, auth_env="API_TOKEN_FOR_TEST")
    assert "would travel unencrypted to labels.example.com" in one_line(error) and "s3cr3t" not in str(error.value)
    for fine in ("https://labels.example.com/v1", "http://127.0.0.1:9/", "http://localhost:9/"):
        client(fine, tmp_path, auth_env="API_TOKEN_FOR_TEST")  # nothing is sent yet
    client("http://labels.example.com/v1", tmp_path)  # no token: nothing to protect


# ---------------------------------------------------------------------------------------------
# The answer cache


def test_only_the_labels_of_a_good_answer_are_kept(hostile, tmp_path):
    answer = {
        "labels": [{"label": "cat", "score": 0.93, "box": [1, 2, 3, 4]}, {"label": "dog", "score": 0.05}],
        "model_version": "internal-v7",
        "request_id": "req-8d1f",
    }
    server = hostile(lambda handler, s: send_json(handler, 200, answer))
    assert client(server.url, tmp_path, top_k=1).labels(b"png") == ["cat"]
    (entry,) = kept(tmp_path)
    text = entry.read_text()
    assert json.loads(text) == {
        "kept": "labels/2",
        "labels": ["cat", "dog"],
        "labels_path": "labels",
        "label_key": "label",
    }
    for extra in ("internal-v7", "req-8d1f", "score", "box", "0.93"):
        assert extra not in text
    assert entry.name == image_digest(spec(server.url), b"png") + ".json"
    # read back (all labels were kept: top_k applies when read), not paid again
    assert client(server.url, tmp_path).labels(b"png") == ["cat", "dog"] and len(server.requests) == 1
    assert client(server.url, tmp_path, top_k=1).labels(b"png") == ["cat"] and len(server.requests) == 1


def test_the_cache_key_is_unchanged_and_an_old_entry_is_still_read(hostile, tmp_path):
    """Earlier versions kept the whole answer under the same digest: an experiment paid for then is
    not paid for again."""
    pinned = EndpointSpec(name="api", url="http://127.0.0.1:1/", rate=1000.0, retries=4, timeout_s=5.0)
    assert image_digest(pinned, b"png-1") == "985b75ddd92835fec0eaf4ae2c530166147fac6f605696a14e613e7ad35dcff2"
    server = hostile(lambda handler, s: send_json(handler, 500, {}))
    old = {"labels": [{"label": "tabby", "score": 0.9}, {"label": "sofa", "score": 0.1}], "model_version": "v1"}
    folder = tmp_path / "endpoint-cache" / "api"
    folder.mkdir(parents=True)
    (folder / f"{image_digest(spec(server.url), b'png')}.json").write_text(json.dumps(old))
    assert client(server.url, tmp_path).labels(b"png") == ["tabby", "sofa"]
    assert client(server.url, tmp_path, top_k=1).labels(b"png") == ["tabby"]
    assert server.requests == []


def _new_entry(**changes) -> bytes:
    entry = {"kept": "labels/2", "labels": ["cat"], "labels_path": "labels", "label_key": "label", **changes}
    return json.dumps(entry).encode()


@pytest.mark.parametrize(
    "data, message",
    [
        (_new_entry(labels=[1, 2]), "labels must be a list of strings"),
        (_new_entry(labels="cat"), "labels must be a list of strings"),
        (_new_entry(labels=[["cat"]]), "labels must be a list of strings"),
        (_new_entry(labels_path="result.tags"), "kept with labels_path='result.tags'"),
        (b"{not json", "not JSON"),
        (b"[" * 100_000, "nested too deeply"),
        (json.dumps({"predictions": []}).encode(), "no 'labels' in it"),  # an old entry of another shape
        (_new_entry(labels=["a" * MAX_CACHE_ENTRY_BYTES]), "more than a kept answer holds"),
    ],
)
def test_a_tampered_cache_entry_is_one_line_naming_its_file(hostile, tmp_path, data, message):
    server = hostile(lambda handler, s: send_json(handler, 200, {"labels": [{"label": "cat"}]}))
    digest = image_digest(spec(server.url), b"png")
    folder = tmp_path / "endpoint-cache" / "api"
    folder.mkdir(parents=True)
    (folder / f"{digest}.json").write_bytes(data)
    with pytest.raises(RaystudyError) as error:
        client(server.url, tmp_path).labels(b"png")
    text = one_line(error)
    assert message in text and f"{digest}.json" in text
    assert server.requests == []  # not silently paid for again
