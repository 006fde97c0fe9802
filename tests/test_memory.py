"""Memory planned before launch (raystudy.budget.memory, `raystudy plan`): the per-image figures against a
direct count on the CPU, the shares and fixes, and the shipped studies against the shipped cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from raystudy.budget import memory
from raystudy.config import TrainConfig, load_space
from raystudy.core.activation_memory import bytes_per_image, measure, saved_bytes
from raystudy.core.models import build_model


@pytest.mark.parametrize("name, pixels", [("resnet8", 32), ("tiny_cnn", 16), ("vgg_small", 32)])
def test_per_image_bytes_scaled_from_two_small_batches_match_a_direct_count_at_a_larger_one(name, pixels):
    torch.manual_seed(0)
    model = build_model(name, 10, input_size=pixels).train()
    per_image = bytes_per_image(model, pixels)
    constant = saved_bytes(model, torch.rand(2, 3, pixels, pixels)) - 2 * per_image
    direct = saved_bytes(model, torch.rand(24, 3, pixels, pixels))
    assert direct == pytest.approx(constant + 24 * per_image, rel=0.02)  # linear in the batch within 2%


@pytest.mark.parametrize("key", ["resnet8@32", "tiny_cnn@16"])
def test_the_shipped_table_is_what_the_models_measure_today(key):
    name, pixels = key.split("@")
    found = measure(name, int(pixels))
    saved, weights = memory.MEASURED[key]
    assert found["saved_bytes_per_image"] == pytest.approx(saved, rel=0.02)
    assert found["parameter_bytes"] == pytest.approx(weights, rel=0.001)


def test_a_size_not_measured_scales_by_pixels_and_a_cifar_variant_is_not_a_timm_model():
    at_64 = memory.model_bytes("resnet18", 28)
    assert at_64.scaled_from == "resnet18@32"
    assert at_64.saved_per_image == pytest.approx(memory.MEASURED["resnet18@32"][0] * (28 / 32) ** 2)
    assert memory.model_bytes("resnet50", 160).scaled_from == "resnet50@224"  # the timm network, not CIFAR's
    assert memory.model_bytes("timm/vit_base_patch16_224.sam_in1k", 224).name == "vit_base_patch16_224@224"
    assert memory.model_bytes("resnet18", 224) is None  # no timm resnet18 measured: not guessed


def test_the_share_leaves_the_cuda_context_and_the_fix_is_the_smallest_share_that_holds_it():
    card = 24 * memory.GiB
    assert memory.share_bytes(0.25, card) == 5 * memory.GiB
    assert memory.fitting_share(5 * memory.GiB, card) == 0.25
    assert memory.fitting_share(5 * memory.GiB + 1, card) == 0.3
    assert memory.parse_memory("24GiB") == card and memory.parse_memory("16384MiB") == 16 * memory.GiB
    with pytest.raises(Exception, match="give the card's memory"):
        memory.parse_memory("lots")


def test_the_hook_runs_at_its_batch_halved_until_it_fits_and_training_must_fit_as_it_is():
    m = memory.TrialMemory("x", 1.0, 2.0, 100, 10.0, 1.0, 250, "similarity")
    assert m.training == 201 and m.hook == 260
    assert m.hook_batch_within(300) == 250 and m.hook_batch_within(100) == 62 and m.hook_batch_within(10.5) == 0
    assert m.largest_train_batch(101) == 50


def test_every_part_of_the_estimate_grows_where_it_should():
    resnet = memory.model_bytes("resnet18", 32)
    base = dict(pixels=32, train_batch=128, train_images=60_000, eval_batch=250, eval_images=1000)
    plain = memory.trial_memory("ST", resnet, [resnet], **base)
    inception = memory.trial_memory("ST", resnet, [resnet, memory.model_bytes("inception_v3", 32)], **base)
    ensemble = memory.trial_memory("LGV", resnet, [resnet], lgv_members=40, lgv_batch=256, **base)
    assert inception.hook_per_image > plain.hook_per_image and inception.hook_part == "similarity"
    assert ensemble.hook_fixed == pytest.approx(plain.hook_fixed + 39 * resnet.weights * memory.ALLOCATOR_SLACK)
    # member by member: one member's graph at a time, its HVP holding its Jacobian-vector product too
    vectors = memory.POWER_VECTORS * 3 * 32 * 32 * 4 * memory.ALLOCATOR_SLACK  # power iteration's own
    assert ensemble.hook_per_image - vectors == pytest.approx((plain.hook_per_image - vectors) * 4 / 3)
    # LGV fine-tunes at batch 256 with its base's step: SAM&JR's finite differences keep two graphs
    fd = TrainConfig.from_preset("fast", mechanism="SAM&JR").shape()
    lgv_fd = memory.trial_memory("LGV", resnet, [], lgv_members=40, lgv_batch=256, lgv_shape=fd, **base)
    assert lgv_fd.training_per_image == pytest.approx(resnet.saved_per_image * 2 * 2 * memory.ALLOCATOR_SLACK)


def test_the_evaluation_settings_add_what_they_hold_to_the_hook():
    """Lanczos keeps one image-sized vector per product, BSR's copies go through the model as one
    batch, torchattack crafts on a copy of the whole surrogate, a median holds each pixel's window."""
    from raystudy.metrics import EvalConfig

    resnet = memory.model_bytes("resnet18", 32)
    base = dict(pixels=32, train_batch=128, train_images=0, eval_batch=100, eval_images=1000, trains=False)
    floats = 3 * 32 * 32 * 4 * memory.ALLOCATOR_SLACK

    def planned(lgv_members=0, **evaluation):
        shape = memory.HookShape.of(EvalConfig(**evaluation))
        return memory.trial_memory("x", resnet, [resnet], hook_shape=shape, lgv_members=lgv_members, **base)

    plain = planned()
    assert plain.hook_part == "smoothness" and plain.hook_fixed == pytest.approx(
        memory.trial_memory("x", resnet, [resnet], **base).hook_fixed
    )
    lanczos = planned(smoothness_method="lanczos", lanczos_iterations=500)
    assert lanczos.hook_per_image - plain.hook_per_image == pytest.approx(500 * floats)
    bsr_options = (("torchattack.BSR", (("num_scale", 10),)),)
    bsr = planned(attacks=("pgd", "torchattack.BSR"), attack_options=bsr_options)
    assert bsr.hook_part == "attacks"
    assert bsr.hook_per_image == pytest.approx(10 * resnet.saved_per_image * memory.ALLOCATOR_SLACK + 12 * floats)
    assert bsr.hook_fixed - plain.hook_fixed == pytest.approx(resnet.weights * memory.ALLOCATOR_SLACK)
    assert planned(attacks=("pgd", "mi")).hook_fixed == plain.hook_fixed  # raystudy's own: no copy
    # An LGV ensemble: raystudy's attacks go member by member; torchattack's copy of the whole
    # ensemble runs all 40 members in each forward and is 40 members' weights more.
    own = planned(lgv_members=40, attacks=("pgd",))
    theirs = planned(lgv_members=40, attacks=("pgd", "torchattack.BSR"), attack_options=bsr_options)
    assert own.hook_part == "smoothness" and theirs.hook_part == "attacks"
    assert theirs.hook_per_image == pytest.approx(
        10 * 40 * resnet.saved_per_image * memory.ALLOCATOR_SLACK + 12 * floats
    )
    assert theirs.hook_fixed - own.hook_fixed == pytest.approx(40 * resnet.weights * memory.ALLOCATOR_SLACK)
    # AutoAttack, given the whole ensemble too: every member's graph, but no copy of it.
    auto = planned(lgv_members=40, attacks=("pgd", "autoattack"))
    assert auto.hook_part == "attacks" and auto.hook_fixed == own.hook_fixed
    assert auto.hook_per_image == pytest.approx(40 * resnet.saved_per_image * memory.ALLOCATOR_SLACK + 3 * floats)
    # A median holds its windows, the padded input, the values and their int64 indices, the input.
    assert memory.defense_images("median:5") == 30 and memory.defense_images("jpeg:75+bits:4") == 2
    assert memory.defense_images("resize_pad:2") == 9 and memory.defense_images("bits:4+median:3") == 14
    tiny = memory.model_bytes("tiny_cnn", 32)
    defended = memory.trial_memory(
        "x", tiny, [], hook_shape=memory.HookShape.of(EvalConfig(defenses=("median:15",))), **base
    )
    assert defended.hook_part == "defenses" and defended.hook_per_image == pytest.approx(230 * floats)


