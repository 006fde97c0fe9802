"""Bad study files and bad flags end in one line: `raystudy validate FILE` and `raystudy plan FILE`
exit 2 with exactly one `raystudy: error:` line on stderr (never a traceback, never a wrong
acceptance), and `raystudy train` / `raystudy serve` refuse a bad number while parsing, before any
work. In-process (raystudy.cli.main) and without Ray: fast enough for a property test over every
shipped study file."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raystudy.cli import main

SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
ERROR = "raystudy: error:"


def cli(*argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `raystudy ARGV` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit:  # argparse
            code = exit.code
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str, pattern: str = "") -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(ERROR), (code, err)
    assert pattern in lines[0], err
    return lines[0]


def accepted_or_one_line(path: Path) -> None:
    """validate and plan: both accept the file, or both refuse it with one error line."""
    for command in ("validate", "plan"):
        code, out, err = cli(command, path)
        if code == 0:
            assert not err.strip() and out, (command, err)
        else:
            one_line_error(code, err)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A copy of search_spaces/: `plan` finds a study's targets file beside it, as in the repository."""
    folder = tmp_path_factory.mktemp("spaces")
    for path in SPACES:
        shutil.copy(path, folder / path.name)
    return folder


def shipped(name: str) -> dict:
    return yaml.safe_load((ROOT / "search_spaces" / name).read_text())


def write(folder: Path, values, name: str = "bad.yaml") -> Path:
    path = folder / name
    if isinstance(values, bytes):
        path.write_bytes(values)
    else:
        path.write_text(values if isinstance(values, str) else yaml.safe_dump(values, sort_keys=False))
    return path


def both_refuse(path: Path, pattern: str) -> None:
    for command in ("validate", "plan"):
        one_line_error(*cli(command, path)[::2], pattern)


# --- the review's findings, one bad file each ----------------------------------------------------------


def changed(name: str, section: str | None, key: str, value) -> dict:
    values = shipped(name)
    (values if section is None else values.setdefault(section, {}))[key] = value
    return values


FINDINGS = [
    (
        "smoke.yaml",
        "train",
        "epochs",
        2.5,
        "epochs=2.5 has the wrong type (float): must be a whole number in [1, 10000]",
    ),
    ("smoke.yaml", None, "targets", "../../../etc", "targets='../../../etc' must be a plain name"),
    ("sam_jr_optuna.yaml", "search", "num_samples", 10**15, "num_samples=1000000000000000 must be a whole number"),
    ("sam_jr_optuna.yaml", "search", "num_samples", 1e15, "num_samples=1000000000000000.0 has the wrong type (float)"),
    ("smoke.yaml", "evaluation", "step_size", "big", "step_size='big' has the wrong type (str)"),
    ("smoke.yaml", "evaluation", "steps", 1e12, "steps=1000000000000.0 has the wrong type (float)"),
    ("smoke.yaml", "evaluation", "steps", 10**12, "steps=1000000000000 must be a whole number in [1, 10000]"),
    ("smoke.yaml", "train", "lr", math.inf, "lr=inf must be a finite number in (0, 1e+12]"),
    ("smoke.yaml", "train", "weight_decay", math.inf, "weight_decay=inf must be a finite number in [0, 10]"),
    ("smoke.yaml", "resources", "cpu", math.nan, "cpu=nan must be a finite number in (0, 1024]"),
    ("smoke.yaml", None, "name", "smo\x00ke", "name='smo\\x00ke' holds the control character '\\x00'"),
    ("smoke.yaml", "train", "image_size", 100_000, "image_size=100000 must be a whole number in [8, 1024]"),
    ("smoke.yaml", None, "seeds", [0, 2**40], "seed=1099511627776 must be a whole number in [0, 4294967295]"),
    ("smoke.yaml", None, "max_failures", True, "max_failures=True has the wrong type (bool)"),
    ("smoke.yaml", None, "description", "x" * 20_000, "description='xxx"),
    ("smoke.yaml", "evaluation", "budgets", [8, 8], "budgets=[8, 8] lists a value twice"),
]


