"""One trial, without Ray: from the study, the trial's plan and its data, build the model, train with
the core loop (reporting every epoch, with a checkpoint every `checkpoint_every` epochs), then run
the trial-end hook and report its metrics with the final result, through a `report` callback.

`raystudy.cluster.trainable` is the Ray adapter around `run_one_trial`: it hands over Ray's checkpoint and
reports to Ray; a test calls `run_one_trial` directly with a list as its report. A trial resumes
from a restored checkpoint; one whose training had finished goes straight to the hook; one whose
final result is already kept reports it again.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from raystudy.blackbox.query import load_endpoints, save_kept_images
from raystudy.budget import memory
from raystudy.config import EvalConfig, StudySpec, TrialPlan
from raystudy.config.study import averaged_over_targets
from raystudy.core.checkpoint import MODEL_FILE, load_model, save_model
from raystudy.core.precision import device_for_share, memory_fraction
from raystudy.core.pretrained import load_loaded_model, model_meta
from raystudy.errors import OutOfGpuMemory, RaystudyError
from raystudy.mechanisms import mechanism_label
from raystudy.metrics.hook import KeptImages, make_eval_set, measure_surrogate, quick_transfer_asr
from raystudy.persist import storage
from raystudy.persist.record import FINAL_FILE, flat, make_record, objective_rows, targets_location, training_rows
from raystudy.training import lgv_ensemble as lgv
from raystudy.training.loop import train, versions

FINAL_KEY = "final"  # 1 on the result that carries the hook's metrics
# report(metrics, state_path): every epoch's result with its checkpoint file (or None), then the final one.
Report = Callable[[dict[str, Any], Path | None], None]


@dataclass(frozen=True)
class TrialContext:
    """Where a trial runs: its study, the storage path of the study's experiment and targets, its
    own folder in the experiment (its final result is kept there), a local work folder (a restored
    checkpoint is unpacked into it), and its device."""

    study: StudySpec
    storage_path: str
    folder: str
    work: Path
    device: torch.device
    # Unpacks the trial's latest checkpoint (checkpoint.pt) into `work` for train() to resume from;
    # called only when the trial trains or measures again (not to re-report a kept final result).
    restore: Callable[[Path], None] | None = None
    # What the experiment found once when it was made (its manifest): the model targets' names and
    # whether black-box endpoints want each trial's adversarial images. None: look in storage.
    target_names: tuple[str, ...] | None = None
    keep_images: bool | None = None


def progress_columns(plan: TrialPlan) -> dict[str, Any]:
    """Flat columns every result carries, for Ray's progress table and `raystudy status`."""
    identity = plan.identity()
    return {
        "mechanism": identity["mechanism"],
        "seed": identity["seed"],
        "model": identity["model"],
        "magnitudes": json.dumps(identity["magnitudes"], sort_keys=True),
    }


OUT_OF_MEMORY_FILE = (
    "raystudy-out-of-memory.json"  # a trial's phase that did not fit its share, beside its final result
)


def trial_folder(trial_id: str) -> str:
    """A trial's folder in the experiment (short: Ray's default packs the whole config into it)."""
    return f"trial_{trial_id}"


def run_one_trial(plan: TrialPlan, context: TrialContext, dataset, report: Report) -> None:
    """Train (resuming from the checkpoint in `context.work`), report every epoch, then the trial-end
    metrics and record. The final result is kept in the experiment before it is reported: a trial
    restarted after it finished (its driver died before Ray recorded the end) reports the same
    result again instead of training or measuring anew."""
    study = context.study
    final_location = storage.join(context.folder, FINAL_FILE)
    if storage.exists(final_location):
        print("this trial finished before its driver was lost: reporting its kept final result", flush=True)
        report(json.loads(storage.read_bytes(final_location)), None)
        return
    out_of_memory = storage.join(context.folder, OUT_OF_MEMORY_FILE)
    _refuse_a_known_out_of_memory(out_of_memory, study)
    try:
        _train_and_measure(plan, context, dataset, report)
    except OutOfGpuMemory as err:
        # Ray would retry it max_failures times from the last checkpoint, failing the same way: say
        # so once, for this share and evaluation batch (a resume with another batch tries again).
        settings = {"gpu": study.resources.gpu, "eval_batch_size": study.evaluation.batch_size}
        storage.write_bytes(out_of_memory, json.dumps({"error": str(err), "settings": settings}).encode())
        raise


