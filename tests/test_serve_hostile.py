"""`raystudy serve` refuses hostile requests with a one-line 400 (413: too large) and keeps answering:
PNGs that crash libpng or inflate to gigabytes, oversized bodies, other colour types, JSON of the wrong
shape. Fast tests call the Labeller directly (no Ray); one slow test sends them all over HTTP to a real
Ray Serve replica, which must answer a good PNG afterwards in the same process, its memory barely grown,
with every port of its local Ray on loopback."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import io
import json
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from raystudy.cluster import serve
from raystudy.cluster.serve import Faults, Labeller, max_body_bytes
from raystudy.core.checkpoint import save_model
from raystudy.core.models import build_model
from raystudy.errors import RaystudyError

SIZE = 16  # the tiny model's input size
CLASSES = ["ant", "bee", "cat", "dog"]
MB = 1024 * 1024
LOOPBACK_ADDRESSES = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, colour: int, image_data: bytes, depth: int = 8) -> bytes:
    """A PNG with a valid signature, IHDR and CRCs around whatever image data (zlib) it is given."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", image_data) + png_chunk(b"IEND", b"")


def truncated_png(size: int = SIZE) -> bytes:
    """~70 bytes: a size x size RGB header, then image data for one row only (libpng's "Not enough image
    data", which crashes torchvision.io.decode_png)."""
    return crafted_png(size, size, 2, zlib.compress(b"\0" * (1 + 3 * size)))


@functools.cache
def zeros_png(size: int, colour: int = 2, channels: int = 3) -> bytes:
    """size x size zeros, compressed row by row (streaming: a 10000 x 10000 bomb never exists inflated)."""
    deflate, row = zlib.compressobj(9), b"\0" * (1 + channels * size)
    return crafted_png(size, size, colour, b"".join(deflate.compress(row) for _ in range(size)) + deflate.flush())


def good_png(seed: int = 0) -> bytes:
    """A random image encoded as raystudy's query phase encodes it (torchvision's encoder, 8-bit RGB)."""
    import torchvision.io

    image = torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return torchvision.io.encode_png(image).numpy().tobytes()


def as_json(png: bytes) -> bytes:
    return json.dumps({"image": base64.b64encode(png).decode()}).encode()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    meta = {
        "model": "tiny_cnn",
        "num_classes": len(CLASSES),
        "input_size": SIZE,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "classes": CLASSES,
    }
    path = tmp_path_factory.mktemp("served") / "tiny.pt"
    save_model(path, build_model("tiny_cnn", len(CLASSES), input_size=SIZE), meta)
    return path


@pytest.fixture(scope="module")
def bomb():
    return zeros_png(10_000)  # 292 KB, 300 MB of pixels


@pytest.fixture
def labeller(model_file):
    return Labeller(str(model_file), top_k=len(CLASSES), labels_only=False, faults=Faults(), request_log=None)


def assert_refused(answer, status: int = 400, match: str = "", name: str = "") -> None:
    code, body, _ = answer
    assert code == status and set(body) == {"error"}, (name, answer)
    assert isinstance(body["error"], str) and "\n" not in body["error"] and match in body["error"], (name, body)