@pytest.mark.parametrize("name, section, key, value, message", FINDINGS, ids=[f[2] for f in FINDINGS])
def test_each_finding_is_one_line_naming_the_file_and_the_key(folder, name, section, key, value, message):
    path = write(folder, changed(name, section, key, value))
    for command in ("validate", "plan"):
        line = one_line_error(*cli(command, path)[::2], message)
        assert line.startswith(f"{ERROR} {path}: ") and len(line) < 400, line


def test_a_trials_grid_too_large_to_plan_is_refused_before_it_is_expanded(folder):
    values = shipped("smoke.yaml")
    values["trials"] = [{"mechanism": "MU", "magnitudes": {"p": [i / 1000 for i in range(1000)]}}] * 2
    values["trials"][1] = {"mechanism": "CM", "magnitudes": {"p": [i / 1000 for i in range(1000)]}}
    values["seeds"] = list(range(10))
    both_refuse(write(folder, values), "over 10000 trials")
    wide = {"mechanism": "SAM&JR", "magnitudes": {"rho": [0.1 + i / 1e4 for i in range(200)]}}
    wide["magnitudes"]["lambda_jr"] = [1e-4 + i / 1e6 for i in range(200)]
    values["trials"] = [wide]
    both_refuse(write(folder, values), "over 10000 combinations")


BILLION_LAUGHS = "name: laughs\nkind: search\nsearch:\n  objective_targets: " + "".join(
    f"\n    - &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]"
    for p, c in zip(["", *"abcdefg"], "abcdefgh")
)


def test_a_billion_laughs_is_refused_at_once(folder):
    path = write(folder, BILLION_LAUGHS)
    assert len(path.read_bytes()) < 600
    start = time.perf_counter()
    both_refuse(path, "over 100000 YAML nodes once its aliases are expanded")
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize(
    "content, message",
    [
        (b"name: caf\xe9\nkind: grid\n", "not UTF-8 text (byte 0xe9 at offset 9)"),
        (b"name: [\n", "not valid YAML"),
        (b"[" * 5000 + b"]" * 5000, "nested more than 32 levels deep"),
        (b"trials: " + b"[" * 40 + b"]" * 40, "nested more than 32 levels deep"),
        (b"a: &a [*a]\n", "an alias refers to a node that contains it"),
        (b"seeds: [" + b"9" * 5000 + b"]\n", "not valid YAML (ValueError"),
        (b"name: x\n1: 2\n", "the key 1 is a int: keys are text"),
        (b"name: x\n---\nname: y\n", "not valid YAML"),
        (b"name: !!python/object:os.system x\n", "not valid YAML"),
        (b"name: !!binary aGVsbG8=\n", "name=b'hello' has the wrong type (bytes)"),
        (b"name: 2024-01-01\n", "name=datetime.date(2024, 1, 1) has the wrong type (date)"),
        (b"- just\n- a list\n", "expected a mapping of keys, found list"),
        (b"", "expected a mapping of keys, found NoneType"),
        (b"name: x\n" + b"#" * 1_000_001, "over 1000000 bytes"),
        (b'name: "a\\u2028b"\n', "holds the control character '\\u2028'"),
    ],
)
def test_a_file_that_is_not_a_study_is_one_line(folder, content, message):
    both_refuse(write(folder, content), message)


def test_a_missing_or_unreadable_file_is_one_line(folder):
    both_refuse(folder / "missing.yaml", "does not exist")
    both_refuse(folder, "does not exist")  # a folder


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"weights": "..pt"}, "the model's name='.' must be a plain name"),
        ({"weights": "~nobody_here/w.pt"}, "is not a usable path"),
        ({"weights": "w\x00.pt"}, "holds the control character"),
        ({"model": "timm/resnet50.tv_in1k", "pretrained": "yes"}, "pretrained='yes' has the wrong type (str)"),
    ],
)
def test_loaded_models_name_a_usable_file(folder, entry, message):
    values = {"name": "q5", "dataset": "imagenet", "targets": "t", "trials": [entry]}
    both_refuse(write(folder, values), message)


