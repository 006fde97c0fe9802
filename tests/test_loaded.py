"""Models a study loads instead of training: timm's weights (through the Hugging Face cache, offline),
local state dicts and raystudy model files; the ImageNet-compatible evaluation set; their one-line errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from raystudy.config import parse_space
from raystudy.config.loaded import parse_loaded
from raystudy.core.checkpoint import load_model, save_model
from raystudy.core.data import IMAGENET_MEAN, IMAGENET_STD, load_dataset
from raystudy.core.models import build_model
from raystudy.core.pretrained import load_loaded_model, model_meta, state_dict_sha256
from raystudy.errors import RaystudyError
from raystudy.metrics.smoothness import input_hessian_top_eigenvalue

VIT = "test_vit.r160_in1k"  # timm's 0.4M-parameter test ViT (160 px): the real architecture code, tiny
RESNET = "test_resnet.r160_in1k"


def imagenet_compatible(root: Path, n: int = 12, side: int = 64, seed: int = 0) -> list[int]:
    """The NeurIPS'17 set's layout: images.csv (TrueLabel 1..1000) and images/<ImageId>.png."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    labels = [int(v) for v in rng.integers(1, 1001, n)]
    with open(root / "images.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "URL", "x1", "y1", "x2", "y2", "TrueLabel", "TargetClass"])
        for i, label in enumerate(labels):
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
                root / "images" / f"{i:04x}.png"
            )
            writer.writerow([f"{i:04x}", "", 0, 0, side, side, label, 1 + label % 1000])
    return labels


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding the test ViT's weights where timm's download looks."""
    import huggingface_hub.constants as hf
    import timm
    from safetensors.torch import save_file

    cache = tmp_path / "hub"
    repo = cache / f"models--timm--{VIT}"
    (repo / "snapshots" / "0").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0")
    torch.manual_seed(0)
    save_file(timm.create_model(VIT).state_dict(), repo / "snapshots" / "0" / "model.safetensors")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / "0" / "model.safetensors"


def test_timm_weights_load_through_the_hub_cache_and_a_local_file_gives_the_same_digest(hub_cache, tmp_path):
    hub, provenance = load_loaded_model(parse_loaded(f"timm/{VIT}", True, None), 1000, 224)
    assert provenance["source"] == "timm pretrained" and provenance["hf_hub_id"] == f"timm/{VIT}"
    local, from_file = load_loaded_model(parse_loaded(f"timm/{VIT}", False, str(hub_cache)), 1000, 224)
    assert from_file["file"] == str(hub_cache) and len(from_file["file_sha256"]) == 64
    assert provenance["weights_sha256"] == from_file["weights_sha256"] == state_dict_sha256(hub)
    x = torch.rand(2, 3, 224, 224)
    assert torch.equal(hub(x), local(x))
    # the ViT sees its own 160 px and its own normalization; attacks stay in 224 px [0, 1] pixels
    assert hub[0].size == 160 and hub[0].mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_weights_not_in_the_cache_are_one_line_naming_how_to_fetch_them(hub_cache):
    with pytest.raises(RaystudyError, match=r"not in the cache.*timm.create_model\('test_resnet.r160_in1k'"):
        load_loaded_model(parse_loaded(f"timm/{RESNET}", True, None), 1000, 224)


def test_a_saved_loaded_model_rebuilds_to_the_same_function(hub_cache, tmp_path):
    model, provenance = load_loaded_model(parse_loaded(f"timm/{VIT}", True, None), 1000, 224)
    save_model(tmp_path / "vit.pt", model, model_meta(model, provenance, 224))
    again, meta = load_model(tmp_path / "vit.pt")
    x = torch.rand(3, 3, 224, 224)
    assert torch.equal(model(x), again(x)) and meta["loaded_from"]["weights_sha256"] == provenance["weights_sha256"]
    # a raystudy model file is itself a loadable surrogate, with its file's hash in the record
    reloaded, from_file = load_loaded_model(parse_loaded(None, False, str(tmp_path / "vit.pt")), 1000, 224)
    assert from_file["source"] == "raystudy model file" and torch.equal(reloaded(x), model(x))


def test_wrong_files_are_one_line_errors(tmp_path):
    import timm

    torch.save(timm.create_model(RESNET).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(RaystudyError, match="does not fit 'test_vit.r160_in1k'"):
        load_loaded_model(parse_loaded(f"timm/{VIT}", False, str(tmp_path / "resnet.pth")), 1000, 224)
    with pytest.raises(RaystudyError, match="does not exist on this machine"):
        load_loaded_model(parse_loaded(f"timm/{VIT}", False, str(tmp_path / "nowhere.pth")), 1000, 224)
    ten = build_model("test_resnet", 10, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    meta = {"model": "test_resnet", "num_classes": 10, "input_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    save_model(tmp_path / "ten.pt", ten, meta)
    with pytest.raises(RaystudyError, match="predicts 10 classes; the dataset has 1000"):
        load_loaded_model(parse_loaded(None, False, str(tmp_path / "ten.pt")), 1000, 224)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"model": f"timm/{VIT}"}, "is loaded, not trained: add pretrained: true"),
        ({"model": "resnet50", "pretrained": True}, "a loaded model is named timm/<name>"),
        ({"pretrained": True}, "pretrained: true needs model: timm/<name>"),
        ({"model": f"timm/{VIT}", "pretrained": True, "weights": "w.pth"}, "not both"),
        ({"model": "timm/no_such_net", "pretrained": True}, "unknown timm model 'no_such_net'"),
        ({"weights": "w.safetensors"}, "must be a raystudy model file"),
        ({"model": f"timm/{VIT}", "pretrained": True, "mechanism": "SAM"}, "mechanism do not apply"),
        ({"mechanism": "ST"}, "every trial loads its model"),
    ],
)
def test_bad_entries_are_one_line_errors_naming_the_key(entry, message):
    space = {"name": "q5", "dataset": "imagenet", "targets": "t", "trials": [entry]}
    with pytest.raises(RaystudyError, match=message):
        parse_space(space, "q5.yaml")


def test_a_loaded_entry_is_one_trial_whatever_the_seeds_and_names_itself():
    space = {
        "name": "q5",
        "dataset": "imagenet",
        "targets": "t",
        "seeds": [0, 1, 2],
        "trials": [{"model": f"timm/{VIT}", "pretrained": True}, {"model": f"timm/{VIT}", "weights": "vit_sam.pth"}],
    }
    spec = parse_space(yaml.safe_load(yaml.safe_dump(space)), "q5.yaml")
    assert [p.loaded.name for p in spec.plans] == [VIT, "vit_sam"]
    assert [p.identity()["mechanism"] for p in spec.plans] == ["loaded", "loaded"]
    same = {**space, "trials": [{"model": f"timm/{VIT}", "weights": "a/w.pth"}, {"weights": "b/w.pt"}]}
    with pytest.raises(RaystudyError, match="both called w"):
        parse_space(same, "q5.yaml")


def test_the_imagenet_compatible_set_reads_its_labels_from_images_csv(tmp_path):
    labels = imagenet_compatible(tmp_path / "set")
    data = load_dataset("imagenet", tmp_path / "set")
    assert data.num_classes == 1000 and len(data.train) == 0
    assert data.test.images.shape == (12, 3, 224, 224) and data.test.labels.tolist() == [v - 1 for v in labels]
    (tmp_path / "set" / "images" / "0003.png").unlink()
    with pytest.raises(RaystudyError, match="1 image\\(s\\) listed in images.csv are missing"):
        load_dataset("imagenet", tmp_path / "set")
    with pytest.raises(RaystudyError, match="not an ImageNet-compatible folder"):
        load_dataset("imagenet", tmp_path)


def test_a_vit_has_an_input_hessian_and_trains_with_exact_ir():
    """The fused attention kernels have no double backward: the Hessian's power iteration and IR's
    exact gradient run attention through the math kernel, and agree with a ViT built without fused attention."""
    import timm

    from raystudy.config import TrainConfig
    from raystudy.mechanisms import soft_targets
    from raystudy.mechanisms.step import objective

    torch.manual_seed(0)
    vit = timm.create_model(VIT).eval()
    x, y = torch.rand(2, 3, 160, 160), torch.tensor([3, 7])
    fused = input_hessian_top_eigenvalue(vit, x, y, iterations=4, generator=torch.Generator().manual_seed(0))
    plain = timm.create_model(VIT).eval()
    plain.load_state_dict(vit.state_dict())
    for block in plain.blocks:
        block.attn.fused_attn = False
    reference = input_hessian_top_eigenvalue(plain, x, y, iterations=4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fused.eigenvalues, reference.eigenvalues, rtol=1e-3, atol=1e-9)
    recipe = TrainConfig(dataset="imagenette", model=VIT, mechanism="IR").recipe()
    out = objective(vit.train(), recipe, x, soft_targets(y, 1000, 0.0))
    out["loss"].backward()
    assert all(p.grad is not None for p in vit.parameters() if p.requires_grad)


@pytest.mark.slow
def test_a_study_of_loaded_surrogates_against_loaded_targets(hub_cache, tmp_path, monkeypatch):
    """A targets study saves loaded targets, a grid study of loaded ViTs (timm's hub weights from the
    cache, and a local state dict) goes straight to the hook, and the records say where each
    model's weights came from. Written without Ray (tests/world.py): loaded models are the subject."""
    import timm
    from world import write_experiment

    from analysis.records import load_experiment
    from analysis.tables import tidy_trials

    imagenet_compatible(tmp_path / "set", n=16)
    torch.manual_seed(1)
    torch.save(timm.create_model(RESNET).state_dict(), tmp_path / "resnet_target.pth")
    torch.manual_seed(2)
    torch.save(timm.create_model(VIT).state_dict(), tmp_path / "vit_sam.pth")
    common = {"dataset": "imagenet", "data": str(tmp_path / "set"), "max_failures": 0}
    targets = {**common, "name": "loaded_targets", "kind": "targets"}
    targets["trials"] = [{"model": f"timm/{RESNET}", "weights": str(tmp_path / "resnet_target.pth")}]
    grid = {**common, "name": "loaded_grid", "targets": "loaded_targets"}
    grid["evaluation"] = {"n_eval": 8, "budgets": [16], "attacks": ["pgd", "dim"], "smoothness_samples": 4, "steps": 2}
    grid["trials"] = [
        {"model": f"timm/{VIT}", "pretrained": True},
        {"model": f"timm/{VIT}", "weights": str(tmp_path / "vit_sam.pth")},
    ]
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache.parents[3]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for space in (targets, grid):
        write_experiment(space, tmp_path / "s")
    experiment = load_experiment(str(tmp_path / "s" / "loaded_grid"))
    records = {t.record["identity"]["label"]: t.record for t in experiment.trials}
    assert set(records) == {VIT, "vit_sam"}
    hub, local = records[VIT]["identity"]["weights"], records["vit_sam"]["identity"]["weights"]
    assert hub["source"] == "timm pretrained" and hub["hf_hub_id"] == f"timm/{VIT}"
    assert local["file"] == str(tmp_path / "vit_sam.pth") and len(local["file_sha256"]) == 64
    assert hub["weights_sha256"] != local["weights_sha256"]  # other weights, other digest
    tidy = tidy_trials([experiment])
    assert set(tidy.mechanism) == {"loaded"} and set(tidy.label) == {VIT, "vit_sam"}
    assert not {"train_acc", "epoch"} & set(tidy.name)  # nothing was trained
    assert {"smoothness", "similarity", "asr"} <= set(tidy.name)
    assert set(tidy[tidy.name == "asr"].attack) == {"pgd", "dim"} and set(tidy.target.dropna()) == {
        "resnet_target",
        "mean",
    }
