"""`raystudy serve MODEL_FILE`: a model behind HTTP with Ray Serve, answering like an image-labelling
service, a reference black-box target for the query phase (raystudy.blackbox.query) and its tests.

POST a PNG (the body, or JSON {"image": <base64>}): the answer is {"labels": [{"label": ..., "score":
...}, ...]}, the top-k classes by probability (names from the model file, else class indices), or
labels only. Faults can be injected for tests: bursts of 429 (with Retry-After: 0), 500s, slow
answers, decided by the request's number so a run is repeatable, and an outage (503 to everything
after N answers: a service gone mid-evaluation, with no answer lost in flight). `--request-log FILE` appends the
SHA-256 of every image the service answered, one per line: what a test counts.

Images come from anyone who can reach the port, so each request is checked before it costs memory or
reaches a decoder, and anything malformed gets a 400 (413: too large) with a one-line JSON {"error": ...}:
- the body is capped by `max_body_bytes(input_size)`, derived from the model's input size: the largest
  honest PNG of size x size 8-bit RGB pixels stored uncompressed, with its chunks, in base64 inside JSON
  (~90 KB for 16 px, ~290 KB for 224 px). A Content-Length over it is refused before the body is read; a
  body without one (chunked) is read as a stream and given up as soon as it passes the cap;
- the PNG's chunks are checked before decoding (`check_png`): not a PNG, a chunk's CRC wrong, not exactly
  the model's size, not 8-bit RGB, or not exactly that many pixels' worth of image data;
- then Pillow decodes it, reporting corrupt data as an exception. torchvision's decode_png is never given
  these bytes: libpng under it crashes the process on a PNG whose image data stops short.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from raystudy.errors import RaystudyError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale+alpha", 6: "RGBA"}


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


class BadRequest(Exception):
    """A request refused for what the client sent: `status` (400 or 413) and a one-line reason."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


def max_body_bytes(size: int) -> int:
    """The largest body an honest client sends for one size x size image (module docstring)."""
    raw = size * (1 + 3 * size)  # 8-bit RGB rows, each after its filter byte
    # zlib's stored blocks add 5 bytes per 64 KiB, IDAT chunks 12 bytes each (8 KiB apiece from libpng):
    # 1/64 covers both; 64 KiB more for the signature, IHDR, IEND and ancillary chunks (text, ICC profile).
    png = raw + raw // 64 + 64 * 1024
    return png * 4 // 3 + 1024  # base64 makes 4 bytes of 3; 1 KiB for the JSON object around it


class Labeller:
    """The service's logic, without Ray Serve (tested directly): image bytes in, labels out."""

    def __init__(self, model_file: str, top_k: int, labels_only: bool, faults: Faults, request_log: str | None):
        from raystudy.core.checkpoint import load_model

        self.model, meta = load_model(Path(model_file))
        self.size = meta["input_size"]
        self.max_body = max_body_bytes(self.size)
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
            if len(body) > self.max_body:
                raise too_large(self.max_body)
            png = png_from_json(body) if "json" in content_type.lower() else body
            check_png(png, self.size)
            image = decode_rgb_png(png, self.size)
        except BadRequest as refused:
            return refused.status, {"error": str(refused)}, {}
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


def too_large(cap: int) -> BadRequest:
    return BadRequest(f"the body is over {cap} bytes, more than one image of this model's size", 413)


async def read_body(request, cap: int) -> bytes:
    """A starlette request's body, at most `cap` bytes: a declared Content-Length over it is refused
    before anything is read, and a body without one (chunked) is given up as soon as it passes it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if length > cap:
            raise too_large(cap)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise too_large(cap)
    return bytes(body)


def png_from_json(body: bytes) -> bytes:
    """The PNG bytes of a JSON body {"image": <base64>}."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the parser's depth
        raise BadRequest("the body is not JSON (the Content-Type says it is)") from None
    if not isinstance(payload, dict):
        raise BadRequest(f'the JSON body is a {type(payload).__name__}, not an object {{"image": <base64 PNG>}}')
    image = payload.get("image")
    if not isinstance(image, str):
        raise BadRequest(f'"image" is {"missing" if image is None else type(image).__name__}, not a base64 string')
    try:
        return base64.b64decode(image, validate=True)
    except ValueError:  # binascii.Error, or characters outside ASCII
        raise BadRequest('"image" is not valid base64') from None


