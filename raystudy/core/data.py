"""Datasets as uint8 tensors on the training device, with batching and augmentation there too.

CIFAR-sized data is decoded once (the decoded array is cached on disk), moved to the device as one
uint8 tensor, and every batch is cut, cropped and flipped on that device: no DataLoader workers,
no per-batch host-to-device copies.

Sources, in this order, for `cifar10`: an explicit path (`--data` or `RAYSTUDY_DATA`) holding
torchvision's `cifar-10-batches-py`, an image-folder layout (`train/<class>/*.png|jpg`,
`test/<class>/...`) or the packed-JPEG archives (`train.npz`, `test.npz`); else torchvision's
download into the cache. `imagenette` needs an image-folder layout (`train/`, `val/`).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from raystudy.config.train import CIFAR_MAX_INPUT
from raystudy.errors import RaystudyError

if TYPE_CHECKING:
    from raystudy.config.train import TrainConfig

DATASETS = ("cifar10", "imagenette", "imagenet", "synthetic")
# Per-channel normalization (the first layer of every model).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".JPEG", ".JPG", ".PNG")
IMAGENETTE_SIZE = 224
SYNTHETIC_CONTRAST = 0.3  # spread of the synthetic class patterns around mid-grey


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, indices: np.ndarray) -> "Split":
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        return Split(self.images[idx], self.labels[idx])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def to(self, device: torch.device | str) -> "Dataset":
        return Dataset(self.name, self.train.to(device), self.test.to(device), self.classes, self.mean, self.std)


# ---------------------------------------------------------------------------------------------
# Entry point


def load_dataset(
    name: str,
    data_path: str | os.PathLike | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    num_classes: int = 10,
) -> Dataset:
    """Load `name` on the CPU; `n_train`/`n_test` draw seeded, class-balanced subsets.

    `image_size` and `num_classes` only shape the `synthetic` dataset.
    """
    if name == "synthetic":
        ds = make_synthetic(n_train or 512, n_test or 256, num_classes=num_classes, image_size=image_size, seed=seed)
        return ds  # already of the requested sizes
    if name == "cifar10":
        ds = _load_cifar10(_resolve_path(data_path, required=False))
    elif name == "imagenette":
        ds = _load_imagenette(_resolve_path(data_path, required=True))
    elif name == "imagenet":
        ds = load_imagenet_compatible(_resolve_path(data_path, required=True, layout=IMAGENET_COMPATIBLE_LAYOUT))
    else:
        raise RaystudyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return subsample(ds, n_train, n_test, seed)


def dataset_for(config: "TrainConfig", data_path: str | None = None) -> Dataset:
    """The data a config trains on (on the CPU); `data_path` overrides where it lives."""
    return load_dataset(
        config.dataset,
        data_path or config.data_path,
        config.n_train,
        config.n_test,
        config.data_seed,
        config.image_size,
    )


def test_labels_for(config: "TrainConfig", data_path: str | None = None) -> tuple[torch.Tensor, int]:
    """(labels, number of classes) of the test split `config` evaluates on, without decoding an
    image: the evaluation images are chosen from labels and seeds alone (metrics.hook.eval_indices),
    so the study driver records them without the data's pixels (a cluster's head node need not
    hold the decoded set). A trial's `dataset_for(config).test.labels` are the same labels."""
    path = data_path or config.data_path
    if config.dataset == "synthetic":  # drawn, not read, and small
        synthetic = dataset_for(config, data_path)
        return synthetic.test.labels, synthetic.num_classes
    if config.dataset == "cifar10":
        labels, num_classes = _cifar10_test_labels(_resolve_path(path, required=False))
    elif config.dataset == "imagenette":
        root = _resolve_path(path, required=True)
        _check_imagenette_layout(root)
        classes = _folder_classes(root / "train")
        labels, num_classes = _folder_labels(root / "val", classes), len(classes)
    elif config.dataset == "imagenet":
        root = _resolve_path(path, required=True, layout=IMAGENET_COMPATIBLE_LAYOUT)
        labels, num_classes = torch.tensor(_imagenet_rows(root)[1], dtype=torch.long), IMAGENET_CLASSES
    else:
        raise RaystudyError(f"unknown dataset {config.dataset!r}; known: {', '.join(DATASETS)}")
    if config.n_test:  # as subsample() draws the test split
        labels = labels[torch.as_tensor(balanced_subset(labels, config.n_test, config.data_seed + 1))]
    return labels, num_classes


