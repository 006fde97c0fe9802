"""What is read from storage is not trusted: planted endpoint specs, pickles and batches, and
secrets in storage URIs are one line each, and nothing is sent, run or kept (README: Trust)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, raystudy_here

from raystudy.blackbox.query import ENDPOINT_SUFFIX, load_endpoints, save_endpoints
from raystudy.config import parse_space
from raystudy.config.endpoint import EndpointSpec, parse_endpoint, token_transport_ok
from raystudy.errors import RaystudyError


class CountingServer:
    """A loopback HTTP service that answers every POST with one label and counts what it got."""

    def __init__(self):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(dict(self.headers))
                body = json.dumps({"labels": [{"label": "cat"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/ok"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def server():
    s = CountingServer()
    yield s
    s.close()


def one_error_line(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("raystudy: error:"), out.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Endpoint specs: the same checks from a study file and from storage


PLANTED = {"url": "http://127.0.0.1:9/ok", "auth_env": "AWS_SECRET_ACCESS_KEY", "name": "../../../../escaped"}


@pytest.mark.parametrize(
    "values, why",
    [
        (PLANTED, "name must be one plain name"),
        ({"name": "..", "url": "https://x.example/"}, "name must be one plain name"),
        ({"name": "a/b", "url": "https://x.example/"}, "name must be one plain name"),
        ({"name": "api", "url": "https://x.example/", "auth_env": "AWS_SECRET_ACCESS_KEY"}, "RAYSTUDY_TOKEN_"),
        ({"name": "api", "url": "https://x.example/", "auth_env": "RAYSTUDY_DATA"}, "RAYSTUDY_TOKEN_"),
        ({"name": "api", "url": "http://x.example/", "auth_env": "RAYSTUDY_TOKEN_API"}, "only over https://"),
        ({"name": "api", "url": "https://u:p@x.example/"}, "user name or password"),
        ({"name": "api", "url": "https://x.example/", "rate": "fast"}, "rate='fast' must be a finite number"),
        ({"name": 5, "url": "https://x.example/"}, "name=5 must be a string"),
        ({"name": "api", "url": "https://x.example/", "rate": float("nan")}, "must be a finite number"),
        ({"name": "api", "url": "https://x.example/", "retries": True}, "must be a whole number"),
        ({"name": "api", "url": "https://x.example/", "timeout_s": 1e9}, "timeout_s in (0, 3600]"),
        ({"name": "api", "url": "https://x.example/", "label_map": {"x": [{"y": 1}]}}, "class names or indices"),
        ({"name": "api\x00", "url": "https://x.example/"}, "must be a string"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
def test_a_bad_endpoint_is_one_line_from_a_study_file_and_from_storage(values, why):
    with pytest.raises(RaystudyError, match=None) as from_storage:
        EndpointSpec.from_dict(values, "stored.endpoint.json")
    assert why in str(from_storage.value) and "\n" not in str(from_storage.value)
    if isinstance(values, dict) and not isinstance(values.get("label_map"), dict):
        with pytest.raises(RaystudyError) as from_file:
            parse_endpoint(values, "targets.yaml")
        assert why in str(from_file.value)


def test_a_token_goes_over_https_or_to_this_machine_only():
    assert token_transport_ok("https://labels.example.com/v1")
    assert token_transport_ok("http://127.0.0.1:8000/") and token_transport_ok("http://localhost/")
    assert token_transport_ok("http://[::1]:8000/")
    assert not token_transport_ok("http://labels.example.com/") and not token_transport_ok("http://127.0.0.1.nip.io/")
    ok = parse_endpoint({"name": "api", "url": "https://x.example/", "auth_env": "RAYSTUDY_TOKEN_API"}, "t.yaml")
    assert EndpointSpec.from_dict(ok.to_dict()) == ok  # what is saved reads back the same


def planted_targets(storage: Path, files: dict[str, bytes]) -> Path:
    folder = storage / "t" / "targets"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    "name, data, why",
    [
        ("escaped.endpoint.json", json.dumps(PLANTED).encode(), "name must be one plain name"),
        ("api.endpoint.json", b"{" * 100_000, "not valid JSON"),
        ("api.endpoint.json", b"\xff\xfe", "not valid JSON"),
        ("api.endpoint.json", json.dumps({"name": "other", "url": "https://x.example/"}).encode(), "file name says"),
        ("api.endpoint.json", b" " * (2 << 20), "more than such a file holds"),
    ],
)
def test_a_planted_endpoint_file_is_one_line_and_nothing_is_sent(tmp_path, server, name, data, why):
    storage = tmp_path / "s"
    planted_targets(storage, {name: data.replace(b"http://127.0.0.1:9/ok", server.url.encode())})
    with pytest.raises(RaystudyError, match=why):
        load_endpoints(str(storage / "t" / "targets"))
    grid = storage / "g"
    grid.mkdir()
    study = {"name": "g", "dataset": "synthetic", "model": "tiny_cnn", "targets": "t", "trials": [{"mechanism": "ST"}]}
    (grid / "raystudy-study.json").write_text(json.dumps({"study": study, "source": "g.yaml", "data": None}))
    line = one_error_line(raystudy_here("query", grid))
    assert why in line and server.requests == []
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.rglob("endpoint-cache"))


def stored_and_local(tmp_path: Path, stored_url: str, local_url: str) -> tuple[str, Path]:
    """A targets study saved with one endpoint, and the user's targets file naming it."""
    storage = tmp_path / "s"
    endpoint = {"name": "api", "url": local_url, "auth_env": "RAYSTUDY_TOKEN_API"}
    targets = {"name": "t", "kind": "targets", "dataset": "synthetic", "trials": [{"endpoint": endpoint}]}
    local = tmp_path / "t.yaml"
    local.write_text(yaml.safe_dump(targets))
    save_endpoints(str(storage / "t" / "targets"), (parse_endpoint({**endpoint, "url": stored_url}, "stored"),))
    return str(storage), local


