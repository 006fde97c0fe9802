"""Black-box endpoint targets on 127.0.0.1: the query phase's ASR equals the white-box hook's for the
same model and images, faults are retried without loss, answers are never paid twice, budgets and
bad answers are one line before or instead of a traceback, and no credential is kept."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from raystudy.blackbox.client import AnswerCache, EndpointClient, EndpointUnreachable, RateLimiter, backoff_seconds
from raystudy.blackbox.query import query_experiment, save_kept_images
from raystudy.cluster.serve import Faults, Labeller, parse_burst
from raystudy.config import EvalConfig
from raystudy.config.endpoint import EndpointSpec, parse_endpoint
from raystudy.core.checkpoint import save_model
from raystudy.core.data import make_synthetic
from raystudy.core.models import build_model
from raystudy.errors import RaystudyError
from raystudy.metrics.hook import KeptImages, make_eval_set, measure_surrogate
from raystudy.persist import storage
from raystudy.persist.record import ENDPOINT_ROWS_FILE, FINAL_FILE, MetricRow

NO_WAIT = lambda seconds: None  # noqa: E731  (backoff and rate waits, in tests that count calls only)


class Server:
    """A local HTTP server in a thread answering with `respond(number, body, headers)`."""

    def __init__(self, respond):
        self.requests: list[tuple[bytes, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((body, dict(self.headers)))
                status, answer, headers = respond(len(outer.requests), body, dict(self.headers))
                data = json.dumps(answer).encode()
                self.send_response(status)
                for k, v in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(respond):
        servers.append(Server(respond))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def spec(url: str, **changes) -> EndpointSpec:
    return EndpointSpec(**{"name": "api", "url": url, "rate": 1000.0, "retries": 4, "timeout_s": 5.0, **changes})


def test_faults_follow_the_request_number_and_bursts_parse():
    faults = Faults(burst_429=(10, 3), every_500=4)
    assert [faults.status(n) for n in range(1, 13)] == [429, 429, 429, 500, None, None, None, 500, None, None, 429, 429]
    assert [Faults(down_after=2).status(n, answered) for n, answered in ((1, 0), (2, 1), (9, 2))] == [None, None, 503]
    assert parse_burst("10:3") == (10, 3)
    with pytest.raises(RaystudyError, match="EVERY:LENGTH"):
        parse_burst("ten")


def test_rate_limiter_spaces_calls_evenly():
    now = [0.0]
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        limiter.wait()
    assert waits == pytest.approx([0.25] * 4) and now[0] == pytest.approx(1.0)


def test_backoff_is_jittered_under_a_growing_ceiling_and_honours_retry_after():
    import random

    rng = random.Random(0)
    draws = [[backoff_seconds(a, None, rng) for _ in range(200)] for a in range(4)]
    for attempt, values in enumerate(draws):
        assert 0 <= min(values) and max(values) <= 0.5 * 2**attempt and len(set(values)) > 150
    assert backoff_seconds(0, 7.0, rng) == 7.0


def test_429_and_500_are_retried_and_the_answer_is_paid_once(server_factory, tmp_path):
    script = {1: 429, 2: 500, 3: 503}
    server = server_factory(lambda n, body, h: (script.get(n, 200), {"labels": [{"label": "cat"}]}, {}))
    client = EndpointClient(spec(server.url), AnswerCache(str(tmp_path), "api"), sleep=NO_WAIT)
    assert client.labels(b"png-1") == ["cat"] and len(server.requests) == 4
    assert client.labels(b"png-1") == ["cat"] and len(server.requests) == 4  # kept: not paid again
    again = EndpointClient(spec(server.url), AnswerCache(str(tmp_path), "api"), sleep=NO_WAIT)
    assert again.labels(b"png-1") == ["cat"] and len(server.requests) == 4  # kept in the experiment


def test_failures_are_one_line_and_nothing_wrong_is_kept(server_factory, tmp_path):
    server = server_factory(lambda n, body, h: (503, {}, {}))
    client = EndpointClient(spec(server.url, retries=2), AnswerCache(str(tmp_path), "api"), sleep=NO_WAIT)
    with pytest.raises(EndpointUnreachable, match=r"'api': HTTP 503 \(after 3 attempt"):
        client.labels(b"x")
    shape = server_factory(lambda n, body, h: (200, {"predictions": []}, {}))
    client = EndpointClient(spec(shape.url), AnswerCache(str(tmp_path), "api"), sleep=NO_WAIT)
    with pytest.raises(RaystudyError, match="no 'labels' in it"):
        client.labels(b"x")
    refused = server_factory(lambda n, body, h: (403, {"error": "forbidden"}, {}))
    client = EndpointClient(spec(refused.url), AnswerCache(str(tmp_path), "api"), sleep=NO_WAIT)
    with pytest.raises(RaystudyError, match="HTTP 403") as err:
        client.labels(b"x")
    assert not isinstance(err.value, EndpointUnreachable) and len(refused.requests) == 1  # not retried
    gone = spec("http://127.0.0.1:9/", retries=1)
    with pytest.raises(EndpointUnreachable, match="unreachable"):
        EndpointClient(gone, AnswerCache(str(tmp_path), "api"), sleep=NO_WAIT).labels(b"x")
    assert storage.list_files(str(tmp_path / "endpoint-cache" / "api")) == []


def test_the_token_comes_from_the_environment_and_is_kept_nowhere(server_factory, tmp_path, monkeypatch):
    server = server_factory(lambda n, body, h: (200, {"labels": ["dog"]}, {}))
    monkeypatch.setenv("API_TOKEN_FOR_TEST", "s3cr3t-t0ken")
    endpoint = spec(server.url, auth_env="API_TOKEN_FOR_TEST", label_key=None, request="base64")
    client = EndpointClient(endpoint, AnswerCache(str(tmp_path), "api"), sleep=NO_WAIT)
    assert client.labels(b"x") == ["dog"]
    body, headers = server.requests[0]
    assert headers["Authorization"] == "Bearer s3cr3t-t0ken" and json.loads(body) == {"image": "eA=="}
    kept = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file()) + json.dumps(endpoint.to_dict())
    assert "s3cr3t" not in kept and "API_TOKEN_FOR_TEST" in json.dumps(endpoint.to_dict())
    monkeypatch.delenv("API_TOKEN_FOR_TEST")
    with pytest.raises(RaystudyError, match="API_TOKEN_FOR_TEST .* is not set"):
        EndpointClient(endpoint, AnswerCache(str(tmp_path), "api"))


def test_endpoint_entries_are_checked_when_the_study_loads(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"tabby": "cat", "pup": ["dog", 5]}))
    parsed = parse_endpoint({"name": "api", "url": "http://x/", "label_map": str(tmp_path / "map.json")}, "t.yaml")
    assert parsed.label_map == (("pup", ("dog", "5")), ("tabby", ("cat",)))
    for bad, message in (
        ({"name": "api", "url": "ftp://x"}, "must be an http"),
        ({"name": "a b", "url": "http://x/"}, "plain name"),
        ({"name": "api", "url": "http://x/", "kind": "gcp"}, "known: http, rekognition"),
        ({"name": "api", "url": "http://x/", "rate": 0}, "rate=0"),
        ({"name": "api", "url": "http://x/", "secret": "k"}, "unknown key"),
        ({"name": "api", "url": "http://x/", "label_map": str(tmp_path / "none.json")}, "cannot be read"),
    ):
        with pytest.raises(RaystudyError, match=message):
            parse_endpoint(bad, "t.yaml")


# ---------------------------------------------------------------------------------------------
# The query phase against the served model


@pytest.fixture(scope="module")
def trained_white_box(tmp_path_factory):
    """A trained target saved as a model file, a surrogate's hook run against it with the images
    kept, and the experiment folder of that one finished trial (built once for the module)."""
    tmp_path = tmp_path_factory.mktemp("white_box")
    torch.manual_seed(0)
    data = make_synthetic(512, 64, num_classes=10, image_size=16, seed=0)
    target = _fit(build_model("tiny_cnn", 10, input_size=16), data, seed=1)
    surrogate = _fit(build_model("tiny_cnn", 10, input_size=16), data, seed=2)
    meta = {
        "model": "tiny_cnn",
        "num_classes": 10,
        "input_size": 16,
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2470, 0.2435, 0.2616],
        "classes": list(data.classes),
    }
    save_model(tmp_path / "target.pt", target, meta)
    config = EvalConfig(n_eval=48, budgets=(4, 16), attacks=("pgd",), steps=5, smoothness_samples=4, batch_size=64)
    eval_set = make_eval_set(data.test, 10, config)
    kept = KeptImages()
    rows = measure_surrogate(surrogate, {"target": target.eval()}, eval_set, config, keep=kept)
    trial = tmp_path / "exp" / "trial_0"
    trial.mkdir(parents=True)
    save_kept_images(str(trial), eval_set, kept, data.classes)
    (trial / FINAL_FILE).write_text("{}")
    return tmp_path, rows


@pytest.fixture
def white_box(trained_white_box, tmp_path):
    """The module's white-box world with an experiment of its own (answers are kept in it)."""
    import shutil

    built, rows = trained_white_box
    shutil.copy(built / "target.pt", tmp_path / "target.pt")
    shutil.copytree(built / "exp", tmp_path / "exp")
    return tmp_path, rows