def _cifar10_test_labels(path: Path | None) -> tuple[torch.Tensor, int]:
    """(labels, classes) in _load_cifar10's order of layouts; python batches (raw arrays, nothing to
    decode) and the download are read as it reads them."""
    batches = path is None or (path / "cifar-10-batches-py").is_dir() or (path / "data_batch_1").is_file()
    if not batches and (path / "test.npz").is_file() and (path / "train.npz").is_file():
        return packed_labels(path / "test.npz"), len(_npz_classes(path / "test.npz"))
    if not batches and (path / "test").is_dir() and (path / "train").is_dir():
        classes = _folder_classes(path / "train")
        return _folder_labels(path / "test", classes), len(classes)
    cifar = _load_cifar10(path)
    return cifar.test.labels, cifar.num_classes


def subsample(ds: Dataset, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    train = ds.train.subset(balanced_subset(ds.train.labels, n_train, seed)) if n_train else ds.train
    test = ds.test.subset(balanced_subset(ds.test.labels, n_test, seed + 1)) if n_test else ds.test
    return Dataset(ds.name, train, test, ds.classes, ds.mean, ds.std)


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """`n` indices drawn at random (seeded), as equal per class as `n` allows, sorted."""
    labels_np = labels.cpu().numpy()
    if n > len(labels_np):
        raise RaystudyError(f"asked for a subset of {n} images but the split has only {len(labels_np)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels_np)
    per_class = np.full(len(classes), n // len(classes))
    per_class[rng.choice(len(classes), n % len(classes), replace=False)] += 1
    picks = []
    for c, k in zip(classes, per_class):
        members = np.flatnonzero(labels_np == c)
        if k > len(members):
            raise RaystudyError(f"class {c} has {len(members)} images, fewer than the {k} a balanced subset needs")
        picks.append(rng.choice(members, k, replace=False))
    return np.sort(np.concatenate(picks))


def _resolve_path(data_path, required: bool, layout: str = "an image folder with train/ and val/") -> Path | None:
    path = data_path or os.environ.get("RAYSTUDY_DATA")
    if not path:
        if required:
            raise RaystudyError(f"no data path: pass --data PATH or set RAYSTUDY_DATA ({layout})")
        return None
    path = Path(path).expanduser()
    if not path.is_dir():
        raise RaystudyError(f"data path {str(path)!r} is not a folder")
    return path


def cache_dir() -> Path:
    root = Path(os.environ.get("RAYSTUDY_CACHE", Path.home() / ".cache" / "raystudy")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _file_lock(name: str):
    """Concurrent trials on one node share the cache; only one decodes or downloads."""
    with open(cache_dir() / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_array(key: str, build) -> np.ndarray:
    """`build()` once per `key`; the result lives in the cache as a .npy (no pickles)."""
    target = cache_dir() / f"{key}.npy"
    with _file_lock(key):
        if not target.exists():
            array = build()
            tmp = target.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, array, allow_pickle=False)
            os.replace(tmp, target)
    return np.load(target, allow_pickle=False)


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def _load_cifar10(path: Path | None) -> Dataset:
    if path is None:
        train, test, classes = _download_cifar10()
    elif (path / "cifar-10-batches-py").is_dir() or (path / "data_batch_1").is_file():
        batches = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        train, test, classes = _read_cifar_batches(batches)
    elif (path / "train.npz").is_file() and (path / "test.npz").is_file():
        train, test = read_packed_jpeg(path / "train.npz"), read_packed_jpeg(path / "test.npz")
        classes = _npz_classes(path / "test.npz")
    elif (path / "train").is_dir() and (path / "test").is_dir():
        train, classes = read_image_folder(path / "train", size=None)
        test, _ = read_image_folder(path / "test", size=None, classes=classes)
    else:
        raise RaystudyError(
            f"{str(path)!r} holds no CIFAR-10 in a known layout: expected cifar-10-batches-py/, "
            "train.npz + test.npz (packed JPEG) or train/<class>/ + test/<class>/ image folders"
        )
    return Dataset("cifar10", train, test, tuple(classes), CIFAR10_MEAN, CIFAR10_STD)


def _download_cifar10():
    """torchvision's download (the archive's MD5 checked) into the cache, for users with internet;
    the batches are then read like any other (read_cifar_pickle, not torchvision's pickle.load)."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    root = cache_dir() / "torchvision"
    try:
        with _file_lock("cifar10-download"):
            if not (root / CIFAR10.base_folder / "batches.meta").is_file():
                download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise RaystudyError(
            f"CIFAR-10 is not on this machine and could not be downloaded ({err}); pass --data PATH or set "
            "RAYSTUDY_DATA to a folder holding cifar-10-batches-py/, train.npz + test.npz, or train/ + test/"
        ) from err
    return _read_cifar_batches(root / CIFAR10.base_folder)


def _read_cifar_batches(folder: Path):
    def read(names):
        images, labels = [], []
        for name in names:
            if not (folder / name).is_file():
                raise RaystudyError(f"{str(folder / name)!r} is missing from the CIFAR-10 batches")
            entry = read_cifar_pickle(folder / name)
            try:
                images.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(label) for label in entry[b"labels"])
            except (KeyError, TypeError, ValueError):
                raise RaystudyError(f"{str(folder / name)!r} is not a CIFAR-10 batch (data, labels)") from None
        if len(labels) != sum(len(i) for i in images) or not all(0 <= label < 10 for label in labels):
            raise RaystudyError(f"{str(folder)!r}: the CIFAR-10 batches' labels do not match their images")
        return Split(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long))

    meta = read_cifar_pickle(folder / "batches.meta")
    try:
        classes = [c.decode() for c in meta[b"label_names"]]
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise RaystudyError(f"{str(folder / 'batches.meta')!r} holds no CIFAR-10 label_names") from None
    return read([f"data_batch_{i}" for i in range(1, 6)]), read(["test_batch"]), classes


# What a CIFAR python batch may be built from: numpy arrays in plain containers. pickle.load would
# call whatever a planted file names (a data folder, or the path a resumed experiment's record gives).
CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes as Python 3 pickles them at protocol 2
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar_pickle(path: Path):
    """A CIFAR-10 python batch (the dataset's own pickle format), numpy arrays and containers only."""
    if not path.is_file():
        raise RaystudyError(f"{str(path)!r} is missing from the CIFAR-10 batches")
    try:
        with open(path, "rb") as handle:
            entry = _ArraysOnlyUnpickler(handle, encoding="bytes").load()
    except Exception as err:  # only the allowed builders run: whatever they raise, the file is at fault
        raise RaystudyError(f"{str(path)!r} is not a CIFAR-10 batch ({str(err)[:200]})") from None
    if not isinstance(entry, dict):
        raise RaystudyError(f"{str(path)!r} is not a CIFAR-10 batch (not a mapping)")
    return entry


def read_packed_jpeg(path: Path) -> Split:
    """Decode a packed-JPEG archive (`jpeg`, `offsets`, `labels`) once; later calls read the cache."""

    def decode() -> np.ndarray:
        import torchvision.io

        with np.load(path, allow_pickle=False) as archive:
            blob, offsets = archive["jpeg"], archive["offsets"]
        chunks = [torch.from_numpy(blob[offsets[i] : offsets[i + 1]]) for i in range(len(offsets) - 1)]
        decoded = torchvision.io.decode_jpeg(chunks, mode=torchvision.io.ImageReadMode.RGB)
        return torch.stack(decoded).numpy()

    images = _cached_array(f"packed-{path.stem}-{_fingerprint(path)}", decode)
    return Split(torch.from_numpy(images), packed_labels(path))


def packed_labels(path: Path) -> torch.Tensor:
    """A packed-JPEG archive's labels alone (an npz member is read on its own: no image is read)."""
    with np.load(path, allow_pickle=False) as archive:
        return torch.from_numpy(archive["labels"].astype(np.int64))


def _npz_classes(path: Path) -> list[str]:
    with np.load(path, allow_pickle=False) as archive:
        return [str(c) for c in archive["classes"]]


# ---------------------------------------------------------------------------------------------
# Image folders (CIFAR exported as files, ImageNette)


def read_image_folder(root: Path, size: int | None, classes: list[str] | None = None) -> tuple[Split, list[str]]:
    """`root/<class>/<image>`; images resized (shorter side) and centre-cropped to `size` if given."""
    classes = classes or _folder_classes(root)
    files = _folder_files(root, classes)

    def decode() -> np.ndarray:
        return torch.stack([_read_image(f, size) for f, _ in files]).numpy()

    key = hashlib.sha1("|".join(f"{f}:{f.stat().st_size}" for f, _ in files).encode()).hexdigest()[:12]
    images = _cached_array(f"folder-{root.name}-{size}-{key}", decode)
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return Split(torch.from_numpy(images), labels), classes


def _folder_classes(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise RaystudyError(f"{str(root)!r} has no class folders")
    return classes


def _folder_files(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(image file, label) of `root/<class>/<image>`, in the order the split holds them."""
    files = [
        (f, label)
        for label, c in enumerate(classes)
        for f in sorted((root / c).glob("*"))
        if f.suffix in IMAGE_SUFFIXES
    ]
    if not files:
        raise RaystudyError(f"{str(root)!r} has no images ({', '.join(IMAGE_SUFFIXES[:3])}) in its class folders")
    return files


def _folder_labels(root: Path, classes: list[str]) -> torch.Tensor:
    return torch.tensor([label for _, label in _folder_files(root, classes)], dtype=torch.long)


def _read_image(path: Path, size: int | None) -> torch.Tensor:
    import torchvision.io
    import torchvision.transforms.v2.functional as TF

    try:
        image = torchvision.io.decode_image(str(path), mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError as err:
        raise RaystudyError(f"cannot decode image {str(path)!r}: {err}") from err
    if size is not None:
        image = TF.center_crop(TF.resize(image, size, antialias=True), [size, size])
    return image


def _check_imagenette_layout(path: Path) -> None:
    if not ((path / "train").is_dir() and (path / "val").is_dir()):
        raise RaystudyError(f"{str(path)!r} is not an ImageNette folder: expected train/<class>/ and val/<class>/")


def _load_imagenette(path: Path) -> Dataset:
    _check_imagenette_layout(path)
    train, classes = read_image_folder(path / "train", size=IMAGENETTE_SIZE)
    test, _ = read_image_folder(path / "val", size=IMAGENETTE_SIZE, classes=classes)
    return Dataset("imagenette", train, test, tuple(classes), IMAGENET_MEAN, IMAGENET_STD)


IMAGENET_CLASSES = 1000
IMAGENET_COMPATIBLE_LAYOUT = (
    "the ImageNet-compatible set's layout: images.csv (ImageId, TrueLabel 1-1000, ...) and images/<ImageId>.png, "
    "as cleverhans' examples/nips17_adversarial_competition/dataset/download_images.py writes it"
)


def load_imagenet_compatible(path: Path) -> Dataset:
    """The NeurIPS'17 "ImageNet-compatible" evaluation set: `images.csv` (ImageId, TrueLabel in
    1..1000, TargetClass, ...) and `images/<ImageId>.png`, resized and centre-cropped to 224 pixels.
    Labels are ImageNet-1k indices (TrueLabel - 1: the csv counts from the background class of
    1001-way Inception models); `categories.csv` (CategoryId, CategoryName), when present, names
    them. An evaluation set only: the training split is empty."""
    files, labels = _imagenet_rows(path)

    def decode() -> np.ndarray:
        return torch.stack([_read_image(f, IMAGENETTE_SIZE) for f in files]).numpy()

    key = hashlib.sha1("|".join(f"{f}:{f.stat().st_size}" for f in files).encode()).hexdigest()[:12]
    images = torch.from_numpy(_cached_array(f"imagenet-compatible-{key}", decode))
    test = Split(images, torch.tensor(labels, dtype=torch.long))
    train = Split(images[:0], test.labels[:0])
    return Dataset("imagenet", train, test, _imagenet_class_names(path), IMAGENET_MEAN, IMAGENET_STD)


def _imagenet_rows(path: Path) -> tuple[list[Path], list[int]]:
    """(image files, labels) of an ImageNet-compatible folder, from its images.csv, checked."""
    import csv

    table = path / "images.csv"
    if not table.is_file() or not (path / "images").is_dir():
        raise RaystudyError(
            f"{str(path)!r} is not an ImageNet-compatible folder: expected {IMAGENET_COMPATIBLE_LAYOUT}"
        )
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"ImageId", "TrueLabel"} <= set(rows[0]):
        raise RaystudyError(f"{str(table)!r} lacks the ImageId and TrueLabel columns")
    files, labels = [], []
    for row in rows:
        label = int(row["TrueLabel"]) - 1
        if not 0 <= label < IMAGENET_CLASSES:
            raise RaystudyError(
                f"{str(table)!r}: image {row['ImageId']} has TrueLabel {row['TrueLabel']} (expected 1-1000)"
            )
        files.append(path / "images" / f"{row['ImageId']}.png")
        labels.append(label)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise RaystudyError(f"{len(missing)} image(s) listed in images.csv are missing, e.g. {missing[0]!r}")
    return files, labels


def _imagenet_class_names(path: Path) -> tuple[str, ...]:
    import csv

    names = [str(i) for i in range(IMAGENET_CLASSES)]
    categories = path / "categories.csv"
    if categories.is_file():
        with open(categories, newline="") as f:
            for row in csv.DictReader(f):
                index = int(row["CategoryId"]) - 1
                if 0 <= index < IMAGENET_CLASSES:
                    names[index] = row["CategoryName"]
    return tuple(names)


# ---------------------------------------------------------------------------------------------
# Synthetic


def make_synthetic(n_train: int, n_test: int, num_classes: int = 10, image_size: int = 32, seed: int = 0) -> Dataset:
    """Class-separable images: a smooth random colour pattern per class plus pixel noise.

    The patterns differ by at most +-0.15 around mid-grey, so models learn them in a few epochs
    and yet L-inf attacks of a few /255 transfer between them (a smoke study shows real ASRs).
    """
    gen = torch.Generator().manual_seed(seed)
    prototypes = 0.5 + (torch.rand(num_classes, 3, 2, 2, generator=gen) - 0.5) * SYNTHETIC_CONTRAST
    prototypes = F.interpolate(prototypes, size=(image_size, image_size), mode="bilinear", align_corners=False)

    def draw(n: int) -> Split:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, 3, image_size, image_size, generator=gen) * 0.1
        images = ((prototypes[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        return Split(images, labels)

    classes = tuple(f"class{i}" for i in range(num_classes))
    return Dataset("synthetic", draw(n_train), draw(n_test), classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


# ---------------------------------------------------------------------------------------------
# Batches on the device


def random_crop_flip(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample random crop from a zero-padded image and a random horizontal flip (any dtype)."""
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), device=device)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=device)
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    flip = torch.rand(b, device=device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def random_resized_crop_flip(
    x: torch.Tensor, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> torch.Tensor:
    """torchvision's RandomResizedCrop (bilinear, back to the input size) + horizontal flip, per sample,
    on float images on their device: area fraction ~ U(scale), log aspect ratio ~ U(log ratio).

    Boxes that would not fit are shrunk to the image instead of redrawn (torchvision redraws up to
    ten times, then falls back to a centre crop); both keep the crop inside the image.
    """
    b, _, h, w = x.shape
    device = x.device
    area = torch.empty(b, device=device).uniform_(*scale)
    log_ratio = torch.empty(b, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    crop_w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # fractions of the side
    crop_h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    left = torch.rand(b, device=device) * (1 - crop_w)
    top = torch.rand(b, device=device) * (1 - crop_h)
    flip = torch.where(torch.rand(b, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = crop_w * flip  # a negative x-scale mirrors the crop
    theta[:, 0, 2] = 2 * left + crop_w - 1  # box centre in [-1, 1] coordinates
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = 2 * top + crop_h - 1
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(images: torch.Tensor) -> torch.Tensor:
    """Training augmentation of uint8 images into [0, 1]: CIFAR-sized images a random crop from a
    4-pixel (side/8) zero padding plus a flip; ImageNet-sized ones a random resized crop plus a flip."""
    if images.shape[-1] <= CIFAR_MAX_INPUT:
        return random_crop_flip(images, max(1, images.shape[-1] // 8)).float().div_(255)
    return random_resized_crop_flip(images.float().div_(255))


def train_batches(
    split: Split, batch_size: int, augment_images: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled batches in [0, 1], the last partial batch dropped (as published)."""
    n = len(split)
    batch_size = min(batch_size, n)
    order = torch.randperm(n, device=split.labels.device)
    for start in range(0, n - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        images = split.images[idx]
        yield (augment(images) if augment_images else images.float().div_(255)), split.labels[idx]


def random_batch(split: Split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` training images drawn uniformly with replacement, each with its own augmentation: the
    fresh, unmixed partners of mixup and cutmix (the published wrapper's random.choice)."""
    idx = torch.randint(0, len(split), (n,), device=split.labels.device)
    return augment(split.images[idx]), split.labels[idx]


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(split), batch_size):
        yield split.images[start : start + batch_size].float().div_(255), split.labels[start : start + batch_size]