def test_search_bounds_and_choices_are_checked(folder):
    for change, message in [
        ({"params": {"rho": {"low": 0.01, "high": math.inf}}}, "high=inf must be a finite number"),
        ({"params": {"rho": {"low": 0.01, "high": 10**400}}}, "must be a finite number"),
        ({"params": {"rho": {"choices": [[0.1]]}}}, "choices=[0.1] has the wrong type (list)"),
        ({"objective_targets": ["../x"]}, "objective_targets='../x' must be a plain name"),
        ({"mechanism": ["SAM", 5]}, "mechanism=5 has the wrong type (int)"),
        (
            {"confirm": {"top_k": 2, "seeds": list(range(100)), "baselines": ["ST", "SAM"]}, "num_samples": 10_000},
            "confirmation runs exceed 10000 trials",
        ),  # fmt: skip
        ({"confirm": {"top_k": 0}}, "top_k must be >= 1"),
        ({"proxy_budget": 10**6}, "proxy_budget=1000000 must be a whole number in [1, 255]"),
    ]:
        values = shipped("sam_jr_optuna.yaml")
        values["search"].update(change)
        both_refuse(write(folder, values), message)


def test_a_searched_epochs_range_plans_and_samples_whole_epochs(folder):
    from raystudy.config import load_space

    values = shipped("sam_jr_optuna.yaml")
    values["search"]["params"]["epochs"] = {"low": 10, "high": 40}
    path = write(folder, values)
    assert cli("plan", path)[0] == 0
    plan = load_space(path).plan_for_sample({"rho": 0.1, "lambda_jr": 1e-3, "epochs": 23.7})  # tune.uniform's
    assert plan.train.epochs == 24
    values["search"]["params"]["epochs"] = {"low": 10.5, "high": 40}
    both_refuse(write(folder, values), "params: epochs: low=10.5 has the wrong type (float): must be a whole number")


def measured_costs(**changes) -> dict:
    row = {"mechanism": "ST", "penalty_gradient": "exact", "preset": "fast", "seconds_per_step": 0.01}
    hook = {"n_eval": 500, "seconds": {"accuracy": 1.0, "pgd": 30.0}, "evaluation": {"budgets": [8]}}
    return {"model": "resnet18", "batch_size": 256, "mechanisms": [row], "hook": hook, **changes}


@pytest.mark.parametrize(
    "costs",
    [
        measured_costs(batch_size=0),
        measured_costs(hook={"n_eval": 0, "seconds": {"pgd": 1.0}}),
        measured_costs(hook={"n_eval": 10, "seconds": {"pgd": "slow"}}),
        measured_costs(
            mechanisms=[{"mechanism": "ST", "penalty_gradient": "exact", "preset": "fast", "seconds_per_step": "nan"}]
        ),
        measured_costs(packing_gain={"ST": {"4": -1}}),
        measured_costs(packing_gain={"ST": {"0": 2.0}}),
    ],
)
def test_a_costs_file_plan_cannot_use_is_one_line(folder, costs):
    path = folder / "costs.json"
    path.write_text(json.dumps(costs))
    spec = write(folder, {**shipped("smoke.yaml"), "trials": [{"mechanism": "ST"}]})
    one_line_error(*cli("plan", spec, "--costs", path)[::2], f"--costs {path}: not a benchmarks/throughput.py JSON")
    one_line_error(*cli("plan", spec, "--costs", folder)[::2], "cannot be read")


def test_plan_refuses_more_gpus_than_it_can_divide_by(folder):
    one_line_error(*cli("plan", folder / "smoke.yaml", "--gpus", "9" * 400)[::2], "give 1 to 100000 GPUs")


def test_every_shipped_file_still_validates_and_plans(folder):
    for path in SPACES:
        # ImageNette's ResNet-50 and Xception need a card of 40 GB or more (their files say so)
        card = ["--gpu-memory", "80GiB"] if path.name.startswith("imagenette") else []
        for command in ("validate", "plan"):
            code, out, err = cli(command, folder / path.name, *(card if command == "plan" else []))
            assert code == 0 and not err, (path.name, err)


# --- the property: any mutation of a shipped file is accepted or refused in one line ------------------

BAD_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 1, 2, 2**31, 2**32, 2**63, 10**15, 2.5, 1e12, 1e15, -0.0, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["", "a\x00b", "\x1b[31m", "line\nbreak", "..", ".", "../../etc", "a/b", "a\\b", "any", "x" * 5000]
    ),
    st.sampled_from(["ST", "SAM&JR", "MU", "resnet18", "tiny_cnn", "cifar10", "synthetic", "pgd", "targeted", "max"]),
)
BAD_VALUES = st.one_of(
    BAD_SCALARS,
    st.lists(BAD_SCALARS, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.booleans()), BAD_SCALARS, max_size=3),
    st.sampled_from([[[[[1]]]], {"a": {"b": {"c": {"d": 1}}}}, [[]], [{}], {"": None}]),
)