def hostile_requests(bomb: bytes) -> dict[str, tuple[bytes, str, int, str]]:
    """name: (body, Content-Type, status, part of the error) for a 16 x 16 RGB model."""
    rgba, grey = zeros_png(SIZE, colour=6, channels=4), zeros_png(SIZE, colour=0, channels=1)
    pixels = SIZE * (1 + 3 * SIZE)
    return {
        "truncated PNG": (truncated_png(), "image/png", 400, "not 16x16 RGB pixels"),
        "bomb 10000x10000": (bomb, "image/png", 413, "over"),
        "bomb 3000x3000 (under the cap)": (zeros_png(3000), "image/png", 400, "not 3000x3000"),
        "bomb as JSON": (as_json(zeros_png(3000)), "application/json", 400, "not 3000x3000"),
        "too much image data": (crafted_png(SIZE, SIZE, 2, zlib.compress(b"\0" * 2 * pixels)), "image/png", 400, ""),
        "not a zlib stream": (crafted_png(SIZE, SIZE, 2, b"\xff" * 200), "image/png", 400, "zlib"),
        "header CRC wrong": (truncated_png()[:29] + b"\0\0\0\0" + truncated_png()[33:], "image/png", 400, "CRC"),
        "cut inside a chunk": (good_png()[:-20], "image/png", 400, "ends inside a chunk"),
        "RGBA": (rgba, "image/png", 400, "8-bit RGBA"),
        "greyscale": (grey, "image/png", 400, "8-bit greyscale"),
        "16-bit RGB": (crafted_png(SIZE, SIZE, 2, zlib.compress(b"\0" * 2 * pixels), depth=16), "image/png", 400, ""),
        "32x32": (zeros_png(32), "image/png", 400, "images are 16x16 pixels, not 32x32"),
        "empty body": (b"", "image/png", 400, "not a PNG"),
        "text": (b"hello", "text/plain", 400, "not a PNG"),
        "oversized body": (b"\x89PNG\r\n\x1a\n" + bytes(max_body_bytes(SIZE)), "image/png", 413, "over"),
        "non-JSON with a JSON type": (b"hello", "application/json", 400, "not JSON"),
        "not UTF-8 with a JSON type": (b"\xff\xfe{", "application/json", 400, "not JSON"),
        "JSON nested past the parser": (b"[" * 50_000, "application/json", 400, "not JSON"),
        "JSON list": (b"[1, 2]", "application/json", 400, "list"),
        "image missing": (b'{"picture": "x"}', "application/json", 400, "missing"),
        "image a number": (b'{"image": 5}', "application/json", 400, "int"),
        "image not base64": (b'{"image": "not base64!"}', "application/json", 400, "base64"),
        "image base64 of text": (json.dumps({"image": "aGVsbG8="}).encode(), "application/json", 400, "not a PNG"),
    }


def test_every_hostile_request_is_a_one_line_refusal_before_decoding(labeller, bomb, monkeypatch):
    decoded = []
    monkeypatch.setattr(serve, "decode_rgb_png", lambda png, size: decoded.append(png))  # never reached
    for name, (body, content_type, status, match) in hostile_requests(bomb).items():
        assert_refused(labeller.answer(body, content_type), status, match, name)
    assert decoded == [] and labeller.answered == 0


def test_a_good_png_is_answered_as_before_after_hostile_requests(labeller, bomb):
    import torchvision.io

    for body, content_type, status, _ in hostile_requests(bomb).values():
        assert labeller.answer(body, content_type)[0] == status
    for png in (good_png(0), good_png(1)):
        # What the service answered before, when it decoded with torchvision (safe on a valid PNG).
        image = torchvision.io.decode_png(torch.frombuffer(bytearray(png), dtype=torch.uint8))
        assert torch.equal(serve.decode_rgb_png(png, SIZE), image)
        with torch.no_grad():
            before = labeller.model(image[None].float() / 255).softmax(1)[0]
        expected = [{"label": CLASSES[i], "score": float(before[i])} for i in before.argsort(descending=True)]
        for body, content_type in ((png, "image/png"), (as_json(png), "application/json; charset=utf-8")):
            assert labeller.answer(body, content_type) == (200, {"labels": expected}, {})
    assert labeller.answered == 4


