"""`raystudy serve MODEL_FILE`: a model behind HTTP with Ray Serve, answering like an image-labelling
service, a reference black-box target for the query phase (raystudy.query) and its tests.

POST a PNG (the body, or JSON {"image": <base64>}): the answer is {"labels": [{"label": ..., "score":
...}, ...]}, the top-k classes by probability (names from the model file, else class indices), or
labels only. Faults can be injected for tests: bursts of 429 (with Retry-After: 0), 500s, slow
answers, decided by the request's number so a run is repeatable, and an outage (503 to everything
after N answers: a service gone mid-evaluation, with no answer lost in flight). `--request-log FILE` appends the
SHA-256 of every image the service answered, one per line: what a test counts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from raystudy.errors import RaystudyError


@dataclass(frozen=True)
class Faults:
    burst_429: tuple[int, int] | None = None  # (every, length): of every `every` requests the first `length` get 429
    every_500: int | None = None  # every n-th request gets 500
    slow_s: float = 0.0  # every answer waits this long
    down_after: int | None = None  # after this many answers, every request gets 503 (an outage)

    def status(self, number: int, answered: int = 0) -> int | None:
        """The injected status for request `number` (1-based) after `answered` answers, or None to answer it."""
        if self.down_after is not None and answered >= self.down_after:
            return 503
        if self.burst_429 and (number - 1) % self.burst_429[0] < self.burst_429[1]:
            return 429
        if self.every_500 and number % self.every_500 == 0:
            return 500
        return None


class Labeller:
    """The service's logic, without Ray Serve (tested directly): image bytes in, labels out."""

    def __init__(self, model_file: str, top_k: int, labels_only: bool, faults: Faults, request_log: str | None):
        from raystudy.checkpoint import load_model

        self.model, meta = load_model(Path(model_file))
        self.size = meta["input_size"]
        self.classes = [str(c) for c in meta.get("classes") or range(meta["num_classes"])]
        self.top_k, self.labels_only, self.faults = top_k, labels_only, faults
        self.request_log = request_log
        self.requests = 0
        self.answered = 0

    def answer(self, body: bytes, content_type: str) -> tuple[int, dict, dict]:
        """(status, JSON answer, headers)."""
        import torch

        self.requests += 1
        injected = self.faults.status(self.requests, self.answered)
        if injected:
            return injected, {"error": "injected"}, {"Retry-After": "0"} if injected == 429 else {}
        if self.faults.slow_s:
            time.sleep(self.faults.slow_s)
        try:
            png = base64.b64decode(json.loads(body)["image"]) if "json" in content_type else body
            image = _decode(png)
        except (ValueError, KeyError, RuntimeError) as err:
            return 400, {"error": f"not a PNG image ({type(err).__name__})"}, {}
        if tuple(image.shape[-2:]) != (self.size, self.size):
            return 400, {"error": f"images are {self.size}x{self.size} pixels"}, {}
        with torch.no_grad():
            probabilities = self.model(image[None].float() / 255).softmax(1)[0]
        top = probabilities.topk(min(self.top_k, len(self.classes)))
        labels = [
            {"label": self.classes[i]} if self.labels_only else {"label": self.classes[i], "score": float(p)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())
        ]
        if self.request_log:
            with open(self.request_log, "a") as f:
                f.write(hashlib.sha256(png).hexdigest() + "\n")
        self.answered += 1
        return 200, {"labels": labels}, {}


def _decode(png: bytes):
    import torch
    import torchvision.io

    return torchvision.io.decode_png(torch.frombuffer(bytearray(png), dtype=torch.uint8))


def serve_model(
    model_file: str,
    port: int,
    top_k: int = 5,
    labels_only: bool = False,
    faults: Faults = Faults(),
    request_log: str | None = None,
    host: str = "127.0.0.1",
) -> None:
    """Deploy on a local Ray and answer until interrupted."""
    import ray

    try:
        from ray import serve
    except ImportError as err:  # ray[tune] ships ray.serve without its dependencies
        raise RaystudyError(f"raystudy serve needs Ray Serve ({err.name} is missing): pip install 'raystudy[serve]'")
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    if not Path(model_file).is_file():
        raise RaystudyError(f"model file {model_file!r} does not exist")
    Labeller(model_file, top_k, labels_only, Faults(), None)  # a bad file fails here, in one line

    @serve.deployment(num_replicas=1, max_ongoing_requests=1)  # one at a time: requests keep their numbers
    class Service:
        def __init__(self) -> None:
            self.labeller = Labeller(model_file, top_k, labels_only, faults, request_log)

        async def __call__(self, request: Request) -> JSONResponse:
            status, answer, headers = self.labeller.answer(
                await request.body(), request.headers.get("content-type", "")
            )
            return JSONResponse(answer, status_code=status, headers=headers)

    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(Service.bind(), route_prefix="/", name="raystudy-serve")
    print(f"serving {model_file} on http://{host}:{port}/ (POST a PNG); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def parse_burst(text: str) -> tuple[int, int]:
    try:
        every, length = (int(v) for v in text.split(":"))
    except ValueError:
        raise RaystudyError(f"--burst-429 {text!r}: give EVERY:LENGTH, e.g. 10:3") from None
    if not 0 < length < every:
        raise RaystudyError(f"--burst-429 {text!r}: LENGTH must be at least 1 and below EVERY")
    return every, length
