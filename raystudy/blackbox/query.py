"""Black-box targets: each surrogate's AEs sent to the study's endpoints, after training (no Ray here).

A trial whose targets study names endpoints keeps, beside its final result, the images its hook
showed the white-box targets (`adversarial/clean.npz` and one `<attack>-<mode>-<budget>.npz` per
AE set: 8-bit PNGs, the labels, target classes and the surrogate's clean predictions). The query
phase (`raystudy query`, also run at the end of `raystudy run` and `resume`) sends them to every
endpoint (raystudy.blackbox.client: rate limit, retries, answers kept and never paid twice), maps the
returned labels to the dataset's classes and writes ordinary metric rows (target = the endpoint's
name) into `<trial>/raystudy-endpoint-rows.json`, which the analysis reads with the record.

Success, as Mao et al. count it against labelling services: untargeted, the true class is no
longer among the (mapped) returned labels; targeted, the target class is among them. With an
endpoint that returns its top-1 label only, untargeted success is the top label changing away
from the true class: the white-box definition. `asr` counts the samples the surrogate and the
endpoint both label correctly when clean (Definition 3), `asr_all` every sample.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from raystudy.config.endpoint import EndpointSpec, check_label_map
from raystudy.errors import RaystudyError
from raystudy.persist import storage

if TYPE_CHECKING:
    import torch

from raystudy.persist.record import ADVERSARIAL_DIR, ENDPOINT_ROWS_FILE, FINAL_FILE, MetricRow

CLEAN_SET = "clean"
ENDPOINT_SUFFIX = ".endpoint.json"


# ---------------------------------------------------------------------------------------------
# The images a trial keeps


def encode_pngs(images: "torch.Tensor") -> dict[str, np.ndarray]:
    """uint8 (N, 3, H, W) as concatenated PNG bytes and offsets (the packed layout of the data)."""
    import torchvision.io

    blobs = [torchvision.io.encode_png(image.contiguous()).numpy().tobytes() for image in images]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    return {"png": np.frombuffer(b"".join(blobs), dtype=np.uint8), "offsets": offsets}


def png_list(arrays) -> list[bytes]:
    data, offsets = arrays["png"], arrays["offsets"]
    if (
        offsets.ndim != 1
        or len(offsets) == 0
        or offsets[0] != 0
        or (np.diff(offsets) < 0).any()
        or offsets[-1] != len(data)
    ):
        raise RaystudyError("a kept image set's offsets do not index its PNG bytes")
    return [data[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]


def save_kept_images(trial_location: str, eval_set, kept, class_names: tuple[str, ...]) -> None:
    """The hook's clean and adversarial images (raystudy.metrics.hook.KeptImages) into the trial's folder."""
    folder = storage.join(trial_location, ADVERSARIAL_DIR)
    clean = {
        **encode_pngs(eval_set.images.cpu()),
        "labels": eval_set.labels.cpu().numpy(),
        "target_classes": eval_set.target_classes.cpu().numpy(),
        "surrogate_clean": kept.surrogate_clean.numpy(),
        "indices": np.asarray(eval_set.indices),
        "classes": np.asarray(class_names, dtype=str),
    }
    _write_npz(storage.join(folder, f"{CLEAN_SET}.npz"), clean)
    for (attack, mode, budget), images in kept.adversarial.items():
        _write_npz(storage.join(folder, f"{attack}-{mode}-{budget}.npz"), encode_pngs(images))


def _write_npz(location: str, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(location, buffer.getvalue())


KEPT_SET_KEYS = {"png": np.uint8, "offsets": np.int64}
CLEAN_SET_KEYS = {**KEPT_SET_KEYS, "labels": np.int64, "target_classes": np.int64, "surrogate_clean": np.int64}


KEPT_SET_LIMIT = 256 << 20  # a kept set holds PNG bytes of the evaluation images: a few MiB


def _read_npz(location: str, keys: dict) -> dict[str, np.ndarray]:
    """A kept image set from storage (untrusted): every array named in `keys`, read now, one
    dimension each, of that kind (numbers as integers; classes as text); no pickles."""
    data = storage.read_bytes(location, max_bytes=KEPT_SET_LIMIT)
    if len(data) > KEPT_SET_LIMIT:
        raise RaystudyError(f"{location}: more than {KEPT_SET_LIMIT >> 20} MiB, more than a kept image set holds")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            # A compressed member may inflate far beyond the file: sizes read from the zip's directory first.
            if sum(info.file_size for info in archive.zip.infolist()) > KEPT_SET_LIMIT:
                raise RaystudyError(f"{location}: its arrays hold more than {KEPT_SET_LIMIT >> 20} MiB: not read")
            arrays = {key: archive[key] for key in [*keys, "classes"] if key in keys or key in archive.files}
    except RaystudyError:
        raise
    except Exception as err:  # a zip, an npy or a pickle refused: whatever numpy raises, the file is at fault
        raise RaystudyError(f"{location}: not a kept image set ({type(err).__name__})") from None
    for key, array in arrays.items():
        kind = "U" if key == "classes" else "iu"
        if array.ndim != 1 or array.dtype.kind not in kind:
            raise RaystudyError(f"{location}: its {key} is not a list of {'names' if kind == 'U' else 'integers'}")
    return {key: a if key == "classes" else a.astype(keys[key]) for key, a in arrays.items()}


# ---------------------------------------------------------------------------------------------
# Endpoints of a targets study


def save_endpoints(targets_folder: str, endpoints: tuple[EndpointSpec, ...]) -> None:
    for spec in endpoints:
        storage.write_bytes(
            storage.join(targets_folder, spec.name + ENDPOINT_SUFFIX), json.dumps(spec.to_dict()).encode()
        )


def load_endpoints(targets_folder: str) -> list[EndpointSpec]:
    """The endpoint specs saved in a targets folder, each checked as a study file's endpoint is:
    the bucket is writable by every node of a cluster, so what it holds is not trusted."""
    specs = []
    for file_name in storage.list_files(targets_folder, ENDPOINT_SUFFIX):
        where = storage.join(targets_folder, file_name)
        spec = EndpointSpec.from_dict(storage.read_json(where, limit=1 << 20), where)
        if spec.name + ENDPOINT_SUFFIX != file_name:
            raise RaystudyError(f"{where}: holds endpoint {spec.name!r}, not the one its file name says")
        specs.append(spec)
    return specs


CONFIRMED_KEYS = (
    "kind", "url", "request", "image_field", "labels_path", "label_key", "label_map", "auth_env", "region",
    "min_confidence",
)  # fmt: skip


def confirmed_endpoints(stored: list[EndpointSpec], local: tuple[EndpointSpec, ...], source: str) -> list[EndpointSpec]:
    """The endpoints the query phase may use: those of the targets study file the user runs
    (`source`), each one as stored with the study. Where, how and with which token images are sent
    comes from the user's own file, never from the bucket alone: a planted or changed endpoint is
    refused before anything is sent."""
    mine = {spec.name: spec for spec in local}
    # What decides where images (and a token) go and what the answers mean must match; the rate,
    # budget, retries, timeout and price are the user's to change between runs (theirs are used).
    for spec in stored:
        if spec.name not in mine:
            raise RaystudyError(
                f"endpoint {spec.name!r} is stored with the targets but not named in {source}: nothing was sent "
                "(query only endpoints your own targets study file names)"
            )
        theirs = mine[spec.name].to_dict()
        changed = [k for k, v in spec.to_dict().items() if k in CONFIRMED_KEYS and theirs[k] != v]
        if changed:
            raise RaystudyError(
                f"endpoint {spec.name!r} stored with the targets differs from {source} in {', '.join(changed)}: "
                "nothing was sent (the stored copy was changed, or the file was edited after `raystudy targets`)"
            )
    return [mine[spec.name] for spec in stored]


# ---------------------------------------------------------------------------------------------
# The query phase


@dataclass(frozen=True)
class ImageSet:
    trial: str  # the trial's folder location
    attack: str
    mode: str
    budget: int
    pngs: tuple[bytes, ...]


@dataclass(frozen=True)
class TrialImages:
    location: str
    labels: np.ndarray
    target_classes: np.ndarray
    surrogate_clean: np.ndarray
    classes: tuple[str, ...]  # the dataset's class names, in label order
    clean: tuple[bytes, ...]
    sets: tuple[ImageSet, ...]


def kept_trials(experiment: str) -> list[TrialImages]:
    """Finished trials that kept images, in folder order (one listing of the experiment)."""
    folders: dict[str, set[str]] = {}
    for entry in storage.list_tree(experiment):
        folder, _, rest = entry.path.partition("/")
        folders.setdefault(folder, set()).add(rest)
    out = []
    for folder in sorted(folders):
        names = folders[folder]
        if FINAL_FILE not in names or f"{ADVERSARIAL_DIR}/{CLEAN_SET}.npz" not in names:
            continue
        location = storage.join(experiment, folder)
        clean = _read_npz(storage.join(location, ADVERSARIAL_DIR, f"{CLEAN_SET}.npz"), CLEAN_SET_KEYS)
        sets = []
        for name in sorted(n for n in names if n.startswith(f"{ADVERSARIAL_DIR}/") and n.endswith(".npz")):
            stem = name.rsplit("/", 1)[1][: -len(".npz")]
            if stem == CLEAN_SET:
                continue
            attack, mode, budget = _image_set_name(storage.join(location, name), stem)
            pngs = tuple(png_list(_read_npz(storage.join(location, name), KEPT_SET_KEYS)))
            if len(pngs) != len(clean["labels"]):
                raise RaystudyError(f"{storage.join(location, name)}: not one image per evaluation image")
            sets.append(ImageSet(location, attack, mode, budget, pngs))
        lengths = {len(clean[k]) for k in ("labels", "target_classes", "surrogate_clean")} | {len(clean["offsets"]) - 1}
        if len(lengths) != 1 or "classes" not in clean:
            raise RaystudyError(f"{location}: its kept clean images, labels and classes do not match")
        out.append(
            TrialImages(
                location,
                clean["labels"],
                clean["target_classes"],
                clean["surrogate_clean"],
                tuple(str(c) for c in clean["classes"]),
                tuple(png_list(clean)),
                tuple(sets),
            )
        )
    return out


def _image_set_name(location: str, stem: str) -> tuple[str, str, int]:
    """(attack, mode, budget) of a kept AE set's file name, `<attack>-<mode>-<budget>.npz`."""
    parts = stem.rsplit("-", 2)
    if len(parts) != 3 or parts[1] not in ("untargeted", "targeted") or not (parts[2].isascii() and parts[2].isdigit()):
        raise RaystudyError(f"{location}: not a kept AE set (<attack>-<untargeted|targeted>-<budget>.npz)")
    return parts[0], parts[1], int(parts[2])