def _refuse_a_known_out_of_memory(location: str, study: StudySpec) -> None:
    """A trial that ran out of GPU memory with these settings before fails at once, in one line."""
    known = storage.read_json(location, limit=1 << 16, missing_ok=True)
    if not isinstance(known, dict) or not isinstance(known.get("error"), str):
        return
    settings = {"gpu": study.resources.gpu, "eval_batch_size": study.evaluation.batch_size}
    if known.get("settings") == settings:
        raise OutOfGpuMemory(f"{known['error'][:600]} (not tried again with the same settings)")


def _train_and_measure(plan: TrialPlan, context: TrialContext, dataset, report: Report) -> None:
    """Train or load, report every epoch, run the hook at a batch planned for the share, keep the
    final result, then report it."""
    study, storage_path, work, device = context.study, context.storage_path, context.work, context.device
    final_location = storage.join(context.folder, FINAL_FILE)
    columns = progress_columns(plan)
    if context.restore is not None:
        context.restore(work)
    targets = eval_set = kept = None
    target_models: list[str] = []
    if study.kind != "targets":
        # On the CPU while the surrogate trains: on the GPU only for the proxy and the hook.
        targets, target_models = load_targets(
            storage_path, study.targets, work, torch.device("cpu"), context.target_names
        )
        eval_set = make_eval_set(dataset.test, dataset.num_classes, study.evaluation)
        # Black-box targets are queried after training (raystudy.blackbox.query) with the images kept here.
        keep = context.keep_images
        if keep is None:
            keep = bool(load_endpoints(targets_location(storage_path, study.targets)))
        kept = KeptImages() if keep else None
    proxy = _proxy(study, dataset)

    def on_epoch_end(epoch_stats: dict[str, float], state_path: Path | None, model: torch.nn.Module) -> None:
        metrics = {**columns, **epoch_stats, FINAL_KEY: 0}
        if proxy is not None and int(epoch_stats["epoch"]) % study.search.proxy_every == 0:
            budget = study.search.proxy_budget
            with on_device(targets, device), _out_of_memory_is("the ASHA proxy", plan, study, device):
                metrics["proxy/asr"] = quick_transfer_asr(model, targets, proxy, study.evaluation, budget)
        report(metrics, state_path)

    identity = plan.identity()
    if plan.loaded is not None:  # trains nothing: the model as published
        surrogate, provenance = load_loaded_model(plan.loaded, dataset.num_classes, dataset.image_size)
        print(f"loaded {plan.loaded.describe()} (weights sha256 {provenance['weights_sha256'][:12]})", flush=True)
        save_model(work / MODEL_FILE, surrogate, model_meta(surrogate, provenance, dataset.image_size, dataset.classes))
        identity.update(label=plan.loaded.name, weights=provenance)
        rows = []
    else:
        with _out_of_memory_is(f"training at batch {plan.train.batch_size}", plan, study, device):
            result = train(
                plan.train, dataset=dataset, out_dir=work, on_epoch_end=on_epoch_end, device=device, log=print
            )
        rows = training_rows(result.history[-1] if result.history else {})
        surrogate = result.model
        identity["label"] = mechanism_label(
            plan.train.mechanism, dict(plan.train.magnitudes), plan.train.dataset, plan.lgv is not None
        )[0]
    if study.kind == "targets":
        location = storage.join(targets_location(storage_path, study.name), f"{plan.target_name}.pt")
        storage.write_bytes(location, (work / MODEL_FILE).read_bytes())
    else:
        if plan.lgv is not None:  # a restarted trial redoes this short phase from the trained surrogate
            with _out_of_memory_is(f"LGV's fine-tuning at batch {plan.lgv.batch_size}", plan, study, device):
                surrogate = lgv.collect(
                    plan.train, work / MODEL_FILE, dataset, plan.lgv, work / "lgv", device=device, log=print
                )
        evaluation = _hook_evaluation(study, plan, dataset, target_models, device)
        print(
            f"trial-end hook: {len(eval_set.labels)} images at batch {evaluation.batch_size}, "
            f"targets {', '.join(targets)}",
            flush=True,
        )
        share = f"; gpu {study.resources.gpu:g} of {device}" if device.type == "cuda" else ""
        with on_device(targets, device):
            rows += measure_surrogate(surrogate.to(device), targets, eval_set, evaluation, print, kept, share)
        if kept is not None:
            save_kept_images(final_location.rsplit("/", 1)[0], eval_set, kept, dataset.classes)
        if study.search is not None and study.search.objective_targets:
            for metric in filter(averaged_over_targets, study.search.metrics):
                rows += objective_rows(rows, metric, study.search.objective_targets)
    record = make_record(
        identity,
        plan.to_dict(),
        {"name": study.name, "kind": study.kind, "preset": study.preset},
        versions(device, plan.train if plan.loaded is None else None),
        rows,
    )
    final = {**columns, **flat(rows), FINAL_KEY: 1, "record": record}
    if plan.target_name:
        final["target_name"] = plan.target_name
    storage.write_bytes(final_location, json.dumps(final).encode())
    report(final, None)


