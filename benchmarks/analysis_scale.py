"""Benchmark: `raystudy analyze` on a synthetic experiment of many trials, local and on an object store.

    python benchmarks/analysis_scale.py --trials 10000 --latency-ms 30 --repeat 3 --json results/analysis_scale.json

Writes an experiment of `--trials` finished trials (each with params.json and a result.json whose
final line carries a record of 30 metric rows, as the trainable writes them; a study without
endpoints, as `raystudy run` records it) to a local folder and
to a local S3 server (moto) reached through a loopback proxy that delays every request by
`--latency-ms` (an object store's round trip). Then times `raystudy analyze` (records, tidy table,
tables, figures, findings, report; a new process each time, imports included) twice on each: the
first reads every trial, the second finds the finished ones in its cache (`--repeat` pairs, medians
and every run reported). Prints the seconds and the peak memory (max RSS) of the analyses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raystudy.config import STUDY_MANIFEST, parse_space  # noqa: E402
from raystudy.persist.record import MetricRow, make_record  # noqa: E402

TARGETS = ("resnet50", "vgg16", "inception_v3", "densenet121")


def study(n: int) -> dict:
    return {
        "name": "scale",
        "kind": "grid",
        "preset": "fast",
        "dataset": "cifar10",
        "model": "resnet18",
        "seeds": list(range(n)),
        "targets": "targets",
        "trials": [{"mechanism": "SAM&JR"}],
    }


def trial_files(plan, i: int) -> dict[str, bytes]:
    """params.json and result.json of one finished trial, with made-up metric values."""
    value = (i % 97) / 97
    rows = [MetricRow("acc", 0.9), MetricRow("smoothness", 1 + value, statistic="mean")]
    for target in TARGETS:
        rows.append(MetricRow("similarity", value / 2, target=target))
        for budget in (4, 8, 16):
            for mode in ("untargeted", "targeted"):
                rows.append(MetricRow("asr", value, attack="pgd", mode=mode, budget=budget, target=target))
    identity = {**plan.identity(), "label": "SAM&JR"}
    record = make_record(identity, plan.to_dict(), {"name": "scale", "kind": "grid"}, {"torch": "x"}, rows)
    config = {"plan": plan.to_dict()}  # Ray writes the trial's config into every result row
    epochs = [
        {"epoch": e, "loss": 1.0 / e, "test_acc": 0.5, "final": 0, "trial_id": f"t{i}", "config": config}
        for e in (1, 2, 3)
    ]
    final = {"final": 1, "trial_id": f"t{i}", "record": record, "config": config, **{r.key: r.value for r in rows}}
    lines = "\n".join(json.dumps(line) for line in [*epochs, final]) + "\n"
    return {"params.json": json.dumps({"plan": plan.to_dict()}).encode(), "result.json": lines.encode()}


def experiment_objects(n: int) -> dict[str, bytes]:
    raw = study(n)
    spec = parse_space(raw, "scale.yaml")
    record = {"study": raw, "source": "scale.yaml", "data": None, "endpoints": []}  # as `raystudy run` writes it
    objects = {STUDY_MANIFEST: json.dumps(record).encode()}
    for i, plan in enumerate(spec.plans):
        for name, body in trial_files(plan, i).items():
            objects[f"trial_{i:05d}/{name}"] = body
    return objects


class DelayProxy:
    """A loopback TCP proxy that holds every chunk a client sends for `latency` seconds."""

    def __init__(self, upstream: tuple[str, int], latency: float) -> None:
        self.upstream, self.latency = upstream, latency
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pump(source, sink, delay: float) -> None:
            try:
                while data := await source.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, up_writer, self.latency), pump(up_reader, writer, 0.0))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the S3 server did not start on {host}:{port}")


def timed_analysis(location: str, out: Path, peaks: list[float]) -> float:
    """Wall seconds of `raystudy analyze` in a new process, as a user runs it (imports included);
    its peak memory (max RSS, MB) goes to `peaks`."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "raystudy", "analyze", location, "--out", str(out)])
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"raystudy analyze {location} failed ({status})")
    peaks.append(usage.ru_maxrss / 1024)
    return time.perf_counter() - start


def first_and_second(report: dict, where: str, location: str, work: Path, repeat: int, peaks: list) -> None:
    """`repeat` pairs of analyses, each pair a first (empty cache) and a second (the first's cache):
    the median of each kind goes to report[f"{where}_first_s"] (and _second_s), every run to *_runs_s.
    A busy or noisy machine moves single runs by a second or more."""
    runs: dict[str, list[float]] = {"first": [], "second": []}
    for pair in range(repeat):
        os.environ["RAYSTUDY_CACHE"] = str(work / f"cache_{where}_{pair}")
        for run in ("first", "second"):
            runs[run].append(timed_analysis(location, work / f"{where}_{run}_{pair}", peaks))
            print(f"{where}, {run} analysis: {runs[run][-1]:.1f} s", flush=True)
    for run, seconds in runs.items():
        report[f"{where}_{run}_s"] = statistics.median(seconds)
        report[f"{where}_{run}_runs_s"] = [round(s, 1) for s in seconds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--no-s3", action="store_true", help="local folder only")
    parser.add_argument("--json", help="also write the figures to this JSON file (with the command)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="first and second analyses this many times (each first with an empty cache)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="analysis_scale_"))
    report = {"command": "python " + " ".join(sys.argv), "trials": args.trials, "latency_ms": args.latency_ms}
    objects, peaks = experiment_objects(args.trials), []
    report["bytes"] = sum(len(b) for b in objects.values())
    local = work / "storage" / "scale"
    for key, body in objects.items():
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(body)
    first_and_second(report, "local", str(local), work, args.repeat, peaks)
    if not args.no_s3:
        # The S3 server in its own process: in this one it would compete with the analysis for the GIL.
        host, port = "127.0.0.1", free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(host, port)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
        client.create_bucket(Bucket="bench")
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda kv: client.put_object(Bucket="bench", Key=f"p/scale/{kv[0]}", Body=kv[1]), objects.items()
                )
            )
        proxy = DelayProxy((host, port), args.latency_ms / 1000)
        os.environ["RAYSTUDY_S3_ENDPOINT"] = f"http://127.0.0.1:{proxy.port}"
        first_and_second(report, "s3", "s3://bench/p/scale", work, args.repeat, peaks)
        server.terminate()
        server.wait()
    report["analysis_max_rss_mb"] = max(peaks)
    print(f"peak memory of an analysis (max RSS): {report['analysis_max_rss_mb']:.0f} MB")
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
