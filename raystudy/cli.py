"""The `raystudy` command. User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

from raystudy.errors import RaystudyError


def _fmt(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


def cmd_mechanisms(args: argparse.Namespace) -> int:
    from raystudy.config.lgv import LGV_BASES, LgvPhase
    from raystudy.mechanisms import MECHANISMS

    rows = [("mechanism", "magnitude", "CIFAR-10 grid", "ImageNette grid", "default (C10 / IN)", "what a step does")]
    for spec in MECHANISMS.values():
        if not spec.params:
            rows.append((spec.name, "-", "-", "-", "-", spec.summary))
        for i, p in enumerate(spec.params):
            default = f"{p.defaults['cifar10']:g} / {p.defaults['imagenette']:g}"
            if spec.tau5:  # augmentations: the headline table's two magnitudes
                default = f"tau1 {default}; tau5 {spec.tau5['cifar10'][p.name]:g} / {spec.tau5['imagenette'][p.name]:g}"
            rows.append(
                (
                    spec.name if i == 0 else "",
                    p.name,
                    _fmt(p.grids["cifar10"]),
                    _fmt(p.grids["imagenette"]),
                    default,
                    spec.summary if i == 0 else "",
                )
            )
    phase = LgvPhase()
    rows.append(
        (
            "LGV",
            "-",
            "-",
            "-",
            "-",
            f"a phase after training, not a mechanism: fine-tune at constant lr {phase.lr:g} "
            f"(batch {phase.batch_size}, {phase.epochs} epochs) with {', '.join(LGV_BASES)}'s update, keeping "
            f"{phase.models_per_epoch} models per epoch as an ensemble",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print(
        "\nMagnitudes are batch-128 magnitudes (METHOD.md): at another batch size B the loss uses IR's lambda "
        "times sqrt(B/128) and JR's lambda times B/128, so a value means what it means in the paper. "
        "The batch size itself still changes smoothness: keep 128 to reproduce the findings."
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raystudy.config import TrainConfig
    from raystudy.core.checkpoint import MODEL_FILE
    from raystudy.mechanisms import get_mechanism, parse_magnitudes
    from raystudy.training.loop import train

    lgv = args.mechanism == "LGV"  # a phase after training, spelled as a mechanism on the command line
    mechanism = args.lgv_base if lgv else args.mechanism or TrainConfig.mechanism
    magnitudes = parse_magnitudes(args.magnitude, get_mechanism(mechanism))
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name in vars(args)}
    config = TrainConfig.from_preset(args.preset, **{**settings, "mechanism": mechanism, "magnitudes": magnitudes})
    if lgv:
        config = _lgv_config(config, args)
    magnitude_text = ", ".join(f"{k}={v:g}" for k, v in config.magnitudes) or "no magnitude"
    print(
        f"training {config.model} on {config.dataset} with {config.mechanism} ({magnitude_text}), "
        f"{config.epochs} epochs, batch {config.batch_size}, seed {config.seed} -> {args.out}",
        flush=True,
    )
    result = train(config, out_dir=args.out, device=args.device, log=lambda line: print(line, flush=True))
    last = result.history[-1] if result.history else {}
    print(f"done: test accuracy {100 * last.get('test_acc', float('nan')):.2f}%; weights in {args.out}/{MODEL_FILE}")
    if result.snapshots:
        print(f"LGV ensemble: {len(result.snapshots)} models in {result.snapshots[0].parent}")
    return 0


def _lgv_config(trained, args: argparse.Namespace):
    from raystudy.training.lgv_ensemble import LgvPhase

    if not args.init_checkpoint:
        raise RaystudyError("LGV fine-tunes a trained surrogate: pass its model file with --init")
    chosen = {
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "models_per_epoch": args.lgv_models_per_epoch,
    }
    phase = LgvPhase(base=trained.mechanism, **{k: v for k, v in chosen.items() if v is not None})
    return phase.train_config(trained, args.init_checkpoint)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from raystudy.metrics import EvalConfig, evaluate_surrogate, make_eval_set
    from raystudy.training.loop import pick_device

    device = pick_device(args.device)
    config = EvalConfig(
        n_eval=args.n_eval or None,
        seed=args.seed,
        budgets=_int_list(args.budgets, "--budgets"),
        attacks=_str_list(args.attacks),
        modes=_str_list(args.modes),
        target_classes=args.target_classes,
        random_start=args.random_start,
        smoothness_samples=args.smoothness_samples,
        batch_size=args.batch_size,
    )
    config.check_installed()
    surrogate, meta = _load_checkpoint(Path(args.surrogate), device)
    target_files = _target_files(args.targets)
    loaded = {name: _load_checkpoint(path, device) for name, path in target_files.items()}
    dataset = _dataset_for(meta, args)
    for name, model_meta in [("the surrogate", meta)] + [(f"target {n!r}", m) for n, (_, m) in loaded.items()]:
        if (model_meta["num_classes"], model_meta["input_size"]) != (dataset.num_classes, dataset.image_size):
            raise RaystudyError(
                f"{name} takes {model_meta['input_size']}px images of {model_meta['num_classes']} classes; "
                f"{dataset.name} has {dataset.image_size}px images of {dataset.num_classes}"
            )
    targets = {name: model for name, (model, _) in loaded.items()}
    eval_set = make_eval_set(dataset.test, dataset.num_classes, config)
    print(
        f"evaluating {args.surrogate} against {', '.join(targets)} on {len(eval_set.labels)} {dataset.name} "
        "test images",
        flush=True,
    )
    metrics = evaluate_surrogate(surrogate, targets, eval_set, config, log=lambda line: print(line, flush=True))
    print(_metrics_table(metrics, list(targets), config))
    if args.out:
        record = {
            "surrogate": str(args.surrogate),
            "targets": {n: str(p) for n, p in target_files.items()},
            "eval_config": config.__dict__,
            "eval_indices": eval_set.indices.tolist(),
            "metrics": metrics,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1, default=list))
        print(f"metrics written to {args.out}")
    return 0


def _load_checkpoint(path, device):
    from pathlib import Path

    from raystudy.core.checkpoint import MODEL_FILE, load_model

    path = Path(path)
    return load_model(path / MODEL_FILE if path.is_dir() else path, device)


def _target_files(spec: str) -> dict:
    """A folder of trained targets (each <name>/model.pt, or <name>.pt) or a comma-separated list."""
    from pathlib import Path

    from raystudy.core.checkpoint import MODEL_FILE

    root = Path(spec)
    if root.is_dir():
        files = sorted(root.glob(f"*/{MODEL_FILE}")) or sorted(root.glob("*.pt"))
        if not files:
            raise RaystudyError(f"{spec!r} holds no targets (<name>/{MODEL_FILE} or <name>.pt)")
    else:
        files = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    named = {(f.parent.name if f.name == MODEL_FILE else f.stem): f for f in files}
    if len(named) != len(files):
        raise RaystudyError(f"two targets share a name in {spec!r}; name them by folder or file")
    return named


def _dataset_for(meta: dict, args: argparse.Namespace):
    """The surrogate's own data (synthetic: regenerated exactly), or --dataset's whole test set."""
    from raystudy.config import TrainConfig
    from raystudy.core.data import dataset_for, load_dataset

    trained = TrainConfig.from_dict(meta["config"])
    name = args.dataset or trained.dataset
    if name == trained.dataset == "synthetic":
        return dataset_for(trained)
    return load_dataset(name, args.data or trained.data_path)


def _metrics_table(metrics: dict, targets: list, config) -> str:
    lines = [
        f"surrogate accuracy {100 * metrics['acc']:.1f}%   smoothness mean {metrics['smoothness/mean']:.4g} "
        f"max {metrics['smoothness/max']:.4g}   similarity mean {metrics['similarity/mean']:.3f}",
        "ASR % (Definition 3)".ljust(28) + "".join(t[:12].rjust(13) for t in targets + ["mean"]),
    ]
    for key in sorted({k.rsplit("/", 1)[0] for k in metrics if k.startswith("asr/")}, key=_attack_order):
        cells = [metrics.get(f"{key}/{t}", float("nan")) for t in targets + ["mean"]]
        lines.append(key[4:].ljust(28) + "".join(f"{100 * v:13.1f}" for v in cells))
    return "\n".join(lines)


def _attack_order(key: str) -> tuple:
    from raystudy.config.evaluation import ATTACKS, MODES

    _, attack, mode, budget = key.split("/")
    known = ATTACKS.index(attack) if attack in ATTACKS else len(ATTACKS)  # torchattack's after raystudy's
    return known, attack, MODES.index(mode), int(budget)


def _int_list(text: str, flag: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise RaystudyError(f"{flag} {text!r}: expected whole numbers like 4,8,16") from None


def _str_list(text: str) -> tuple:
    """Comma-separated names, lower case (torchattack's attack names keep their case: torchattack/BSR)."""
    names = (v.strip() for v in text.split(",") if v.strip())
    return tuple(v if v.lower().startswith("torchattack") else v.lower() for v in names)


def cmd_validate(args: argparse.Namespace) -> int:
    from raystudy.config import load_space

    for path in args.spaces:
        spec = load_space(path)
        spec.evaluation.check_installed()
        n = spec.search.num_samples if spec.search else len(spec.plans)
        print(
            f"{path}: ok ({spec.kind} study {spec.name!r}, {n} trials, preset {spec.preset}, "
            f"{spec.dataset}/{spec.model})"
        )
    return 0


def _local_ray_on_loopback(args: argparse.Namespace) -> None:
    """A local study needs no remote nodes: its Ray on 127.0.0.1 (raystudy.cluster.local_ray), set before
    anything imports ray."""
    if not args.address:
        from raystudy.cluster.local_ray import use_loopback

        use_loopback()


def _study_command(kind: str):
    def command(args: argparse.Namespace) -> int:
        _local_ray_on_loopback(args)
        from raystudy.cluster import phases
        from raystudy.cluster.experiment import RayOptions
        from raystudy.cluster.outcome import all_finished
        from raystudy.cluster.tracking import parse_trackers
        from raystudy.config import read_space
        from raystudy.persist.storage import DEFAULT_STORAGE

        spec, raw = read_space(args.space, args.data)
        if spec.kind != kind:
            verb = {"grid": "run", "targets": "targets", "search": "search"}[spec.kind]
            raise RaystudyError(f"{args.space} is a kind: {spec.kind} study: use `raystudy {verb} {args.space}`")
        _memory_before_a_local_launch(spec, args)
        ray = RayOptions(
            args.address,
            args.num_cpus,
            max_concurrent=args.max_concurrent,
            trackers=parse_trackers(args.log_to),
            targets_file=getattr(args, "targets_file", None),
        )
        results = phases.run(spec, raw, args.storage or DEFAULT_STORAGE, ray, getattr(args, "optuna_storage", None))
        return 0 if all_finished(results) else 1

    return command


def _memory_before_a_local_launch(spec, args: argparse.Namespace) -> None:
    """A local study on this machine's GPU is held against that card before Ray starts, as
    `raystudy plan` does (on a cluster the driver does not know its workers' cards: plan first)."""
    import torch

    if args.address or spec.resources.gpu <= 0 or not torch.cuda.is_available():
        return
    from raystudy.budget import memory

    total = torch.cuda.get_device_properties(0).total_memory
    card = memory.Card(float(total), f"this machine's {torch.cuda.get_device_name(0)}")
    _plan_memory(spec, argparse.Namespace(space=args.space), card)


def cmd_resume(args: argparse.Namespace) -> int:
    _local_ray_on_loopback(args)
    from raystudy.cluster import phases
    from raystudy.cluster.experiment import RayOptions
    from raystudy.cluster.outcome import all_finished

    ray = RayOptions(args.address, args.num_cpus, targets_file=args.targets_file)
    results = phases.resume(args.experiment, ray, args.eval_batch_size)
    return 0 if all_finished(results) else 1


def cmd_query(args: argparse.Namespace) -> int:
    from raystudy.cluster.experiment import Experiment
    from raystudy.cluster.phases import query_endpoints

    experiment = Experiment.read(args.experiment)
    if experiment.spec.kind == "targets":
        raise RaystudyError(f"{args.experiment} is a targets study: query the studies that attack its targets")
    if query_endpoints(experiment, args.targets_file, required=True) is None:
        raise RaystudyError(
            f"the targets of {args.experiment} ({experiment.spec.targets}) name no endpoint: nothing to query"
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from raystudy.cluster.serve import Faults, parse_burst, serve_model

    burst = parse_burst(args.burst_429) if args.burst_429 else None
    faults = Faults(burst, args.every_500, args.slow, args.down_after)
    serve_model(args.model_file, args.port, args.top_k, args.labels_only, faults, args.request_log, args.host)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from analysis.status import study_status

    print(study_status(args.experiment))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from raystudy.budget.costs import quoted_h100, read_costs, render_plan
    from raystudy.config import load_space

    costs = read_costs(args.costs) if args.costs else quoted_h100()
    spec = load_space(args.space)
    card = _plan_card(args)
    memory_text = _plan_memory(spec, args, card)  # a study that cannot fit its share: one line, before anything
    print(render_plan(spec, costs, args.gpus, card))
    print(memory_text)
    endpoints = _study_endpoints(spec, args.space, args.storage)
    if endpoints:
        from raystudy.budget.costs import endpoint_queries, render_endpoint_queries

        print(render_endpoint_queries(endpoint_queries(spec, endpoints)))
    return 0


def _plan_card(args: argparse.Namespace):
    """The GPU the plan is made for: --gpu-memory, else the GPU worker of --cluster / ./cluster.yaml."""
    from raystudy.budget import memory

    if args.gpu_memory:
        return memory.Card(memory.parse_memory(args.gpu_memory), "--gpu-memory")
    cluster = args.cluster or ("cluster.yaml" if Path("cluster.yaml").is_file() else None)
    card = memory.card_from_cluster(cluster) if cluster else None
    if args.cluster and card is None:
        raise RaystudyError(f"--cluster {args.cluster}: no GPU worker of a known instance type; give --gpu-memory")
    return card


def _plan_memory(spec, args: argparse.Namespace, card) -> str:
    """Each setting's planned peak memory against its share of `card`; the targets from
    `<targets>.yaml` beside the study file."""
    from raystudy.budget.costs import render_memory, trial_memories
    from raystudy.config import load_space

    target_plans = None
    beside = Path(args.space).with_name(f"{spec.targets}.yaml") if spec.targets else None
    if beside is not None and beside.is_file():
        target_plans = list(load_space(beside).plans)
    return render_memory(spec, trial_memories(spec, target_plans), card, target_plans is not None)


def _study_endpoints(spec, space: str, storage_path: str | None) -> list:
    """The endpoints among the study's targets: from the targets study saved under --storage, else
    from its study file beside this one (`<targets>.yaml`)."""
    from raystudy.blackbox.query import load_endpoints
    from raystudy.config import load_space
    from raystudy.persist.record import targets_location

    if spec.kind == "targets" or not spec.targets:
        return []
    if storage_path:
        from raystudy.persist import storage

        return load_endpoints(targets_location(storage.normalize(storage_path), spec.targets))
    beside = Path(space).with_name(f"{spec.targets}.yaml")
    return list(load_space(beside).endpoints) if beside.is_file() else []


def cmd_findings(args: argparse.Namespace) -> int:
    import json

    from analysis import load_experiment, tidy_trials
    from analysis.findings import findings, render

    verdicts = findings(tidy_trials([load_experiment(path) for path in args.experiments]))
    print(render(verdicts))
    if args.json:
        Path(args.json).write_text(json.dumps([v.to_dict() for v in verdicts], indent=1, ensure_ascii=False))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from raystudy.cluster.dashboard import serve
    from raystudy.core.data import cache_dir

    try:
        serve(args.source, args.host, args.port, cache_dir() / "dashboard")
    except KeyboardInterrupt:
        pass
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from analysis import analyze

    analyze(args.experiments, args.out, similarity=args.similarity_matrix, matrix_images=args.matrix_images)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _at_least_one(text: str) -> int:
    value = _positive_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _device_flag(text: str) -> str:
    """cpu, cuda or cuda:N (N a device index); whether that device exists is checked where it is used."""
    index = text[len("cuda:") :] if text.startswith("cuda:") else ""
    if text in ("cpu", "cuda") or (index.isascii() and index.isdigit() and int(index) < 1024):
        return text
    raise argparse.ArgumentTypeError(f"{text[:40]!r} is not cpu, cuda or cuda:N")


def _host_flag(text: str) -> str:
    """An IP address or a host name: checked before Ray starts."""
    import ipaddress
    import re

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        if re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,63})*", text):
            return text
    raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an IP address or a host name")


