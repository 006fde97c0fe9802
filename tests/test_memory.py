"""Memory planned before launch (raystudy.memory, `raystudy plan`): the per-image figures against a
direct count on the CPU, the shares and fixes, and the shipped studies against the shipped cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from raystudy import memory
from raystudy.activation_memory import bytes_per_image, measure, saved_bytes
from raystudy.config import load_space
from raystudy.models import build_model

ROOT = Path(__file__).resolve().parents[1]


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
    assert ensemble.hook_per_image == plain.hook_per_image  # member by member: one member's graph at a time


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
    assert "gpu 0.25 of 24.0 GiB" in out.stderr and "raise resources.gpu to 0.35" in out.stderr
    assert plan(tmp_path / "targets.yaml", "--gpu-memory", "80GiB").returncode == 0


def test_the_plan_says_the_hooks_batch_and_where_cpus_bound_the_packing(tmp_path):
    out = plan(ROOT / "search_spaces" / "table.yaml")
    assert out.returncode == 0, out.stderr
    assert "share: gpu 0.25 of 24.0 GiB (gpu_worker's g5.2xlarge" in out.stdout
    assert "hook  12.9 GiB at batch 250 (similarity), runs at batch 62" in out.stdout
    values = yaml.safe_load((ROOT / "search_spaces" / "table.yaml").read_text())
    values["resources"] = {"cpu": 4, "gpu": 0.25}
    (tmp_path / "table.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "targets.yaml").write_text((ROOT / "search_spaces" / "targets.yaml").read_text())
    out = plan(tmp_path / "table.yaml")
    assert "at 2 trial(s) per GPU" in out.stdout and "fits 2 trial(s) per GPU, not the 4" in out.stdout


def test_shipped_gpu_studies_pack_on_the_shipped_workers_by_cpus_as_by_gpu_share():
    card = memory.card_from_cluster(ROOT / "cluster.yaml")
    assert card.memory == 24 * memory.GiB and card.cpus_per_gpu == 8
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        spec = load_space(path)
        if spec.resources.gpu > 0:
            by_gpu = int(1 / spec.resources.gpu + 1e-9)
            assert by_gpu * spec.resources.cpu <= card.cpus_per_gpu, path.name
            assert (by_gpu + 1) * spec.resources.cpu > card.cpus_per_gpu or by_gpu == 1, path.name