def paths(value, prefix=()) -> list[tuple]:
    """Every place in a parsed YAML tree: key or index paths from the root."""
    out = [prefix]
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        out += paths(child, prefix + (key,))
    return out


def mutate(values, data) -> None:
    """One change somewhere in `values`: a key or item dropped, replaced by a bad value, wrapped in a
    list or mapping (or aliased twice), or a bad key or item added."""
    path = data.draw(st.sampled_from(paths(values)))
    if not path:
        return
    parent = values
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    action = data.draw(st.sampled_from(["drop", "replace", "replace", "replace", "wrap", "add"]))
    if action == "drop":
        del parent[key]
    elif action == "replace":
        parent[key] = bad_value(data)
    elif action == "wrap":
        parent[key] = data.draw(st.sampled_from([[parent[key]], {"x": parent[key]}, [parent[key]] * 2]))
    elif isinstance(parent, dict):
        parent[data.draw(st.one_of(st.text(max_size=8), st.integers(), st.none()))] = bad_value(data)
    else:
        parent.append(bad_value(data))


def bad_value(data):
    return copy.deepcopy(data.draw(BAD_VALUES))  # never the strategy's own list, mutated later


# No shipped study names a black-box endpoint: this targets study does (raystudy.config.endpoint).
ENDPOINT_TARGETS = {
    "name": "endpoint_targets",
    "kind": "targets",
    "preset": "faithful",
    "dataset": "synthetic",
    "model": "tiny_cnn",
    "train": {"epochs": 2, "batch_size": 32, "n_train": 64, "n_test": 32, "image_size": 16},
    "trials": [
        {"model": "tiny_cnn"},
        {"endpoint": {"name": "api", "url": "https://labels.example.com/v1", "request": "base64", "top_k": 1,
                      "rate": 5, "budget": 20000, "price_per_1000": 1.0, "auth_env": "RAYSTUDY_TOKEN_API"}},
        {"endpoint": {"name": "rek", "kind": "rekognition", "region": "us-east-1", "min_confidence": 50}},
    ],
}  # fmt: skip
BASES = {path.stem: path.name for path in SPACES} | {"endpoint_targets": ENDPOINT_TARGETS}


def base(name: str) -> dict:
    given = BASES[name]
    return copy.deepcopy(given) if isinstance(given, dict) else shipped(given)


def test_the_endpoint_study_is_valid_as_written(folder):
    path = write(folder, ENDPOINT_TARGETS, "endpoint_targets.yaml")
    for command in ("validate", "plan"):
        assert cli(command, path)[0] == 0


@pytest.mark.parametrize("name", BASES)
@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_mutation_of_a_shipped_file_is_accepted_or_refused_in_one_line(folder, name, data):
    values = base(name)
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(values, data)
    path = write(folder, yaml.safe_dump(values, sort_keys=False), f"mutated_{name}.yaml")
    accepted_or_one_line(path)


# --- train's and serve's flags: refused while parsing, before any work ----------------------------------


class Reached(Exception):
    """The command got past its arguments to the work (training, serving): nothing is run."""


@pytest.fixture
def no_work(monkeypatch):
    import raystudy.cluster.serve
    import raystudy.training.loop

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(raystudy.training.loop, "train", reached)
    monkeypatch.setattr(raystudy.cluster.serve, "serve_model", reached)


