"""Data sources, subsets and on-device augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import SHARED_CIFAR

from raystudy.core.data import (
    CIFAR10_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    balanced_subset,
    eval_batches,
    load_dataset,
    make_synthetic,
    random_crop_flip,
    train_batches,
)
from raystudy.errors import RaystudyError


@pytest.mark.skipif(not (SHARED_CIFAR / "test.npz").is_file(), reason="../shared/data/cifar10-jpeg is absent here")
def test_packed_jpeg_reader_decodes_the_cifar10_test_set():
    from raystudy.core.data import read_packed_jpeg

    split = read_packed_jpeg(SHARED_CIFAR / "test.npz")
    assert split.images.shape == (10000, 3, 32, 32) and split.images.dtype == torch.uint8
    with np.load(SHARED_CIFAR / "test.npz") as archive:
        assert torch.equal(split.labels, torch.from_numpy(archive["labels"].astype(np.int64)))
        assert list(archive["classes"])[:2] == ["airplane", "automobile"]
    assert torch.equal(split.labels.bincount(), torch.full((10,), 1000))
    # Real photographs, not blank decodes: varied pixels, means near CIFAR-10's.
    means = split.images.float().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor([0.49, 0.48, 0.45]), atol=0.03)
    again = read_packed_jpeg(SHARED_CIFAR / "test.npz")  # from the decoded cache
    assert torch.equal(again.images, split.images)


def test_balanced_subset_is_seeded_random_and_class_balanced():
    labels = torch.arange(1000) // 100  # ordered by class, like the archives
    a = balanced_subset(labels, 50, seed=0)
    assert np.array_equal(a, balanced_subset(labels, 50, seed=0))
    assert not np.array_equal(a, balanced_subset(labels, 50, seed=1))
    assert np.bincount(labels[a].numpy(), minlength=10).tolist() == [5] * 10
    assert not np.array_equal(a, np.arange(50))  # never the first N
    counts = np.bincount(labels[balanced_subset(labels, 23, seed=3)].numpy(), minlength=10)
    assert counts.sum() == 23 and counts.max() - counts.min() <= 1
    with pytest.raises(RaystudyError, match="only 1000"):
        balanced_subset(labels, 2000, seed=0)


def write_cifar_batches(folder, n_per_batch=20):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"labels": list(range(10)) * (n_per_batch // 10),
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, handle)


def test_cifar10_from_torchvision_batches_and_image_folders(tmp_path):
    write_cifar_batches(tmp_path / "tv" / "cifar-10-batches-py")
    ds = load_dataset("cifar10", tmp_path / "tv")
    assert ds.train.images.shape == (100, 3, 32, 32) and len(ds.test) == 20 and ds.classes[0] == "c0"

    import torchvision.io

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / "folder" / split / c).mkdir(parents=True)
            for i in range(3):
                image = torch.full((3, 32, 32), 40 * i, dtype=torch.uint8)
                torchvision.io.write_png(image, str(tmp_path / "folder" / split / c / f"{i}.png"))
    ds = load_dataset("cifar10", tmp_path / "folder")
    assert ds.classes == ("cat", "dog") and ds.train.images.shape == (6, 3, 32, 32)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and int(ds.train.images[1].max()) == 40


def test_missing_data_gives_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(RaystudyError, match="no CIFAR-10 in a known layout"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(RaystudyError, match="not a folder"):
        load_dataset("cifar10", tmp_path / "nope")
    with pytest.raises(RaystudyError, match="pass --data PATH"):
        load_dataset("imagenette")

    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    monkeypatch.setenv("RAYSTUDY_CACHE", str(tmp_path / "empty-cache"))  # nothing downloaded before
    with pytest.raises(RaystudyError, match="could not be downloaded.*--data PATH"):
        load_dataset("cifar10")  # no path, no RAYSTUDY_DATA: the download route


def test_imagenette_folder_is_resized_to_224(tmp_path):
    import torchvision.io

    for split in ("train", "val"):
        (tmp_path / split / "n01440764").mkdir(parents=True)
        torchvision.io.write_jpeg(
            torch.randint(0, 255, (3, 300, 400), dtype=torch.uint8), str(tmp_path / split / "n01440764" / "a.JPEG")
        )
    ds = load_dataset("imagenette", tmp_path)
    assert ds.train.images.shape == (1, 3, 224, 224) and ds.num_classes == 1


def test_synthetic_is_seeded_and_sized():
    a = make_synthetic(40, 20, num_classes=4, image_size=24, seed=0)
    b = make_synthetic(40, 20, num_classes=4, image_size=24, seed=0)
    assert torch.equal(a.train.images, b.train.images) and a.image_size == 24
    assert a.train.labels.bincount().tolist() == [10] * 4


def test_crop_and_flip_keep_content_and_shape():
    torch.manual_seed(0)
    images = torch.randint(1, 255, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, pad=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    centred = [i for i in range(64) if torch.equal(out[i], images[i]) or torch.equal(out[i], images[i].flip(2))]
    assert 0 < len(centred) < 64  # some crops are the identity (offset 0), most are shifted
    zero_rows = (out == 0).all(dim=(1, 3)).sum(1)  # padding shows up as zero rows
    assert zero_rows.max() <= 2


def test_batches_cover_an_epoch_once(synthetic):
    seen = torch.cat([y for _, y in train_batches(synthetic.train, 64, augment_images=False)])
    assert len(seen) == 256 and torch.equal(seen.sort().values, synthetic.train.labels.sort().values)
    x, _ = next(eval_batches(synthetic.test, 100))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_a_study_file_names_its_data_and_data_on_the_command_line_wins(tmp_path, monkeypatch):
    import yaml

    from raystudy.config import read_space

    monkeypatch.chdir(tmp_path)
    space = {"name": "s", "kind": "targets", "data": "cifar", "trials": [{"model": "tiny_cnn"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    assert read_space(tmp_path / "s.yaml")[0].data == str(tmp_path / "cifar")
    assert read_space(tmp_path / "s.yaml", "elsewhere")[0].data == str(tmp_path / "elsewhere")


def test_subsets_of_a_real_layout_keep_each_image_with_its_label(tmp_path):
    """A torchvision-batches CIFAR whose pixels encode (label, index): a subset's every image must be
    the one its label came from, train and test drawn from their own seeds, names and stats kept."""
    folder = tmp_path / "tv" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        labels = [(3 * i + b) % 10 for i in range(40)]
        data = np.zeros((40, 3072), dtype=np.uint8)
        data[:, 0] = labels  # first pixel: the label
        data[:, 1] = np.arange(40) + 40 * b  # second: which image
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, handle)
    full = load_dataset("cifar10", tmp_path / "tv")
    part = load_dataset("cifar10", tmp_path / "tv", n_train=30, n_test=20, seed=4)
    assert (part.name, part.classes, part.mean, part.std) == (full.name, full.classes, full.mean, full.std)
    assert len(part.train) == 30 and len(part.test) == 20
    for split in (part.train, part.test):
        assert torch.equal(split.images[:, 0, 0, 0].long(), split.labels)  # image and label stay together
        assert len(set(split.images[:, 0, 0, 1].tolist())) == len(split)  # no image twice
        assert np.bincount(split.labels.numpy(), minlength=10).tolist() == [len(split) // 10] * 10
    expected_train = balanced_subset(full.train.labels, 30, 4)
    expected_test = balanced_subset(full.test.labels, 20, 5)  # the test subset's own seed
    assert part.train.images[:, 0, 0, 1].tolist() == full.train.images[expected_train, 0, 0, 1].tolist()
    assert part.test.images[:, 0, 0, 1].tolist() == full.test.images[expected_test, 0, 0, 1].tolist()
    other = load_dataset("cifar10", tmp_path / "tv", n_train=30, n_test=20, seed=5)
    assert not torch.equal(other.train.images, part.train.images)
    assert len(load_dataset("cifar10", tmp_path / "tv", n_train=None, n_test=20).train) == 200


def test_balanced_subset_edges():
    labels = torch.arange(30) % 3
    assert balanced_subset(labels, 30, seed=0).tolist() == list(range(30))  # all of it, once each
    labels = torch.tensor([0] * 5 + [1] * 2)
    with pytest.raises(RaystudyError, match="class 1 has 2 images, fewer than the 3"):
        balanced_subset(labels, 6, seed=0)
    draws = [balanced_subset(torch.arange(100) % 10, 15, seed=s) for s in range(20)]
    extra = {tuple(np.flatnonzero(np.bincount((torch.arange(100) % 10)[d].numpy(), minlength=10) == 2)) for d in draws}
    assert all(len(e) == 5 for e in extra) and len(extra) > 10  # which classes get the remainder is drawn


def test_synthetic_sizes_classes_and_seed_pass_through():
    default = load_dataset("synthetic")
    assert (len(default.train), len(default.test), default.image_size, default.num_classes) == (512, 256, 32, 10)
    small = load_dataset("synthetic", n_train=40, n_test=20, image_size=8, num_classes=4, seed=2)
    assert (len(small.train), len(small.test), small.image_size, small.num_classes) == (40, 20, 8, 4)
    assert not torch.equal(
        small.train.images,
        load_dataset("synthetic", n_train=40, n_test=20, image_size=8, num_classes=4, seed=3).train.images,
    )
    with pytest.raises(RaystudyError, match="unknown dataset 'mnist'; known: cifar10, imagenette, imagenet, synthetic"):
        load_dataset("mnist")


def test_training_batches_are_augmented_when_asked_and_drop_the_last_partial_batch():
    from raystudy.core.data import Split

    torch.manual_seed(0)
    images = torch.randint(1, 255, (100, 3, 16, 16), dtype=torch.uint8)
    split = Split(images, torch.arange(100))
    plain = list(train_batches(split, 32, augment_images=False))
    assert [len(y) for _, y in plain] == [32, 32, 32]  # 100 // 32 full batches, the 4 left dropped
    for x, y in plain:
        assert torch.equal((x * 255).round().to(torch.uint8), images[y])
    augmented = list(train_batches(split, 32))  # augmentation is the default
    changed = sum(
        not torch.equal((x[i] * 255).round().to(torch.uint8), images[y[i]]) for x, y in augmented for i in range(len(y))
    )
    assert changed > 48  # most of the 96 images are shifted or flipped


def test_packed_jpeg_archives_and_image_folders_of_a_small_cifar(tmp_path):
    """The packed-JPEG layout of ../shared/data written small by hand; an image-folder test split
    that lacks a class keeps the training split's class numbering."""
    import torchvision.io

    for split, n in (("train", 30), ("test", 20)):
        labels = np.arange(n) % 10
        blobs = [
            torchvision.io.encode_jpeg(torch.full((3, 32, 32), int(20 * c), dtype=torch.uint8), quality=95).numpy()
            for c in labels
        ]
        offsets = np.cumsum([0] + [len(b) for b in blobs])
        np.savez(tmp_path / f"{split}.npz", jpeg=np.concatenate(blobs), offsets=offsets, labels=labels,
                 classes=np.array([f"k{i}" for i in range(10)]))  # fmt: skip
    ds = load_dataset("cifar10", tmp_path)
    assert (ds.name, ds.classes[:2], ds.mean) == ("cifar10", ("k0", "k1"), CIFAR10_MEAN)
    assert len(ds.train) == 30 and len(ds.test) == 20
    for split in (ds.train, ds.test):  # each image decodes to its own label's grey level
        assert (split.images.float().mean(dim=(1, 2, 3)) - 20 * split.labels.float()).abs().max() < 2
    folder = tmp_path / "folders"
    for split, classes in (("train", ("ant", "bee", "cat")), ("test", ("ant", "cat"))):
        for c in classes:
            (folder / split / c).mkdir(parents=True)
            torchvision.io.write_png(torch.zeros(3, 32, 32, dtype=torch.uint8), str(folder / split / c / "0.png"))
    ds = load_dataset("cifar10", folder)
    assert ds.classes == ("ant", "bee", "cat") and ds.test.labels.tolist() == [0, 2]