def _log_file_flag(text: str) -> str:
    """A file the server can append to: its folder must exist (checked before Ray starts)."""
    path = Path(text)
    if "\0" in text or not text or path.is_dir() or not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a file in an existing folder")
    return text


MAX_COUNT = 10**9  # of requests or answers: the faults `raystudy serve` injects


def _number_flag(limits) -> Any:
    """An argparse type: a whole or finite number within `limits` (a raystudy.config.train.Range), so
    that a flag out of range ends in usage and one error line before any work starts."""
    from raystudy.config.train import show

    def parse(text: str) -> int | float:
        try:
            value = int(text) if limits.whole else float(text)
        except ValueError:  # also an int of more digits than Python reads
            raise argparse.ArgumentTypeError(f"{show(text)} is not {limits}") from None
        if not limits.holds(value):  # NaN and infinity included
            raise argparse.ArgumentTypeError(f"{show(value)} must be {limits}")
        return value

    return parse


def _text_flag(flag: str, max_length: int) -> Any:
    """An argparse type: text without control characters, at most `max_length` long."""
    from raystudy.config.train import check_text

    def parse(text: str) -> str:
        try:
            return check_text(flag, text, max_length)
        except RaystudyError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _burst_flag(text: str) -> str:
    """--burst-429 EVERY:LENGTH, checked at parse time (cmd_serve reads it with parse_burst)."""
    from raystudy.cluster.serve import parse_burst

    try:
        every, _ = parse_burst(text)
    except RaystudyError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if every > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"--burst-429 {text!r}: EVERY must be at most {MAX_COUNT}")
    return text