def plan(path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raystudy.cli", "plan", str(path), *flags], capture_output=True, text=True, cwd=ROOT
    )


def test_a_study_that_cannot_fit_its_share_is_refused_in_one_line_with_the_fix(tmp_path):
    values = yaml.safe_load((ROOT / "search_spaces" / "targets.yaml").read_text())
    values["resources"] = {"cpu": 2, "gpu": 0.25}
    (tmp_path / "targets.yaml").write_text(yaml.safe_dump(values))
    out = plan(tmp_path / "targets.yaml")  # ./cluster.yaml: one A10G of 24 GiB per worker
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "trial 'inception_v3 (inception_v3)' needs about" in out.stderr
    assert "gpu 0.25 of 22.5 GiB" in out.stderr and "raise resources.gpu to 0.4" in out.stderr
    assert plan(tmp_path / "targets.yaml", "--gpu-memory", "80GiB").returncode == 0


def test_the_plan_says_the_hooks_batch_and_where_cpus_bound_the_packing(tmp_path):
    out = plan(ROOT / "search_spaces" / "table.yaml")
    assert out.returncode == 0, out.stderr
    assert "share: gpu 0.25 of 22.5 GiB (gpu_worker's g5.2xlarge in cluster.yaml) = 4.6 GiB after" in out.stdout
    assert "hook  13.0 GiB at batch 250 (similarity), runs at batch 62" in out.stdout
    values = yaml.safe_load((ROOT / "search_spaces" / "table.yaml").read_text())
    values["resources"] = {"cpu": 4, "gpu": 0.25}
    (tmp_path / "table.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "targets.yaml").write_text((ROOT / "search_spaces" / "targets.yaml").read_text())
    out = plan(tmp_path / "table.yaml")
    assert "at 2 trial(s) per GPU" in out.stdout and "fits 2 trial(s) per GPU, not the 4" in out.stdout


def test_shipped_gpu_studies_pack_on_the_shipped_workers_by_cpus_as_by_gpu_share():
    card = memory.card_from_cluster(ROOT / "cluster.yaml")
    assert card.memory == 23_028 * memory.MiB and card.cpus_per_gpu == 8  # an A10G as nvidia-smi reports it
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        spec = load_space(path)
        if spec.resources.gpu > 0:
            by_gpu = int(1 / spec.resources.gpu + 1e-9)
            assert by_gpu * spec.resources.cpu <= card.cpus_per_gpu, path.name
            assert (by_gpu + 1) * spec.resources.cpu > card.cpus_per_gpu or by_gpu == 1, path.name


def test_the_hook_starts_at_the_batch_planned_for_its_share_of_the_card(monkeypatch):
    from types import SimpleNamespace

    from raystudy.config.study import TrialPlan
    from raystudy.training import trial

    spec = load_space(ROOT / "search_spaces" / "table.yaml")
    plan = TrialPlan(TrainConfig.from_preset("fast", mechanism="ST", model="resnet18", dataset="cifar10"))
    dataset = SimpleNamespace(image_size=32, test=range(10_000))
    card = SimpleNamespace(total_memory=23_028 * memory.MiB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    paper = ["resnet50", "vgg16", "inception_v3", "densenet121"]
    cuda = trial._hook_evaluation(spec, plan, dataset, paper, torch.device("cuda", 0))
    assert spec.evaluation.batch_size == 250 and cuda.batch_size == 62  # as `raystudy plan` says
    assert cuda.budgets == spec.evaluation.budgets  # nothing else changes
    assert trial._hook_evaluation(spec, plan, dataset, paper, torch.device("cpu")) is spec.evaluation
    unknown = trial._hook_evaluation(spec, plan, dataset, ["a_model_never_measured"], torch.device("cuda", 0))
    assert unknown.batch_size == 250  # not guessed: it halves on an out-of-memory error instead


def test_a_trial_out_of_memory_with_the_same_settings_fails_at_once_and_a_new_batch_tries_again(tmp_path):
    import dataclasses
    import json

    from raystudy.config.study import TrialPlan
    from raystudy.errors import OutOfGpuMemory
    from raystudy.training import trial

    spec = load_space(ROOT / "search_spaces" / "table.yaml")
    plan = TrialPlan(TrainConfig.from_preset("fast", mechanism="ST"))
    with pytest.raises(OutOfGpuMemory, match="training at batch 128 of resnet18 ran out of GPU memory .*gpu 0.25"):
        with trial._out_of_memory_is("training at batch 128", plan, spec, torch.device("cuda", 0)):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")
    marker = tmp_path / trial.OUT_OF_MEMORY_FILE
    trial._refuse_a_known_out_of_memory(str(marker), spec)  # none yet: nothing to refuse
    settings = {"gpu": 0.25, "eval_batch_size": 250}
    marker.write_text(json.dumps({"error": "the hook ran out of GPU memory even at batch 1", "settings": settings}))
    with pytest.raises(OutOfGpuMemory, match="even at batch 1 \\(not tried again with the same settings\\)"):
        trial._refuse_a_known_out_of_memory(str(marker), spec)
    smaller = dataclasses.replace(spec, evaluation=dataclasses.replace(spec.evaluation, batch_size=16))
    trial._refuse_a_known_out_of_memory(str(marker), smaller)  # resume --eval-batch-size 16: tried again


def test_a_local_study_that_cannot_fit_this_machines_gpu_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from raystudy.cli import main

    values = yaml.safe_load((ROOT / "search_spaces" / "targets.yaml").read_text())
    values["resources"] = {"cpu": 2, "gpu": 0.25}
    (tmp_path / "targets.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=23_028 << 20))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA A10G")
    monkeypatch.setattr("raystudy.cluster.phases.run", lambda *a, **k: pytest.fail("Ray was started"))
    # The command puts a local Ray on loopback through the environment: kept to this test, as a Ray
    # started later by another test from this process must not inherit it (tests/test_autoscaling.py).
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    assert main(["targets", str(tmp_path / "targets.yaml"), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trial 'inception_v3 (inception_v3)' needs about 6.9 GiB" in err[0]
    assert "(gpu 0.25 of 22.5 GiB" in err[0] and not (tmp_path / "runs").exists()