def test_imagenette_keeps_train_class_numbering_and_resizes_both_splits(tmp_path):
    import torchvision.io

    for split, classes in (("train", ("n01", "n02")), ("val", ("n02",))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            torchvision.io.write_jpeg(
                torch.randint(0, 255, (3, 300, 400), dtype=torch.uint8), str(tmp_path / split / c / "a.JPEG")
            )
    ds = load_dataset("imagenette", tmp_path)
    assert ds.test.images.shape == (1, 3, 224, 224) and ds.test.labels.tolist() == [1]
    assert (ds.name, ds.mean, ds.std) == ("imagenette", IMAGENET_MEAN, IMAGENET_STD)


def _coded_images(n: int, side: int) -> torch.Tensor:
    """uint8 images whose pixels name their own row and column (1-based, so padding reads 0)."""
    rows = torch.arange(1, side + 1, dtype=torch.uint8)[:, None].expand(side, side)
    cols = torch.arange(1, side + 1, dtype=torch.uint8)[None, :].expand(side, side)
    return torch.stack([rows, cols, rows * 0 + 7])[None].repeat(n, 1, 1, 1)


def test_crops_are_every_offset_of_the_padded_image_drawn_uniformly_and_flips_half():
    """Each output is the padded image's window at one offset in [0, 2*pad]^2, mirrored or not:
    read back from the coded pixels, all 25 offsets appear about equally often and half are mirrored."""
    torch.manual_seed(0)
    n, side, pad = 5000, 8, 2
    out = random_crop_flip(_coded_images(n, side), pad=pad).long()
    padded = torch.nn.functional.pad(_coded_images(1, side), (pad, pad, pad, pad))[0].long()
    offsets, mirrored = [], 0
    for image in out[:400]:
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(image, (lambda w: w.flip(2) if flip else w)(padded[:, dy : dy + side, dx : dx + side]))
        ]
        assert len(matches) >= 1  # every output is such a window (an all-padding column can be ambiguous)
        offsets.append(matches[0][:2])
        mirrored += matches[0][2]
    assert len(set(offsets)) == (2 * pad + 1) ** 2
    # The vertical offset from the row codes: padded row r holds code r - pad + 1 (0 above the image),
    # so an output starting inside the image has dy = code - 1 + pad, one starting in the top padding
    # dy = pad - (its leading padding rows). Uniform over 0..2*pad (each ~1/5).
    row_codes = out[:, 0].amax(dim=2)  # per output row (0 where the row is padding)
    leading_padding = (row_codes.cumsum(dim=1) == 0).sum(dim=1)
    dy = torch.where(row_codes[:, 0] > 0, row_codes[:, 0] - 1 + pad, pad - leading_padding)
    assert torch.equal(dy[:400], torch.tensor([dy_ for dy_, _ in offsets]))
    counts = torch.bincount(dy, minlength=2 * pad + 1).float() / n
    assert torch.allclose(counts, torch.full_like(counts, 1 / (2 * pad + 1)), atol=0.03)
    # Mirrored: the column codes fall from left to right.
    middle = out[:, 1, side // 2]
    falls = (middle[:, 1:] - middle[:, :-1] < 0) & (middle[:, 1:] > 0) & (middle[:, :-1] > 0)
    assert 0.45 < falls.any(dim=1).float().mean() < 0.55
    assert 0.4 < mirrored / 400 < 0.6


def test_random_resized_crops_sample_boxes_inside_the_image_with_the_drawn_area_and_ratio():
    """On an image whose channels are its own x and y coordinates, bilinear resampling is exact, so
    each output reads back its box: inside the image, area fraction ~ U(0.08, 1) where it fits,
    log aspect ratio within log(3/4)..log(4/3), mirrored half of the time."""
    from raystudy.core.data import random_resized_crop_flip

    torch.manual_seed(0)
    n, side = 4000, 64
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side  # pixel centres in [0, 1]
    image = torch.stack([coords[None, :].expand(side, side), coords[:, None].expand(side, side)])
    out = random_resized_crop_flip(image[None].repeat(n, 1, 1, 1))
    x_first, x_last = out[:, 0, side // 2, 0], out[:, 0, side // 2, -1]
    y_first, y_last = out[:, 1, 0, side // 2], out[:, 1, -1, side // 2]
    # Sample points of the outermost output pixels sit half a pixel inside the box.
    width = (x_last - x_first).abs() * side / (side - 1)
    height = (y_last - y_first) * side / (side - 1)
    left = torch.minimum(x_first, x_last) - width / (2 * side)
    top = y_first - height / (2 * side)
    assert (left >= -1e-4).all() and (left + width <= 1 + 1e-4).all()
    assert (top >= -1e-4).all() and (top + height <= 1 + 1e-4).all()
    fits = (width < 0.999) & (height < 0.999)
    area, log_ratio = (width * height)[fits], (width / height).log()[fits]
    assert area.min() >= 0.08 - 1e-3 and area.max() <= 1 + 1e-3
    assert log_ratio.min() >= np.log(3 / 4) - 1e-3 and log_ratio.max() <= np.log(4 / 3) + 1e-3
    assert abs(float(log_ratio.mean())) < 0.02  # uniform in log ratio: symmetric about 0
    # Uniform area fractions: the deciles of the boxes that fit are spread over (0.08, 1).
    assert float(area.quantile(0.1)) < 0.2 and float(area.quantile(0.5)) == pytest.approx(0.5, abs=0.08)
    mirrored = (x_last < x_first).float().mean()
    assert 0.46 < float(mirrored) < 0.54
    assert (height > 0).all()  # never mirrored vertically
    # Placed anywhere they fit, across and down, not only at the centre.
    small = (width < 0.7) & (height < 0.7)
    assert float((left + width / 2)[small].std()) > 0.05 and float((top + height / 2)[small].std()) > 0.05
    # The border padding clamps what the edges read, so the box's own scale is read in its interior:
    # output pixels side/4 and 3 side/4 sample half the box apart. A box wider or taller than the
    # image (sqrt(area x ratio) up to 1.15) is shrunk to it, and some are.
    box_width = 2 * (out[:, 0, side // 2, 3 * side // 4] - out[:, 0, side // 2, side // 4]).abs()
    box_height = 2 * (out[:, 1, 3 * side // 4, side // 2] - out[:, 1, side // 4, side // 2])
    assert box_width.max() <= 1 + 1e-4 and box_height.max() <= 1 + 1e-4
    assert box_width.max() > 1 - 1e-4 and box_height.max() > 1 - 1e-4


def test_augment_pads_cifar_sized_images_by_an_eighth_and_resizes_larger_ones():
    """Images up to CIFAR_MAX_INPUT wide are cropped from a zero padding of side/8 pixels (at least
    1), read from their width; wider ones take a random resized crop (border-padded: never a zero).
    On white images the padding shows as whole zero rows, as many as the largest vertical offset."""
    from raystudy.config.train import CIFAR_MAX_INPUT
    from raystudy.core.data import augment

    torch.manual_seed(0)
    for h, w, pad in [(32, 32, 4), (8, 8, 1), (8, 32, 4), (CIFAR_MAX_INPUT, CIFAR_MAX_INPUT, CIFAR_MAX_INPUT // 8)]:
        out = augment(torch.full((512, 3, h, w), 255, dtype=torch.uint8))
        assert out.dtype == torch.float32 and out.shape == (512, 3, h, w) and float(out.max()) == 1.0
        zero_rows = (out.amax(dim=(1, 3)) == 0).sum(dim=1)
        assert int(zero_rows.max()) == pad, (h, w)
    for h, w in [(CIFAR_MAX_INPUT + 8, CIFAR_MAX_INPUT + 8), (16, 96)]:
        out = augment(torch.full((64, 3, h, w), 255, dtype=torch.uint8))
        assert out.shape == (64, 3, h, w) and torch.allclose(out, torch.ones_like(out), rtol=0, atol=1e-5), (h, w)


def _layouts(tmp_path) -> dict[str, tuple[str, object]]:
    """(dataset, data folder) of every layout: CIFAR batches, image folders, packed JPEG, ImageNette."""
    import torchvision.io

    write_cifar_batches(tmp_path / "tv" / "cifar-10-batches-py")
    for split in ("train", "test"):
        for c in ("cat", "dog", "owl"):
            (tmp_path / "folder" / split / c).mkdir(parents=True)
            for i in range(4):
                torchvision.io.write_png(
                    torch.full((3, 32, 32), 9 * i, dtype=torch.uint8), str(tmp_path / "folder" / split / c / f"{i}.png")
                )
    (tmp_path / "packed").mkdir()
    for split, n in (("train", 30), ("test", 20)):
        jpegs = [torchvision.io.encode_jpeg(torch.full((3, 32, 32), i, dtype=torch.uint8)).numpy() for i in range(n)]
        offsets = np.cumsum([0] + [len(j) for j in jpegs])
        labels = np.array([(7 * i) % 10 for i in range(n)])
        classes = np.array([f"c{i}" for i in range(10)])
        np.savez(
            tmp_path / "packed" / f"{split}.npz",
            jpeg=np.concatenate(jpegs),
            offsets=offsets,
            labels=labels,
            classes=classes,
        )
    for split in ("train", "val"):
        for c in ("n1", "n2"):
            (tmp_path / "nette" / split / c).mkdir(parents=True)
            for i in range(3):
                torchvision.io.write_jpeg(
                    torch.zeros((3, 40, 40), dtype=torch.uint8), str(tmp_path / "nette" / split / c / f"{i}.JPEG")
                )
    return {
        "batches": ("cifar10", tmp_path / "tv"),
        "folders": ("cifar10", tmp_path / "folder"),
        "packed": ("cifar10", tmp_path / "packed"),
        "imagenette": ("imagenette", tmp_path / "nette"),
        "synthetic": ("synthetic", None),
    }


@pytest.mark.parametrize("layout", ["batches", "folders", "packed", "imagenette", "synthetic"])
def test_the_drivers_test_labels_are_the_trials_without_decoding_an_image(tmp_path, monkeypatch, layout):
    from raystudy.config import TrainConfig
    from raystudy.core import data

    dataset, path = _layouts(tmp_path)[layout]
    n_test = {"batches": 10, "folders": 6, "packed": 10, "imagenette": 4, "synthetic": 16}[layout]
    config = TrainConfig(dataset=dataset, n_test=n_test, n_train=None if dataset != "synthetic" else 32, data_seed=3)
    trial = data.dataset_for(config, str(path) if path else None)

    def no_decoding(*args):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(data, "_cached_array", no_decoding)
    labels, num_classes = data.test_labels_for(config, str(path) if path else None)
    assert torch.equal(labels, trial.test.labels) and num_classes == trial.num_classes
    assert len(labels) == n_test