def test_pillow_raises_on_truncated_and_corrupt_data_where_torchvision_crashes(model_file):
    """The decoder behind the checks: a truncated PNG is an exception there (and a 400), not a crash."""
    from PIL import ImageFile

    full = good_png()  # cut inside its image data; cut and closed with IEND; zeros over its middle
    for broken in (full[:-100], full[:-40] + full[-12:], full[:60] + b"\0" * (len(full) - 72) + full[-12:]):
        with pytest.raises(serve.BadRequest, match="not a decodable PNG image"):
            serve.decode_rgb_png(broken, SIZE)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    # Pillow does decode image data that ends early but as a complete zlib stream (the rest zeros): that
    # case, the truncated PNG here, is refused by check_png for its length, before any decoder.
    labeller = Labeller(str(model_file), 1, True, Faults(), None)
    assert_refused(labeller.answer(truncated_png(), "image/png"), 400, "not 16x16 RGB pixels")
    # The test's truncated PNG is the reviewer's: torchvision.io.decode_png kills the process with it.
    crash = (
        "import sys, torch, torchvision.io; data = bytearray(sys.stdin.buffer.read()); "
        "torchvision.io.decode_png(torch.frombuffer(data, dtype=torch.uint8))"
    )
    out = subprocess.run([sys.executable, "-c", crash], input=truncated_png(32), capture_output=True, timeout=300)
    if out.returncode >= 0:  # a torchvision that raises instead: still refused, by check_png first
        pytest.skip(f"this torchvision does not crash on a truncated PNG (exit {out.returncode})")


class StreamedRequest:
    """What `read_body` uses of a starlette Request: headers and a body that arrives in chunks."""

    def __init__(self, chunks: list[bytes], content_length: str | None = None):
        self.headers = {} if content_length is None else {"content-length": content_length}
        self.chunks, self.read = chunks, 0

    async def stream(self):
        for chunk in self.chunks:
            self.read += 1
            yield chunk


def test_the_body_is_read_as_a_stream_and_given_up_at_the_cap():
    cap = max_body_bytes(SIZE)
    chunk = bytes(64 * 1024)
    chunked = StreamedRequest([chunk] * 800)  # 50 MB, no Content-Length
    with pytest.raises(serve.BadRequest, match=f"over {cap} bytes") as refused:
        asyncio.run(serve.read_body(chunked, cap))
    assert refused.value.status == 413 and chunked.read == cap // len(chunk) + 1  # not a chunk more
    declared = StreamedRequest([chunk] * 800, content_length=str(800 * len(chunk)))
    with pytest.raises(serve.BadRequest, match="over"):
        asyncio.run(serve.read_body(declared, cap))
    assert declared.read == 0  # refused on its Content-Length alone
    with pytest.raises(serve.BadRequest, match="Content-Length is not a number"):
        asyncio.run(serve.read_body(StreamedRequest([b"x"], content_length="x"), cap))
    png = good_png()
    assert asyncio.run(serve.read_body(StreamedRequest([png[:10], png[10:]]), cap)) == png
    assert asyncio.run(serve.read_body(StreamedRequest([png], content_length=str(len(png))), cap)) == png


def test_the_cap_fits_an_honest_png_stored_uncompressed_in_json_and_not_the_bomb(bomb):
    from PIL import Image

    for size in (16, 224):
        noise = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8).numpy()
        stored = io.BytesIO()
        Image.fromarray(noise).save(stored, format="PNG", compress_level=0)  # the largest an encoder writes
        assert len(as_json(stored.getvalue())) <= max_body_bytes(size)
    assert len(bomb) > max_body_bytes(SIZE)


def test_a_port_out_of_range_is_refused_before_ray_starts(model_file):
    import ray

    for port in (0, 70000):
        with pytest.raises(RaystudyError, match=f"--port {port}: a TCP port is from 1 to 65535"):
            serve.serve_model(str(model_file), port)
    assert not ray.is_initialized()


# --- end to end: a real Ray Serve replica -------------------------------------------------------------