def check_png(png: bytes, size: int) -> None:
    """Refuse what is not a size x size 8-bit RGB PNG holding exactly that many pixels' worth of image
    data, before any decoder sees it: the dimensions are read from the IHDR chunk before anything is
    inflated (a decompression bomb is refused by its header), and image data that stops short (libpng's
    "Not enough image data", which crashes torchvision, and which Pillow fills with zeros) by its length."""
    if not png.startswith(PNG_SIGNATURE):
        raise BadRequest("not a PNG image (no PNG signature)")
    chunks = png_chunks(png)
    kind, ihdr = next(chunks)
    if kind != b"IHDR" or len(ihdr) != 13:
        raise BadRequest("not a PNG image (no IHDR chunk after the signature)")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    if (width, height) != (size, size):
        raise BadRequest(f"images are {size}x{size} pixels, not {width}x{height}")
    if (depth, colour) != (8, 2):
        raise BadRequest(f"images are 8-bit RGB, not {depth}-bit {PNG_COLOUR_TYPES.get(colour, f'type {colour}')}")
    if interlace:  # Adam7 stores the pixels in 7 passes: another length, and no honest client here sends it
        raise BadRequest("interlaced PNGs are not accepted")
    image_data = b"".join(data for kind, data in chunks if kind == b"IDAT")
    expected = size * (1 + 3 * size)  # each row: its filter byte, then RGB
    inflater = zlib.decompressobj()
    try:
        rows = inflater.decompress(image_data, expected + 1)  # never more than one byte too many
    except zlib.error:
        raise BadRequest("not a PNG image (its image data is not a zlib stream)") from None
    if len(rows) != expected or not inflater.eof:
        raise BadRequest(f"the image data is not {size}x{size} RGB pixels (too short, too long, or cut)")


def png_chunks(png: bytes):
    """(type, data) of each chunk after the signature up to IEND, each one's length and CRC checked."""
    offset = len(PNG_SIGNATURE)
    while True:
        length, kind = struct.unpack(">I4s", png[offset : offset + 8].ljust(8, b"\0"))
        end = offset + 12 + length  # length and type, data, CRC
        if end > len(png):
            raise BadRequest("not a PNG image (it ends inside a chunk, or before IEND)")
        if not kind.isalpha():
            raise BadRequest("not a PNG image (a chunk type is not 4 letters)")
        if zlib.crc32(png[offset + 4 : end - 4]) != int.from_bytes(png[end - 4 : end], "big"):
            raise BadRequest(f"not a PNG image (the CRC of its {kind.decode()} chunk is wrong)")
        yield kind, png[offset + 8 : end - 4]
        if kind == b"IEND":
            return
        offset = end


def decode_rgb_png(png: bytes, size: int):
    """uint8 (3, size, size) pixels of a PNG that passed `check_png`. Pillow raises on
    truncated or corrupt data (ImageFile.LOAD_TRUNCATED_IMAGES stays False), where libpng under
    torchvision's decode_png brings the whole process down."""
    import torch
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png), formats=["PNG"]) as image:
            image.load()
            if image.mode != "RGB" or image.size != (size, size):  # Pillow read the header as we did
                raise ValueError(f"decoded as {image.mode} {image.size}")
            pixels = image.tobytes()
    except Exception as err:  # OSError, SyntaxError, zlib.error, ...: whatever Pillow raises is the image's fault
        reason = (str(err).splitlines() or [""])[0][:120]
        raise BadRequest(f"not a decodable PNG image ({type(err).__name__}: {reason})") from None
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1).contiguous()


def serve_model(
    model_file: str,
    port: int,
    top_k: int = 5,
    labels_only: bool = False,
    faults: Faults = Faults(),
    request_log: str | None = None,
    host: str = "127.0.0.1",
) -> None:
    """Deploy on a local Ray (on loopback, raystudy.cluster.local_ray) and answer until interrupted."""
    from raystudy.cluster.local_ray import init_local_ray, use_loopback

    if not 1 <= port <= 65535:  # refused before Ray starts, not by the HTTP proxy after
        raise RaystudyError(f"--port {port}: a TCP port is from 1 to 65535")
    use_loopback()  # before ray is imported, which reads it
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
            try:
                body = await read_body(request, self.labeller.max_body)
            except BadRequest as refused:  # before the request gets a number: no honest client sends it
                return JSONResponse({"error": str(refused)}, status_code=refused.status)
            status, answer, headers = self.labeller.answer(body, request.headers.get("content-type", ""))
            return JSONResponse(answer, status_code=status, headers=headers)

    init_local_ray(include_dashboard=False, log_to_driver=False)
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