def test_a_stored_endpoint_changed_from_the_users_file_is_refused_before_anything_is_sent(tmp_path, server):
    from raystudy.cluster.experiment import Experiment
    from raystudy.cluster.phases import query_endpoints

    storage, local = stored_and_local(tmp_path, stored_url=server.url, local_url="https://labels.example.com/")
    study = {"name": "g", "dataset": "synthetic", "model": "tiny_cnn", "targets": "t", "trials": [{"mechanism": "ST"}]}
    spec = parse_space(study, str(tmp_path / "g.yaml"))
    with pytest.raises(RaystudyError, match="differs from .*t.yaml in url: nothing was sent"):
        query_endpoints(Experiment(spec, {}, f"{storage}/g", {}), targets_file=str(local))
    local.rename(tmp_path / "elsewhere.yaml")  # no file of the user's: the bucket alone sends nothing
    with pytest.raises(RaystudyError, match="give it with --targets-file"):
        query_endpoints(Experiment(spec, {}, f"{storage}/g", {}))
    assert server.requests == []


def test_the_users_own_endpoint_is_the_one_queried(tmp_path, server, monkeypatch):
    from raystudy.cluster.experiment import Experiment
    from raystudy.cluster.phases import query_endpoints

    storage, local = stored_and_local(tmp_path, stored_url=server.url, local_url=server.url)
    spec = parse_space({"name": "g", "dataset": "synthetic", "targets": "t", "trials": [{"mechanism": "ST"}]}, "g.yaml")
    monkeypatch.setenv("RAYSTUDY_TOKEN_API", "t0ken")
    assert (
        query_endpoints(Experiment(spec, {}, f"{storage}/g", {}), targets_file=str(local)) == 0
    )  # confirmed (no images kept)
    planted = Path(storage) / "t" / "targets" / f"extra{ENDPOINT_SUFFIX}"
    planted.write_text(json.dumps({"name": "extra", "url": server.url}))
    with pytest.raises(RaystudyError, match="'extra' is stored with the targets but not named in"):
        query_endpoints(Experiment(spec, {}, f"{storage}/g", {}), targets_file=str(local))


# ---------------------------------------------------------------------------------------------
# Pickles from an experiment folder or a data folder are not run