def raw_post(port: int, body_size: int, chunked: bool, deadline_s: float = 120) -> tuple[int, dict]:
    """POST `body_size` zero bytes, sending until the service answers; (status, JSON answer). A raw
    socket, since an HTTP client would insist on sending it all before reading an early answer."""
    head = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {body_size}"
    piece = bytes(64 * 1024)
    data = (b"%x\r\n" % len(piece) + piece + b"\r\n") if chunked else piece
    received, sent = b"", 0
    with socket.create_connection(("127.0.0.1", port), timeout=deadline_s) as s:
        s.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n{head}\r\n\r\n".encode())
        deadline = time.time() + deadline_s
        while time.time() < deadline:
            readable, writable, _ = select.select([s], [s] if sent < body_size else [], [], 1)
            if readable:
                break
            if writable:
                try:
                    s.sendall(data)
                except OSError:  # the service closed its side: its answer is waiting
                    break
                sent += len(piece)
        s.settimeout(30)
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < _length(received):
            more = s.recv(65536)
            if not more:
                break
            received += more
    head_text, _, answer = received.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), json.loads(answer[: _length(received)])


def _length(response: bytes) -> int:
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def descendants(pid: int) -> list[int]:
    """The process ids below `pid` (from /proc): for `raystudy serve`, the Ray it started (GCS, raylet,
    and the raylet's workers: the HTTP proxy, the controller, the replica)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


def replica_pid(service_pid: int, deadline_s: float = 300) -> int:
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        replicas = [pid for pid in descendants(service_pid) if "ServeReplica:raystudy-serve" in command_line(pid)]
        if replicas:
            return replicas[0]
        time.sleep(1)
    raise AssertionError("no Ray Serve replica among the service's processes")


def listening(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process) of every TCP socket the processes `pids` listen on, from `ss -ltnp`."""
    rows = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    found = []
    for row in rows:
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", row)}
        if owners & pids:
            found.append((row.split()[3], command_line(min(owners & pids))[:60]))
    return found


@pytest.mark.slow
def test_hostile_requests_over_http_leave_the_replica_answering(model_file, bomb, tmp_path):
    import requests
    from test_serve import free_port, start_service, stop

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "answered.log"
    service = start_service(model_file, port, log)
    try:
        replica = replica_pid(service.pid)
        rss_before = resident_bytes(replica)
        for name, (body, content_type, status, match) in hostile_requests(bomb).items():
            response = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=120)
            assert response.status_code == status and match in response.json()["error"], (name, response.text)
            assert set(response.json()) == {"error"} and "\n" not in response.text.strip(), (name, response.text)
        for chunked in (False, True):  # 50 MB declared, then 50 MB streamed without a Content-Length
            status, answer = raw_post(port, 50 * MB, chunked)
            assert status == 413 and "over" in answer["error"], (chunked, answer)
        good = good_png()
        response = requests.post(url, data=good, headers={"Content-Type": "image/png"}, timeout=120)
        labeller = Labeller(str(model_file), top_k=1, labels_only=True, faults=Faults(), request_log=None)
        assert (response.status_code, response.json()) == labeller.answer(good, "image/png")[:2]
        assert replica_pid(service.pid) == replica, "the replica was restarted"
        grown = resident_bytes(replica) - rss_before
        assert grown < 100 * MB, f"the replica grew by {grown / MB:.0f} MB"
        assert log.read_text().split() == [hashlib.sha256(good).hexdigest()]

        if shutil.which("ss") is None:
            pytest.skip("no `ss` here to list the sockets the service's Ray listens on")
        sockets = listening({service.pid, *descendants(service.pid)})
        assert len(sockets) >= 5, f"too few listening sockets found to mean anything: {sockets}"
        wide = [(address, owner) for address, owner in sockets if not address.startswith(LOOPBACK_ADDRESSES)]
        # Ray Serve 2.60's replica binds its inter-deployment gRPC server to "[::]:0", hard-coded
        # (ray/serve/_private/replica.py, behind Ray's token check): the one socket not on loopback.
        assert len(wide) <= 1 and all("ServeReplica" in owner for _, owner in wide), wide
    finally:
        stop(service)