def class_sets(spec: EndpointSpec, labels: list[str], class_names: tuple[str, ...]) -> set[int]:
    """The dataset classes a list of returned labels stands for: through the label map, else
    labels that are class names or indices themselves."""
    index = {name: i for i, name in enumerate(class_names)} | {str(i): i for i in range(len(class_names))}
    mapping = dict(spec.label_map) if spec.label_map is not None else None
    out: set[int] = set()
    for label in labels:
        for name in mapping.get(label, ()) if mapping is not None else (label,):
            if name in index:
                out.add(index[name])
    return out


def plan_queries(spec: EndpointSpec, trials: list[TrialImages], paid: set[str]) -> tuple[int, int]:
    """(distinct images the phase shows this endpoint, how many of them are not yet answered)."""
    from raystudy.blackbox.client import image_digest

    digests = {image_digest(spec, png) for t in trials for png in t.clean + tuple(p for s in t.sets for p in s.pngs)}
    return len(digests), len(digests - paid)


def query_experiment(
    experiment: str, endpoints: list[EndpointSpec], log: Callable[[str], None] = print, sleep=None
) -> int:
    """Send every kept image to every endpoint (cached answers first); write each trial's rows.
    Refuses before any query when an endpoint's budget cannot cover what is not yet answered.
    Returns the queries paid for now."""
    import time

    from raystudy.blackbox.client import AnswerCache, EndpointClient

    trials = kept_trials(experiment)
    if not trials or not endpoints:
        return 0
    class_names = trials[0].classes
    clients = []
    for spec in endpoints:
        check_label_map(spec, class_names)
        cache = AnswerCache(experiment, spec.name)
        total, new = plan_queries(spec, trials, cache.present)
        if spec.budget is not None and len(cache.present) + new > spec.budget:
            raise RaystudyError(
                f"endpoint {spec.name!r}: this study needs {total} queries, {new} of them not yet answered; with "
                f"{len(cache.present)} already paid its budget of {spec.budget} would be exceeded: nothing was sent "
                "(raise the endpoint's budget, or lower evaluation n_eval, budgets or attacks)"
            )
        log(f"endpoint {spec.name}: {total} images, {total - new} answered before, {new} to query")
        clients.append(EndpointClient(spec, cache, sleep=sleep or time.sleep))
    paid = 0
    for trial in trials:
        rows = []
        for client in clients:
            rows += _endpoint_rows(client, trial, class_names)
            paid += client.queries
            client.queries = 0
        storage.write_bytes(
            storage.join(trial.location, ENDPOINT_ROWS_FILE), json.dumps([r.to_dict() for r in rows]).encode()
        )
        log(f"  {trial.location.rsplit('/', 1)[-1]}: {len(rows)} endpoint rows")
    return paid


def _endpoint_rows(client, trial: TrialImages, class_names: tuple[str, ...]) -> list[MetricRow]:
    spec = client.spec
    y, goal = trial.labels, trial.target_classes
    clean_classes = [class_sets(spec, client.labels(png), class_names) for png in trial.clean]
    clean_correct = np.array([int(label) in c for label, c in zip(y, clean_classes)])
    both = clean_correct & (trial.surrogate_clean == y)
    rows = [
        MetricRow("acc", float(clean_correct.mean()), target=spec.name),
        MetricRow("support", float(both.sum()), target=spec.name),
    ]
    for image_set in trial.sets:
        answered = [class_sets(spec, client.labels(png), class_names) for png in image_set.pngs]
        if image_set.mode == "targeted":
            success = np.array([int(g) in c for g, c in zip(goal, answered)])
        else:
            success = np.array([int(label) not in c for label, c in zip(y, answered)])
        where = {"attack": image_set.attack, "mode": image_set.mode, "budget": image_set.budget}
        asr = float(success[both].mean()) if both.any() else float("nan")
        rows += [
            MetricRow("asr", asr, target=spec.name, **where),
            MetricRow("asr_all", float(success.mean()), target=spec.name, **where),
        ]
    return rows