class Payload:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_status_reads_records_and_no_pickle_of_the_experiment(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_analysis_records import VALUES, write_experiment

    folder = write_experiment(tmp_path, VALUES, fail=[("SAM", 1)], skip=[("MU τ=5", 1)])
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(marker))
    (folder / "tuner.pkl").write_bytes(payload)
    (folder / "trial_000" / "error.pkl").write_bytes(payload)
    state = {"trial_data": [[payload.hex(), payload.hex()]], "runner_data": {"_pickled": payload.hex()}}
    (folder / "experiment_state-2026-12-04_00-00-00.json").write_text(json.dumps(state))
    check = (
        "import sys; from raystudy.cli import main; rc = main(['status', sys.argv[1]]); "
        "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", check, str(folder)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "8 trials: 6 done, 1 failed, 1 missing" in out.stdout
    assert "failed: SAM (rho=0.1), seed 1: raystudy.training.loop.TrainingDiverged: training diverged" in out.stdout
    assert "no ray" in out.stdout and not marker.exists()


def cifar_batches(folder: Path, extra: dict | None = None) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 10)]:
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps({**entry, **(extra or {})}, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_cifar_batches_are_read_with_arrays_only_and_a_planted_one_is_refused(tmp_path):
    from raystudy.core.data import _read_cifar_batches

    cifar_batches(tmp_path / "good")
    train, test, classes = _read_cifar_batches(tmp_path / "good")
    assert train.images.shape == (100, 3, 32, 32) and len(test.labels) == 10 and classes[3] == "class3"
    marker = tmp_path / "payload-ran"
    cifar_batches(tmp_path / "planted", extra={b"x": Payload(marker)})
    with pytest.raises(RaystudyError, match="open is not allowed in a CIFAR-10 batch"):
        _read_cifar_batches(tmp_path / "planted")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Secrets in storage URIs, LaTeX from records


@pytest.mark.parametrize("uri", ["s3://AKIAEXAMPLE:s3cr3t@bucket/p", "s3://bucket/p?access_key=A&secret_key=s3cr3t"])
def test_a_storage_uri_holding_credentials_is_one_line_that_does_not_show_them(uri, tmp_path):
    line = one_error_line(raystudy_here("run", ROOT / "search_spaces" / "smoke.yaml", "--storage", uri, cwd=tmp_path))
    assert "give credentials through the environment" in line and "s3cr3t" not in line


def test_latex_output_escapes_what_comes_from_records():
    import pandas as pd

    from analysis.report import render_headline

    columns = pd.MultiIndex.from_tuples([("evil_api}\\input{x", "8/255"), ("mean", "8/255")])
    table = pd.DataFrame([["12.0 ± 1.0 [best]", "3 & 4"]], index=["SAM&JR"], columns=columns)
    tex = render_headline(table, "latex").to_latex(escape=False)
    assert "SAM\\&JR" in tex and "evil\\_api\\}\\textbackslash{}input\\{x" in tex and "3 \\& 4" in tex
    assert "\\textbf{12.0 $\\pm$ 1.0}" in tex and "\\input{x}" not in tex


def test_resume_refuses_a_record_that_does_not_match_its_experiment(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_analysis_records import STUDY, VALUES, write_experiment

    from raystudy.cluster.experiment import Experiment, check_manifest_matches

    folder = write_experiment(tmp_path, VALUES, skip=[("MU τ=5", 1)])
    spec = parse_space(STUDY, "hand.yaml")
    check_manifest_matches(spec, str(folder))  # as written: it matches
    record = json.loads((folder / "raystudy-study.json").read_text())
    record["study"] = {**STUDY, "trials": [{"mechanism": "ST"}, {"mechanism": "SAM"}]}  # MU trials not in it
    (folder / "raystudy-study.json").write_text(json.dumps(record))
    with pytest.raises(RaystudyError, match="does not match the experiment"):
        Experiment.open(str(folder))
    record["study"] = STUDY
    (folder / "raystudy-study.json").write_text(json.dumps(record))
    moved = folder.rename(tmp_path / "other")
    with pytest.raises(RaystudyError, match="its manifest is of study 'hand', not of this experiment"):
        Experiment.open(str(moved))


def test_the_users_rate_and_budget_may_change_but_not_where_images_go(tmp_path, server):
    from raystudy.blackbox.query import confirmed_endpoints

    stored = parse_endpoint({"name": "api", "url": server.url, "budget": 100, "rate": 5}, "stored")
    raised = parse_endpoint({"name": "api", "url": server.url, "budget": 5000, "rate": 2}, "t.yaml")
    assert confirmed_endpoints([stored], (raised,), "t.yaml") == [raised]  # the user's own settings
    moved = parse_endpoint({"name": "api", "url": server.url + "/elsewhere"}, "t.yaml")
    with pytest.raises(RaystudyError, match="differs from t.yaml in url"):
        confirmed_endpoints([stored], (moved,), "t.yaml")


def test_planted_kept_images_are_one_line(tmp_path):
    from raystudy.blackbox.query import kept_trials

    trial = tmp_path / "exp" / "trial_0"
    (trial / "adversarial").mkdir(parents=True)
    from raystudy.persist.record import FINAL_FILE

    (trial / FINAL_FILE).write_text("{}")
    (trial / "adversarial" / "clean.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(RaystudyError, match="not a kept image set"):
        kept_trials(str(tmp_path / "exp"))
    arrays = {"png": np.zeros(4, np.uint8), "offsets": np.array([0, 4]), "labels": np.array([1, 2])}
    arrays |= {"target_classes": np.array([2, 3]), "surrogate_clean": np.array([1, 2]), "classes": np.array(["a"])}
    np.savez(trial / "adversarial" / "clean.npz", **arrays)  # two labels, one image
    with pytest.raises(RaystudyError, match="do not match"):
        kept_trials(str(tmp_path / "exp"))
    np.savez(trial / "adversarial" / "clean.npz", **(arrays | {"labels": np.array([{"x": 1}], dtype=object)}))
    with pytest.raises(RaystudyError, match="not a kept image set"):
        kept_trials(str(tmp_path / "exp"))


def test_a_planted_journal_segment_name_is_not_a_segment(tmp_path):
    from raystudy.persist.optuna_history import fetch_journal, uploaded_bytes

    (tmp_path / "000000000000000.log").write_bytes(b"line\n")
    (tmp_path / "x.log").write_bytes(b"planted\n")
    (tmp_path / "²².log").write_bytes(b"planted\n")
    assert uploaded_bytes(str(tmp_path)) == 5
    assert fetch_journal(str(tmp_path), str(tmp_path / "copy" / "journal.log")) == 5


def test_unreadable_trial_files_are_a_failed_trial_not_a_traceback(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_analysis_records import VALUES, write_experiment

    from analysis.records import load_experiment

    folder = write_experiment(tmp_path, VALUES)
    (folder / "trial_000" / "result.json").write_bytes(b'{"epoch": [1], "config": {"plan": 5}}\n\xff\xfe\n')
    (folder / "trial_001" / "error.txt").write_text("boom\x1b]0;owned\x07")
    trials = {t.location.rsplit("/", 1)[-1]: t for t in load_experiment(str(folder), cache=tmp_path / "c").trials}
    assert trials["trial_000"].status == "incomplete" and trials["trial_000"].plan is None  # read, not a traceback
    (folder / "trial_002" / "result.json").write_text('{"final": 1, "record": 5}\n')
    trials = {t.location.rsplit("/", 1)[-1]: t for t in load_experiment(str(folder), cache=tmp_path / "d").trials}
    assert trials["trial_002"].status == "failed" and "cannot be read as a trial's" in trials["trial_002"].error
    out = subprocess.run([sys.executable, "-m", "raystudy.cli", "status", str(folder)], capture_output=True, text=True)
    assert out.returncode == 0 and "\x1b" not in out.stdout, out.stderr[-2000:]


def test_an_optuna_storage_url_with_a_password_is_refused(tmp_path):
    from raystudy.cluster.experiment import Experiment

    study = {"name": "exp", "kind": "search", "targets": "t", "search": {"mechanism": "SAM", "num_samples": 2}}
    study["search"]["params"] = {"rho": {"low": 0.01, "high": 0.5}}
    url = "postgresql://user:s3cr3t@db.example/optuna"
    with pytest.raises(RaystudyError, match="--optuna-storage .* holds a user name or password") as err:
        Experiment.create(parse_space(study, "exp.yaml"), study, str(tmp_path), local=True, optuna_storage=url)
    assert "s3cr3t" not in str(err.value)


@pytest.mark.parametrize(
    "values, why",
    [
        ({"name": "a", "url": "http://[x/"}, "is not a URL"),
        ({"name": "a", "url": "https://h:99999/"}, "is not a URL"),
        ({"name": "a", "url": "https://"}, "names no host"),
        ({"name": "a", "kind": "rekognition", "region": "evil.com/x"}, "not an AWS region"),
        ({"name": "a", "url": "https://x.example/", "label_map": "/dev/zero"}, "cannot be read"),
        ({"name": "a", "url": "https://x.example/", "label_map": "~nobody-raystudy/l.json"}, "cannot be read"),
    ],
)
def test_a_bad_url_region_or_label_map_is_one_line(values, why):
    with pytest.raises(RaystudyError, match=why):
        parse_endpoint(values, "targets.yaml")


@pytest.mark.parametrize(
    "best, why",
    [
        ([1, 2], "a JSON object"),
        ({"metric": 5, "value": 0.5, "config": {}}, "metric must be a metric name"),
        ({"metric": "m", "value": "high", "config": {}}, "value must be a number"),
        ({"metric": "m", "value": 0.5, "config": []}, "config must be a mapping"),
        ({"metrics": ["a"], "pareto_front": [{"config": {}, "values": [1, 2]}]}, "a front entry's values"),
        ({"metrics": ["a"], "pareto_front": [{"config": "x", "values": [1]}]}, "a front entry's config"),
        ({"metric": "m", "value": 1, "selected_on": "t1"}, "selected_on must be a list of names"),
        ({"confirmed": {"experiment": "e", "seeds": [0], "rows": [{"role": 1}]}}, "a confirmed row's role"),
        (
            {
                "confirmed": {
                    "experiment": "e",
                    "seeds": [0],
                    "rows": [{"role": "t", "label": "x", "objective_metric": "m", "seeds": [0]}],
                }
            },
            "a confirmed row's seeds",
        ),
        (
            {
                "confirmed": {
                    "experiment": "e",
                    "seeds": [0],
                    "rows": [
                        {
                            "role": "top",
                            "label": "x",
                            "objective_metric": "m",
                            "seeds": 1,
                            "objective_mean": "hi",
                        }
                    ],
                }
            },
            "a confirmed row's objective_mean",
        ),
    ],
)
def test_a_planted_best_config_is_one_line(best, why):
    from raystudy.persist.record import checked_best_config

    with pytest.raises(RaystudyError, match=f"best_config.json: not a search's best configuration \\({why}"):
        checked_best_config(best, "s3://b/exp/best_config.json")


def test_a_best_config_as_written_passes_its_check():
    from raystudy.persist.record import checked_best_config

    single = {
        "config": {"trial": {"rho": 0.1}},
        "metric": "m",
        "value": 0.4,
        "selected_on": ["t1"],
        "tested_on": ["t2"],
        "held_out_metric": "h",
        "held_out_value": None,
    }
    front = {
        "metrics": ["a", "b"],
        "modes": ["max", "min"],
        "pareto_front": [{"config": {}, "values": [0.1, 2], "held_out_value": 0.3}],
        "confirmed": {
            "experiment": "e",
            "seeds": [0, 1],
            "rows": [
                {
                    "role": "top",
                    "label": "x",
                    "magnitudes": {"rho": 0.1},
                    "objective_metric": "m",
                    "seeds": 2,
                    "objective_mean": 0.5,
                    "objective_std": None,
                }
            ],
        },
    }
    assert checked_best_config(single, "x") == single and checked_best_config(front, "x") == front


@pytest.mark.parametrize(
    "change, why",
    [
        ({"targets": "t1"}, "its targets must be a list of names"),
        ({"endpoints": [1]}, "its endpoints must be a list of names"),
        ({"eval_indices": [0, -1]}, "its eval_indices must be a list of non-negative whole numbers"),
        ({"eval_target_classes": [0.5]}, "its eval_target_classes must be"),
        ({"study": []}, "not a study manifest"),
    ],
)
def test_a_planted_study_record_is_one_line_in_analyze(tmp_path, change, why):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_analysis_records import VALUES, write_experiment

    from analysis.records import load_experiment

    folder = write_experiment(tmp_path, VALUES)
    record = json.loads((folder / "raystudy-study.json").read_text())
    (folder / "raystudy-study.json").write_text(json.dumps({**record, **change}))
    with pytest.raises(RaystudyError, match=why):
        load_experiment(str(folder), cache=tmp_path / "cache")


@pytest.mark.parametrize(
    "row",
    [
        {"name": 5, "value": 1.0},
        {"name": "asr", "value": "1"},
        {"name": "asr", "value": 1.0, "budget": "8"},
        {"name": "asr", "value": 1.0, "target": ["t"]},
        {"name": "asr", "value": 1.0, "evil": 1},
        "asr",
    ],
)
def test_a_planted_metric_row_makes_a_failed_trial_not_a_broken_table(tmp_path, row):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_analysis_records import VALUES, write_experiment

    from analysis.records import FAILED, load_experiment
    from analysis.tables import tidy_trials

    folder = write_experiment(tmp_path, VALUES)
    result = folder / "trial_000" / "result.json"
    lines = [json.loads(line) for line in result.read_text().splitlines()]
    lines[-1]["record"]["metrics"].append(row)
    result.write_text("\n".join(map(json.dumps, lines)) + "\n")
    experiment = load_experiment(str(folder), cache=tmp_path / "cache")
    planted = [t for t in experiment.trials if t.location.endswith("trial_000")]
    assert planted[0].status == FAILED and "a metric row is not one" in planted[0].error
    assert len(tidy_trials([experiment])) > 0  # the others still make their tables


def test_html_tables_escape_column_labels_from_records():
    import pandas as pd

    from analysis.report import _html_table

    columns = pd.MultiIndex.from_tuples([("<script>x</script>", "8/255"), ("mean", "<b>")])
    page = _html_table(pd.DataFrame([["1", "2"]], index=["<i>ST</i>"], columns=columns))
    assert "<script>" not in page and "&lt;script&gt;" in page and "<i>ST" not in page and "&lt;b&gt;" in page


def test_a_huge_or_inflating_kept_image_set_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import io
    import zipfile

    from raystudy.blackbox import query

    monkeypatch.setattr(query, "KEPT_SET_LIMIT", 1 << 20)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:  # 4 MiB of zeros in a few KiB
        array = io.BytesIO()
        np.save(array, np.zeros(1 << 22, np.uint8))
        archive.writestr("labels.npy", array.getvalue())
    (tmp_path / "set.npz").write_bytes(buffer.getvalue())
    assert (tmp_path / "set.npz").stat().st_size < 1 << 20
    with pytest.raises(RaystudyError, match="its arrays hold more than 1 MiB"):
        query._read_npz(str(tmp_path / "set.npz"), {"labels": np.int64})
    (tmp_path / "big.npz").write_bytes(b"\0" * (2 << 20))
    with pytest.raises(RaystudyError, match="more than 1 MiB, more than a kept image set holds"):
        query._read_npz(str(tmp_path / "big.npz"), {"labels": np.int64})


def test_a_search_history_larger_than_its_cap_is_one_line(tmp_path, monkeypatch):
    from raystudy.persist import optuna_history

    monkeypatch.setattr(optuna_history, "HISTORY_LIMIT", 1000)
    (tmp_path / "segments").mkdir()
    (tmp_path / "segments" / "0.log").write_bytes(b"{}\n" * 400)
    with pytest.raises(RaystudyError, match="more than 0 MiB, more than a search's history holds"):
        optuna_history.fetch_journal(str(tmp_path / "segments"), str(tmp_path / "local.log"))


def test_a_targets_file_the_bucket_points_to_is_read_only_if_only_the_user_can_write_it(tmp_path):
    import os

    from raystudy.cluster.phases import users_endpoints

    targets = tmp_path / "mine"
    targets.mkdir(mode=0o755)
    (targets / "t.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "kind": "targets",
                "dataset": "synthetic",
                "model": "tiny_cnn",
                "trials": [{"model": "tiny_cnn"}],
            }
        )
    )
    spec = parse_space(
        {
            "name": "s",
            "kind": "grid",
            "dataset": "synthetic",
            "model": "tiny_cnn",
            "targets": "t",
            "trials": [{"mechanism": "ST"}],
        },
        str(targets / "s.yaml"),
    )
    assert users_endpoints(spec, str(tmp_path), None)[0] == str(targets / "t.yaml")
    os.chmod(targets, 0o777)  # anyone may plant a file there: the bucket cannot name it
    with pytest.raises(RaystudyError, match="give it with --targets-file"):
        users_endpoints(spec, str(tmp_path), None)
    assert users_endpoints(spec, str(tmp_path), str(targets / "t.yaml"))[0] == str(targets / "t.yaml")


def test_resume_can_measure_at_another_evaluation_batch_and_nothing_else_changes(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from ray import tune
    from test_analysis_records import VALUES, write_experiment

    from raystudy.cluster import experiment as study
    from raystudy.cluster import phases

    folder = write_experiment(tmp_path, VALUES)
    seen = {}
    monkeypatch.setattr(study, "init_ray", lambda *args: None)
    monkeypatch.setattr(study, "_trainable", lambda exp, *args, **kwargs: seen.setdefault("spec", exp.spec))

    class Restored:
        def fit(self):
            return []

    def restore(*args, **kwargs):
        seen["how"] = kwargs
        return Restored()

    monkeypatch.setattr(tune.Tuner, "restore", staticmethod(restore))
    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda *args, **kwargs: True))
    monkeypatch.setattr(phases, "_after_tune", lambda *args: None)
    phases.resume(str(folder), study.RayOptions(), eval_batch_size=16)
    original = parse_space(json.loads((folder / "raystudy-study.json").read_text())["study"], "hand.yaml")
    assert seen["spec"].evaluation.batch_size == 16 and original.evaluation.batch_size == 250
    assert seen["spec"].plans == original.plans and seen["how"]["resume_errored"]  # a failed hook is measured again