def share_device(study: StudySpec) -> torch.device:
    """The trial's device, from its resources (raystudy.core.precision), and a stay within its share:
    CPU threads, and GPU memory less the CUDA context's room when the GPU is shared."""
    torch.set_num_threads(max(1, int(study.resources.cpu)))
    device = device_for_share(study.resources.gpu)
    if device.type == "cuda" and study.resources.gpu < 1:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_fraction(study.resources.gpu, total), device)
    return device


@contextmanager
def on_device(models: dict[str, torch.nn.Module], device: torch.device):
    """The models on `device` inside the block, back on the CPU after (their GPU memory freed)."""
    for model in models.values():
        model.to(device)
    try:
        yield
    finally:
        for model in models.values():
            model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def load_targets(
    storage_path: str, targets_study: str, work: Path, device, known: tuple[str, ...] | None = None
) -> tuple[dict[str, torch.nn.Module], list]:
    """Copy the targets from the storage path (any node can reach it) and load them weights-only;
    with their architectures' names. `known`: their names, as the experiment found them (else listed)."""
    location = targets_location(storage_path, targets_study)
    if known is not None:  # the experiment found them (and found targets at all) when it was made
        names = [f"{name}.pt" for name in known]
    else:
        names = storage.list_files(location, ".pt")
    if not names and known is None and not load_endpoints(location):
        raise RaystudyError(f"no targets under {location}")
    local = work / "targets"
    local.mkdir(parents=True, exist_ok=True)
    targets, models = {}, []
    for name in names:
        (local / name).write_bytes(storage.read_bytes(storage.join(location, name)))
        targets[name[: -len(".pt")]], meta = load_model(local / name, device)
        models.append(str(meta.get("model")))
    return targets, models


@contextmanager
def _out_of_memory_is(phase: str, plan: TrialPlan, study: StudySpec, device: torch.device):
    """A CUDA out-of-memory error in `phase` as one line naming it, the model and the share."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise OutOfGpuMemory(
            f"{phase} of {plan.train.model} ran out of GPU memory in its share (gpu {study.resources.gpu:g} of "
            f"{device}): `raystudy plan` estimates what each setting needs; raise resources.gpu"
        ) from None


def _hook_evaluation(study: StudySpec, plan: TrialPlan, dataset, target_models: list[str], device) -> EvalConfig:
    """The evaluation settings with the hook's batch planned to fit this trial's share of this card
    (raystudy.budget.memory; it still halves on an out-of-memory error); on the CPU, the study's."""
    if device.type != "cuda":
        return study.evaluation
    total = torch.cuda.get_device_properties(device).total_memory
    cap = memory.share_bytes(min(1.0, study.resources.gpu), total)
    pixels = dataset.image_size
    architecture = plan.loaded.architecture if plan.loaded else plan.train.model
    planned = memory.trial_memory(
        "",
        memory.model_bytes(architecture or "", pixels),
        [memory.model_bytes(m, pixels) for m in target_models],
        pixels=pixels,
        train_batch=plan.train.batch_size,
        train_images=0,
        eval_batch=study.evaluation.batch_size,
        eval_images=study.evaluation.n_eval or len(dataset.test),
        trains=False,
        lgv_members=plan.lgv.epochs * plan.lgv.models_per_epoch if plan.lgv else 0,
        hook_shape=memory.HookShape.of(study.evaluation),
    )
    batch = planned.hook_batch_within(cap) if not planned.unknown else study.evaluation.batch_size
    return dataclasses.replace(study.evaluation, batch_size=max(1, batch or 1))


def _proxy(study: StudySpec, dataset):
    """The small evaluation set of the mid-training ASR proxy (ASHA), or None when it is off."""
    if study.search is None or not study.search.proxy_every:
        return None
    config = EvalConfig(
        n_eval=study.search.proxy_n_eval, seed=study.evaluation.seed, batch_size=study.evaluation.batch_size
    )
    return make_eval_set(dataset.test, dataset.num_classes, config)