def refused_while_parsing(argv: list[str]) -> str:
    code, out, err = cli(*argv)
    assert code == 2 and "usage:" in err and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--image-size", "100000"], "argument --image-size: 100000 must be a whole number in [8, 1024]"),
        (["train", "--epochs", "2.5"], "argument --epochs: '2.5' is not a whole number in [1, 10000]"),
        (["train", "--epochs", "-1"], "argument --epochs: -1 must be a whole number in [1, 10000]"),
        (["train", "--lr", "nan"], "argument --lr: nan must be a finite number in (0, 1e+12]"),
        (["train", "--lr", "inf"], "argument --lr: inf must"),
        (["train", "--weight-decay", "1e400"], "argument --weight-decay: inf must be a finite number"),
        (["train", "--seed", "9" * 30], "argument --seed"),
        (["train", "--seed", "9" * 5000], "argument --seed"),
        (["train", "--batch-size", "0"], "argument --batch-size"),
        (["train", "--n-train", "1e9"], "argument --n-train"),
        (["train", "--lgv-models-per-epoch", "1000"], "argument --lgv-models-per-epoch"),
        (["train", "--model", "a\x1bb"], "argument --model: --model='a\\x1bb' holds the control character"),
        (["serve", "m.pt", "--port", "70000"], "argument --port: 70000 must be a whole number in [1, 65535]"),
        (["serve", "m.pt", "--port", "0"], "argument --port"),
        (["serve", "m.pt", "--port", "-80"], "argument --port"),
        (["serve", "m.pt", "--top-k", "0"], "argument --top-k"),
        (["serve", "m.pt", "--slow", "nan"], "argument --slow: nan must be a finite number in [0, 3600]"),
        (["serve", "m.pt", "--slow", "-1"], "argument --slow"),
        (["serve", "m.pt", "--down-after", "-1"], "argument --down-after"),
        (["serve", "m.pt", "--every-500", "1e3"], "argument --every-500"),
        (["serve", "m.pt", "--burst-429", "99999999999:3"], "argument --burst-429: --burst-429 '99999999999:3'"),
        (["serve", "m.pt", "--burst-429", "3:3"], "LENGTH must be at least 1 and below EVERY"),
        (["train", "--device", "bogus"], "argument --device: 'bogus' is not cpu, cuda or cuda:N"),
        (["train", "--device", "cuda:-1"], "argument --device: 'cuda:-1' is not cpu, cuda or cuda:N"),
        (["evaluate", "--surrogate", "s", "--targets", "t", "--device", "tpu"], "argument --device: 'tpu'"),
        (["serve", "m.pt", "--host", "a b"], "argument --host: 'a b' is not an IP address or a host name"),
        (["serve", "m.pt", "--host", "-x"], "argument --host"),
        (["serve", "m.pt", "--request-log", "/no/such/folder/log"], "argument --request-log: '/no/such/folder/log'"),
    ],
)
def test_bad_flags_are_refused_before_any_work(no_work, tmp_path, argv, message):
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "out")]
    assert message in refused_while_parsing(argv)
    assert not (tmp_path / "out").exists()


TRAIN_NUMBERS = [
    "--epochs", "--batch-size", "--lr", "--momentum", "--weight-decay", "--warmup-epochs", "--seed", "--data-seed",
    "--checkpoint-every", "--n-train", "--n-test", "--image-size", "--snapshots-per-epoch", "--lgv-models-per-epoch",
]  # fmt: skip
SERVE_NUMBERS = ["--port", "--top-k", "--every-500", "--slow", "--down-after", "--burst-429"]
FLAG_VALUES = st.one_of(
    st.integers(min_value=-(10**25), max_value=10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e12", "2.5", "", "x", "0x10", "1_0", " 5", "-0", "1e400", "9" * 5000]),
    st.sampled_from(["0", "1", "3", "8", "16", "100", "1024", "65535", "65536", "0.5", "10:3", "3:10", "a:b", "1:0"]),
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(command=st.sampled_from(["train", "serve"]), data=st.data())
def test_any_number_flag_is_accepted_or_refused_in_one_line(no_work, tmp_path, command, data):
    flags = TRAIN_NUMBERS if command == "train" else SERVE_NUMBERS
    argv = [command] + (["--out", str(tmp_path / "out")] if command == "train" else ["m.pt"])
    for flag in data.draw(st.lists(st.sampled_from(flags), min_size=1, max_size=3, unique=True)):
        argv += [flag, data.draw(FLAG_VALUES)]
    if command == "train" and "--lgv-models-per-epoch" in argv:
        argv += ["--mechanism", "LGV"]  # then --init is missing: a one-line RaystudyError
    try:
        code, out, err = cli(*argv)
    except Reached:  # the flags were accepted: training or serving would start here
        return
    if "usage:" in err:
        refused_while_parsing(argv)
    else:  # a setting fine alone but not with the preset's others (warmup_epochs >= epochs)
        one_line_error(code, err)
    assert not (tmp_path / "out").exists()