def _fit(model, data, seed: int, steps: int = 60):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(len(data.train), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(data.train.images[idx].float() / 255), data.train.labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def labeller_server(server_factory, model_file: Path, faults: Faults = Faults(), log: Path | None = None):
    labeller = Labeller(str(model_file), top_k=1, labels_only=True, faults=faults, request_log=log and str(log))
    return server_factory(lambda n, body, h: labeller.answer(body, h.get("Content-Type", "")))


def endpoint_rows(experiment: Path) -> dict[str, float]:
    rows = [MetricRow(**r) for r in json.loads((experiment / "trial_0" / ENDPOINT_ROWS_FILE).read_text())]
    return {r.key: r.value for r in rows}


def test_asr_through_the_endpoint_equals_the_white_box_asr(white_box, server_factory):
    root, rows = white_box
    server = labeller_server(server_factory, root / "target.pt")
    query_experiment(str(root / "exp"), [spec(server.url, name="served", top_k=1)], log=lambda line: None)
    via_endpoint = endpoint_rows(root / "exp")
    white = {r.key: r.value for r in rows}
    for mode in ("untargeted", "targeted"):
        for budget in (4, 16):
            key = f"asr/pgd/{mode}/{budget}"
            assert via_endpoint[f"{key}/served"] == pytest.approx(white[f"{key}/target"], abs=1e-12)
            assert via_endpoint[f"asr_all/pgd/{mode}/{budget}/served"] == pytest.approx(
                white[f"asr_all/pgd/{mode}/{budget}/target"]
            )
    assert via_endpoint["acc/served"] == pytest.approx(white["acc/target"])
    assert via_endpoint["support/served"] == white["support/target"]
    assert 0 < white["asr/pgd/untargeted/16/target"] < 1  # a setting where the comparison means something
    distinct = 48 * (1 + 4)  # clean + 2 modes x 2 budgets, every image distinct
    assert len(server.requests) == distinct


def test_a_burst_of_429s_and_500s_is_absorbed_and_nothing_is_lost(white_box, server_factory, tmp_path):
    root, rows = white_box
    log = tmp_path / "answered.log"
    server = labeller_server(server_factory, root / "target.pt", Faults(burst_429=(10, 3), every_500=7), log)
    query_experiment(str(root / "exp"), [spec(server.url, name="served")], log=lambda line: None, sleep=NO_WAIT)
    answered = log.read_text().split()
    assert len(answered) == len(set(answered)) == 48 * 5 and len(server.requests) > 48 * 5
    white = {r.key: r.value for r in rows}
    assert endpoint_rows(root / "exp")["asr/pgd/untargeted/16/served"] == pytest.approx(
        white["asr/pgd/untargeted/16/target"]
    )


def test_an_interrupted_query_phase_resumes_without_asking_any_image_twice(white_box, server_factory, tmp_path):
    root, _ = white_box
    log = tmp_path / "answered.log"
    labeller = Labeller(str(root / "target.pt"), top_k=1, labels_only=True, faults=Faults(), request_log=str(log))
    down_after = 100

    def respond(n, body, headers):  # the service dies after 100 answers
        return labeller.answer(body, "") if n <= down_after else (503, {}, {})

    server = server_factory(respond)
    endpoint = spec(server.url, name="served", retries=2)
    with pytest.raises(EndpointUnreachable):
        query_experiment(str(root / "exp"), [endpoint], log=lambda line: None, sleep=NO_WAIT)
    assert not (root / "exp" / "trial_0" / ENDPOINT_ROWS_FILE).exists()
    down_after = 10**9  # back up
    query_experiment(str(root / "exp"), [endpoint], log=lambda line: None, sleep=NO_WAIT)
    answered = log.read_text().split()
    assert len(answered) == len(set(answered)) == 48 * 5


def test_a_study_over_budget_is_refused_before_any_query(white_box, server_factory):
    root, _ = white_box
    server = labeller_server(server_factory, root / "target.pt")
    with pytest.raises(RaystudyError, match="needs 240 queries, 240 of them not yet answered.*budget of 200"):
        query_experiment(str(root / "exp"), [spec(server.url, name="served", budget=200)], log=lambda line: None)
    assert server.requests == []
    query_experiment(str(root / "exp"), [spec(server.url, name="served", budget=240)], log=lambda line: None)
    assert len(server.requests) == 240


def test_a_label_map_naming_no_class_of_the_dataset_is_one_line(white_box, server_factory):
    root, _ = white_box
    server = labeller_server(server_factory, root / "target.pt")
    bad = spec(server.url, name="served", label_map=(("kitty", ("no_such_class",)),))
    with pytest.raises(RaystudyError, match="maps 'kitty' to 'no_such_class', not a class of the dataset"):
        query_experiment(str(root / "exp"), [bad], log=lambda line: None)
    assert server.requests == []


def test_returned_labels_map_through_the_label_map_and_top_k():
    from raystudy.blackbox.query import class_sets

    classes = ("cat", "dog", "bird")
    mapped = EndpointSpec(name="a", url="http://x/", label_map=(("Kitten", ("cat",)), ("Pet", ("cat", "dog"))))
    assert class_sets(mapped, ["Kitten", "Sofa"], classes) == {0}
    assert class_sets(mapped, ["Pet"], classes) == {0, 1}
    assert class_sets(EndpointSpec(name="a", url="http://x/"), ["bird", "1", "sofa"], classes) == {2, 1}
    from raystudy.blackbox.client import returned_labels

    top1 = EndpointSpec(name="a", url="http://x/", top_k=1, labels_path="result.tags", label_key="name")
    assert returned_labels(top1, {"result": {"tags": [{"name": "b"}, {"name": "c"}]}}) == ["b"]


def test_plan_counts_the_queries_and_their_cost_and_flags_a_budget_too_small():
    from raystudy.budget.costs import endpoint_queries, render_endpoint_queries
    from raystudy.config import parse_space

    space = {
        "name": "g",
        "dataset": "synthetic",
        "model": "tiny_cnn",
        "seeds": [0, 1],
        "targets": "t",
        "evaluation": {"n_eval": 100, "budgets": [8, 16], "attacks": ["pgd", "dim"]},
        "trials": [{"mechanism": "ST"}, {"mechanism": "SAM"}],
    }
    spec = parse_space(space, "g.yaml")
    endpoints = [
        EndpointSpec(name="paid", url="http://x/", price_per_1000=2.5, budget=3000),
        EndpointSpec(name="free", url="http://x/"),
    ]
    rows = endpoint_queries(spec, endpoints)
    queries = 100 + 4 * 100 * (2 * 2) * 2  # clean once + 4 trials x images x (attacks x modes) x budgets
    assert [(r["endpoint"], r["queries"], r["cost"]) for r in rows] == [
        ("paid", queries, queries / 1000 * 2.5),
        ("free", queries, None),
    ]
    text = render_endpoint_queries(rows)
    assert f"paid: at most {queries} queries (budget 3000); cost 8.25" in text and "OVER BUDGET" in text


def test_rekognition_labels_come_through_boto3_with_its_own_credentials(tmp_path, monkeypatch):
    """AWS DetectLabels on moto's in-process Rekognition: boto3's chain supplies the credentials
    (from the environment here), nothing of them is kept, and its labels map like any endpoint's."""
    from moto import mock_aws

    from raystudy.blackbox.query import class_sets

    # A study on a local S3 server points AWS clients there (raystudy.persist.storage): Rekognition must not follow.
    monkeypatch.setenv("RAYSTUDY_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREKOGNITIONTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rekognition-secret-for-test")
    endpoint = EndpointSpec(
        name="aws", kind="rekognition", region="us-east-1", label_map=(("Mobile Phone", ("phone",)),)
    )
    with mock_aws():
        client = EndpointClient(endpoint, AnswerCache(str(tmp_path), "aws"), sleep=NO_WAIT)
        labels = client.labels(b"\x89PNG fake")
    assert "Mobile Phone" in labels and class_sets(endpoint, labels, ("cat", "phone")) == {1}
    kept = "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    assert "Mobile Phone" in kept and "rekognition-secret" not in kept and "AKIAREKOGNITIONTEST" not in kept