def _add_train(sub) -> None:
    from raystudy.config import PRESETS
    from raystudy.config.lgv import LIMITS as LGV_LIMITS

    p = sub.add_parser(
        "train",
        help="train one model (surrogate, target or LGV ensemble)",
        description="Train one model; rerun with the same --out to resume after an interruption.",
    )
    p.add_argument("--preset", default="faithful", choices=sorted(PRESETS), help="recipe preset (default faithful)")
    _add_config_flags(p)
    p.add_argument("--magnitude", help="e.g. 0.5, or rho=0.1,lambda_jr=1e-4 (default: the mechanism's default)")
    p.add_argument("--lgv-base", default="ST", help="with --mechanism LGV: its update, ST, SAM or SAM&JR (default ST)")
    p.add_argument(
        "--lgv-models-per-epoch",
        type=_number_flag(LGV_LIMITS["models_per_epoch"]),
        help="with --mechanism LGV: snapshots per epoch (4)",
    )
    p.add_argument("--device", type=_device_flag, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, model.pt, metrics.json")
    p.set_defaults(func=cmd_train)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, from the field's type, default and metadata: the config is
    the single list of training settings. Unset flags leave the preset's (or the field's) value."""
    from raystudy.config import FAITHFUL, TrainConfig
    from raystudy.config.train import LIMITS, MAX_NAME, MAX_TEXT, PATH_SETTINGS

    from_preset = set(FAITHFUL["cifar10"])
    for f in dataclasses.fields(TrainConfig):
        if "help" not in f.metadata:
            continue  # magnitudes: --magnitude
        kind = str(f.type).split(" | ")[0]
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        default = "the preset's" if f.name in from_preset else f"{f.default}"
        options: dict[str, Any] = {"dest": f.name, "default": None, "help": f"{f.metadata['help']} (default {default})"}
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif kind in ("int", "float"):  # within the setting's LIMITS, as in a study file
            options["type"] = _number_flag(LIMITS[f.name])
        else:
            options["type"] = _text_flag(flag, MAX_TEXT if f.name in PATH_SETTINGS else MAX_NAME)
        if f.metadata["choices"]:
            options["choices"] = f.metadata["choices"]
        p.add_argument(flag, **options)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="smoothness, gradient similarity and transfer ASR of a surrogate",
        description="Run the trial-end hook on a surrogate checkpoint against target checkpoints.",
    )
    p.add_argument("--surrogate", required=True, help="model file (or training folder) of the surrogate")
    p.add_argument("--targets", required=True, help="folder of targets (<name>/model.pt or <name>.pt) or a comma list")
    p.add_argument("--dataset", help="default: the surrogate's training dataset")
    p.add_argument("--data", help="data folder (default: $RAYSTUDY_DATA, or where the surrogate was trained)")
    p.add_argument(
        "--n-eval", type=_positive_int, default=1000, help="evaluation images (0 = whole test set; default 1000)"
    )
    p.add_argument("--budgets", default="4,8,16", help="L-inf budgets in 1/255 (default 4,8,16)")
    p.add_argument("--attacks", default="pgd", help="comma list of pgd, mi, di, dim, autoattack (default pgd)")
    p.add_argument("--modes", default="untargeted,targeted", help="untargeted, targeted or both (default both)")
    p.add_argument(
        "--target-classes",
        default="random",
        choices=("random", "next"),
        help="targeted classes: seeded random != y, or (y+1) mod m as the published code (default random)",
    )
    p.add_argument("--random-start", action="store_true", help="random start for PGD/MI/DI/DIM (off as published)")
    p.add_argument("--smoothness-samples", type=_positive_int, help="images for smoothness (default: all evaluated)")
    p.add_argument("--batch-size", type=_positive_int, default=250)
    p.add_argument("--seed", type=_positive_int, default=0, help="evaluation subset and targeted classes (default 0)")
    p.add_argument("--device", type=_device_flag, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--out", help="write every metric as JSON here")
    p.set_defaults(func=cmd_evaluate)


TARGETS_FILE_HELP = (
    "the targets study file naming the endpoints the query phase may use (default: <targets>.yaml beside "
    "the study file, else the file `raystudy targets` ran): the stored endpoints must match it"
)


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="join this Ray cluster (default: start a local Ray)")
    p.add_argument("--num-cpus", type=_positive_int, help="CPUs of the local Ray (default: all)")


def _add_study(sub) -> None:
    from raystudy.config.evaluation import LIMITS as EVAL_LIMITS

    v = sub.add_parser("validate", help="check search-space files without running them")
    v.add_argument("spaces", nargs="+", help="search_spaces/*.yaml")
    v.set_defaults(func=cmd_validate)
    for name, kind, text in (
        ("targets", "targets", "train a study's target models as Ray trials"),
        ("run", "grid", "run a grid study (its targets must exist)"),
        ("search", "search", "run an Optuna search study"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("space", help="search-space YAML file")
        p.add_argument(
            "--storage",
            help="local folder or URI such as s3://bucket/prefix (default $RAYSTUDY_STORAGE, else ~/raystudy_results)",
        )
        p.add_argument("--data", help="data folder on every node (default: the file's data, else $RAYSTUDY_DATA)")
        p.add_argument(
            "--max-concurrent", type=_positive_int, help="trials running at once (default: as resources allow)"
        )
        p.add_argument(
            "--log-to",
            metavar="TRACKERS",
            help="also log every trial to any of tensorboard, mlflow, wandb (comma-separated; see README)",
        )
        if kind == "search":
            p.add_argument(
                "--optuna-storage",
                help="an Optuna RDB URL (e.g. postgresql://...) for the search's history "
                "(default: sqlite kept with the experiment)",
            )
        if kind != "targets":
            p.add_argument("--targets-file", help=TARGETS_FILE_HELP)
        _add_ray_options(p)
        p.set_defaults(func=_study_command(kind))
    r = sub.add_parser("resume", help="finish an interrupted study without re-running finished trials")
    r.add_argument("experiment", help="<storage>/<study name>")
    r.add_argument("--targets-file", help=TARGETS_FILE_HELP)
    r.add_argument(
        "--eval-batch-size",
        type=_number_flag(EVAL_LIMITS["batch_size"]),
        help="the trial-end hook's batch from now on (its values do not depend on it): for hooks out of memory",
    )
    _add_ray_options(r)
    r.set_defaults(func=cmd_resume)
    c = sub.add_parser("plan", help="what a study will cost (GPU-hours, wall time) before it runs")
    c.add_argument("space", help="search-space YAML file")
    c.add_argument(
        "--costs",
        help="step costs from `benchmarks/throughput.py --json` (default: quoted H100 figures, not measured here)",
    )
    c.add_argument("--gpus", type=_at_least_one, default=1, help="GPUs the study runs on (default 1)")
    c.add_argument("--storage", help="where its targets study was run (for its endpoints' queries and cost)")
    c.add_argument("--gpu-memory", metavar="SIZE", help="the GPU's memory, e.g. 24GiB (default: from --cluster)")
    c.add_argument(
        "--cluster", metavar="FILE", help="cluster file whose GPU worker type names the card (default ./cluster.yaml)"
    )
    c.set_defaults(func=cmd_plan)
    q = sub.add_parser(
        "query", help="send a finished study's kept AEs to its black-box endpoints (answers kept: never paid twice)"
    )
    q.add_argument("experiment", help="<storage>/<study name>")
    q.add_argument("--targets-file", help=TARGETS_FILE_HELP)
    q.set_defaults(func=cmd_query)
    v = sub.add_parser("serve", help="serve a model file over HTTP like an image-labelling service (Ray Serve)")
    v.add_argument("model_file", help="a raystudy model file (a target's .pt, or a run's model.pt)")
    _add_serve_flags(v)
    v.add_argument(
        "--request-log", type=_log_file_flag, metavar="FILE", help="append the SHA-256 of every image answered"
    )
    v.set_defaults(func=cmd_serve)
    s = sub.add_parser("status", help="summarize an experiment's trials: done, running, failed and why")
    s.add_argument("experiment", help="<storage>/<study name>")
    s.set_defaults(func=cmd_status)


def _add_serve_flags(v: argparse.ArgumentParser) -> None:
    """`raystudy serve`'s flags; every number within its range at parse time, before Ray starts."""
    from raystudy.config.train import Range

    v.add_argument("--port", type=_number_flag(Range(1, 65_535)), default=8000, help="TCP port (1-65535)")
    v.add_argument(
        "--host", type=_host_flag, default="127.0.0.1", help="address to listen on (default: this machine only)"
    )
    v.add_argument(
        "--top-k",
        type=_number_flag(Range(1, 1_000)),
        default=5,
        help="labels per answer, by probability (default 5)",
    )
    v.add_argument("--labels-only", action="store_true", help="answer labels without scores")
    v.add_argument(
        "--burst-429",
        type=_burst_flag,
        metavar="EVERY:LENGTH",
        help="inject faults: the first LENGTH of every EVERY requests get 429",
    )
    v.add_argument(
        "--every-500",
        type=_number_flag(Range(0, MAX_COUNT)),
        metavar="N",
        help="inject faults: every N-th request gets 500 (0: none)",
    )
    v.add_argument(
        "--slow",
        type=_number_flag(Range(0, 3_600, whole=False)),
        default=0.0,
        metavar="S",
        help="inject faults: every answer waits S seconds (at most 3600)",
    )
    v.add_argument(
        "--down-after",
        type=_number_flag(Range(0, MAX_COUNT)),
        metavar="N",
        help="inject faults: 503 to everything after N answers",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raystudy", description="Surrogate training for transfer attacks, studied with Ray Tune."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("mechanisms", help="list the training mechanisms, their magnitudes and grids").set_defaults(
        func=cmd_mechanisms
    )
    _add_train(sub)
    _add_evaluate(sub)
    _add_study(sub)
    a = sub.add_parser(
        "analyze", help="tables, figures and a report from finished or partial experiments (no Ray needed)"
    )
    a.add_argument("experiments", nargs="+", help="<storage>/<study name> folders or URIs")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument(
        "--similarity-matrix",
        action="store_true",
        help="also draw the mechanism x mechanism gradient-similarity matrix "
        "(loads every trial's weights; needs the data)",
    )
    a.add_argument(
        "--matrix-images", type=_positive_int, default=256, help="evaluation images for the matrix (default 256)"
    )
    a.set_defaults(func=cmd_analyze)
    f = sub.add_parser("findings", help="verdicts on the paper's findings F1-F7, with the statistic behind each")
    f.add_argument("experiments", nargs="+", help="<storage>/<study name> folders or URIs")
    f.add_argument("--json", help="also write the verdicts and their checks to this JSON file")
    f.set_defaults(func=cmd_findings)
    d = sub.add_parser("dashboard", help="watch a search's Optuna history in optuna-dashboard (running or finished)")
    d.add_argument("source", help="<storage>/<search name> folder or URI, or the search's --optuna-storage URL")
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    d.add_argument("--port", type=_positive_int, default=8080, help="port (default 8080)")
    d.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RaystudyError as err:
        print(f"raystudy: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command in ("run", "search", "targets", "resume"):
            hint = "finish the study with `raystudy resume <storage>/<study name>`"
        else:
            hint = "rerun the same command to resume from the last checkpoint"
        print(f"raystudy: interrupted; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
