"""The ImageNette path end to end on tiny generated image folders: 224-pixel data, random resized
crops, timm models (random init, since no weights can be fetched here), off-distribution targets,
a grid study with the trial-end hook, and the one-line error for missing pretrained weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import raystudy_here

from raystudy.core.data import augment, load_dataset

CLASSES = ("n01440764", "n02102040", "n02979186")


@pytest.fixture(scope="module")
def imagenette(tmp_path_factory) -> Path:
    """train/ and val/ class folders of small JPEG and PNG images of mixed sizes (resized to 224 on load)."""
    import torchvision.io

    root = tmp_path_factory.mktemp("imagenette")
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("val", 4)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = 60 + 10 * (i % 3), 80
                colour = torch.tensor([60 + 80 * label, 200 - 70 * label, 90], dtype=torch.float32).view(3, 1, 1)
                image = (colour + 30 * torch.randn(3, h, w, generator=gen)).clamp(0, 255).to(torch.uint8)
                if i % 2:
                    torchvision.io.write_png(image, str(folder / f"img{i}.png"))
                else:
                    torchvision.io.write_jpeg(image, str(folder / f"img{i}.JPEG"))
    return root


def test_imagenette_images_load_at_224_and_train_with_random_resized_crops(imagenette):
    data = load_dataset("imagenette", imagenette)
    assert data.image_size == 224 and data.num_classes == 3 and len(data.train) == 24 and len(data.test) == 12
    torch.manual_seed(0)
    crops = augment(data.train.images[:8])
    assert crops.shape == (8, 3, 224, 224) and crops.dtype == torch.float32 and 0 <= crops.min() and crops.max() <= 1
    assert not torch.allclose(crops, data.train.images[:8].float() / 255, atol=0.05)  # cropped and rescaled


def space(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.slow
def test_imagenette_targets_and_study_run_with_timm_models(imagenette, tmp_path):
    # Written without Ray (tests/world.py): the subject is ImageNette and timm's models.
    from world import write_experiment

    storage = tmp_path / "storage"
    train = {"epochs": 1, "batch_size": 8, "pretrained": False}
    common = {
        "preset": "fast",
        "dataset": "imagenette",
        "seeds": [0],
        "resources": {"cpu": 1},
        "max_failures": 0,
        "train": train,
    }
    targets = space(
        tmp_path / "t.yaml",
        {
            **common,
            "name": "in_targets",
            "kind": "targets",
            "model": "test_resnet",
            "trials": [
                {"model": "test_resnet"},
                {"model": "test_efficientnet", "mechanism": "MU", "magnitudes": {"p": 0.5}},
            ],
        },
    )
    write_experiment(yaml.safe_load(targets.read_text()), storage, data=str(imagenette))
    names = sorted(p.name for p in (storage / "in_targets" / "targets").iterdir())
    assert names == ["test_efficientnet_MU_p0.5.pt", "test_resnet.pt"]
    from raystudy.core.checkpoint import load_model

    _, meta = load_model(storage / "in_targets" / "targets" / "test_efficientnet_MU_p0.5.pt")
    assert (
        meta["config"]["mechanism"] == "MU" and meta["config"]["magnitudes"] == {"p": 0.5} and meta["input_size"] == 224
    )

    grid = space(
        tmp_path / "g.yaml",
        {
            **common,
            "name": "in_table",
            "kind": "grid",
            "model": "test_resnet",
            "targets": "in_targets",
            "trials": [{"mechanism": "ST"}, {"mechanism": "CO"}],
            "evaluation": {
                "n_eval": 6,
                "budgets": [8],
                "modes": ["untargeted"],
                "steps": 2,
                "power_iterations": 2,
                "batch_size": 6,
            },
        },
    )
    write_experiment(yaml.safe_load(grid.read_text()), storage, data=str(imagenette))
    finals = [
        json.loads(line)
        for f in (storage / "in_table").glob("trial_*/result.json")
        for line in f.read_text().splitlines()
        if line.strip() and json.loads(line).get("final") == 1
    ]
    assert sorted(r["mechanism"] for r in finals) == ["CO", "ST"]
    for r in finals:
        assert "asr/pgd/untargeted/8/test_efficientnet_MU_p0.5" in r and "similarity/test_resnet" in r
        config = r["record"]["plan"]["train"]
        assert (config["dataset"], config["batch_size"], config["lr"]) == ("imagenette", 8, 1.0)
    co = next(r for r in finals if r["mechanism"] == "CO")
    assert json.loads(co["magnitudes"]) == {"size": 80.0}  # ImageNette's grid, not CIFAR's


def test_missing_pretrained_weights_is_one_line_naming_them(imagenette, tmp_path):
    # The ImageNette presets fine-tune from ImageNet weights; none can be fetched here.
    out = raystudy_here(
        "train",
        "--dataset",
        "imagenette",
        "--data",
        imagenette,
        "--model",
        "resnet50",
        "--preset",
        "fast",
        "--out",
        tmp_path / "r50",
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    assert "pretrained weights of 'resnet50' (timm/resnet50.a1_in1k)" in line
