"""A trial's peak GPU memory, planned before launch, against its share of a named card.

Estimates come from each model's bytes saved for backward per image (MEASURED: measured on the CPU
by `benchmarks/activation_memory.py`, `raystudy.core.activation_memory`) and its weights' bytes, scaled
to the trial's batches:

- training: weights, gradients and momentum (SAM: one more copy), the dataset kept on the device
  (uint8), and the step's saved activations: batch x bytes per image x the mechanism's factor
  (STEP_FACTOR: a step that differentiates a gradient keeps the forward and the backward graph);
- the trial-end hook: the surrogate's and every target's weights (targets move to the device for
  the hook only), the evaluation set, and the largest part at the evaluation batch: smoothness
  (a double backward through the surrogate), similarity (a backward through the surrogate, then
  through each target in turn), the attacks (a backward through the surrogate or one LGV member),
  the defenses (their buffers before a target's forward, which keeps no graph); an LGV ensemble is
  differentiated member by member, so one member's graph at a time. What the evaluation settings
  add (HookShape): Lanczos keeps its Krylov basis (one image-sized vector per product), an attack
  whose copies' graphs are alive at once (torchattack's BSR, Admix, MIG, FDA, L2T) keeps that many
  graphs, torchattack crafts on a copy of the whole surrogate, torchattack's attacks and AutoAttack
  run an LGV ensemble's every member in each forward, and a median defense copies each pixel's window.

A trial's share is `resources.gpu` x the card's memory less CUDA_CONTEXT (the context every process
makes sits outside PyTorch's per-process cap). Allocator slack is added on top (ALLOCATOR_SLACK).
The calibration script measures the real peaks on a GPU (`torch.cuda.max_memory_allocated`) to
hold these against. No torch here: `raystudy plan` imports it without loading torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from raystudy.config.defense import RESIZE_PAD_RATIO, parse_defense
from raystudy.config.torchattack import images_per_forward, is_torchattack
from raystudy.errors import RaystudyError

GiB = 1 << 30
CUDA_CONTEXT = 1 * GiB  # raystudy.core.precision.CUDA_CONTEXT_BYTES: kept out of each trial's cap
ALLOCATOR_SLACK = 1.15  # the caching allocator's rounding and fragmentation
# A double backward (exact IR/JR/ER, smoothness's HVPs) keeps the forward graph and the backward
# graph built to differentiate it: about twice the forward's saved bytes, three with the forward.
DOUBLE_BACKWARD_FACTOR = 3.0
# An ensemble member's Hessian-vector product (raystudy.metrics.smoothness._ensemble_hvp) also keeps
# the graph of its Jacobian-vector product: 3.3x the forward's bytes measured on a ResNet-18.
ENSEMBLE_HVP_FACTOR = 4.0
FINITE_DIFFERENCE_FACTOR = 2.0  # two forward graphs alive (the pattern held from the first)

# (saved bytes per image for backward, weights' bytes) of NAME@PIXELS, CIFAR variants at 32 px and
# below, timm models above: `python benchmarks/activation_memory.py` (CPU, batches 2 and 4, fp32).
MEASURED: dict[str, tuple[int, int]] = {
    "resnet18@32": (4700208, 44695848),
    "resnet50@32": (25514032, 94083368),
    "vgg16@32": (2598960, 58913064),
    "inception_v3@32": (47054896, 86555816),
    "densenet121@32": (40288304, 27825704),
    "resnet8@32": (651568, 312168),
    "vgg_small@32": (553264, 291816),
    "tiny_cnn@16": (64688, 22056),
    "resnet50@224": (85909552, 94114088),
    "vgg16@224": (73205808, 537206056),
    "densenet121@224": (130361392, 27856424),
    "mobilenetv2_100@224": (78204464, 8946728),
    "xception41@224": (178509360, 99764200),
    "vit_base_patch16_224@224": (118160728, 343225384),
    "vit_base_patch32_224@224": (30439360, 349851688),
    "inception_v3@224": (50528816, 87224232),
    "inception_resnet_v2@224": (92990256, 217287336),
}

# GPU memory of the cards of common cloud instance types (cluster.yaml's worker `InstanceType` or
# `machineType`), for `raystudy plan` without --gpu-memory: what nvidia-smi reports, in MiB (less
# than the GB a card is sold as).
MiB = 1 << 20
INSTANCE_GPU_MEMORY = {
    "g4dn": 15_360 * MiB,  # T4
    "g5": 23_028 * MiB,  # A10G
    "g6": 23_034 * MiB,  # L4
    "g6e": 46_068 * MiB,  # L40S
    "p3": 16_384 * MiB,  # V100 16 GB
    "p4d": 40_960 * MiB,  # A100 40 GB
    "p4de": 81_920 * MiB,  # A100 80 GB
    "p5": 81_559 * MiB,  # H100 80 GB
    "p5e": 143_771 * MiB,  # H200
    "a2-highgpu": 40_960 * MiB,  # GCP A100 40 GB
    "a2-ultragpu": 81_920 * MiB,  # GCP A100 80 GB
    "a3-highgpu": 81_559 * MiB,  # GCP H100
    "g2-standard": 23_034 * MiB,  # GCP L4
}
DATASET_PIXELS = {"cifar10": 32, "imagenette": 224, "imagenet": 224}
DATASET_TRAIN_IMAGES = {"cifar10": 50_000, "imagenette": 9_469, "imagenet": 0, "synthetic": 512}
DATASET_TEST_IMAGES = {"cifar10": 10_000, "imagenette": 3_925, "imagenet": 0, "synthetic": 256}


@dataclass(frozen=True)
class ModelBytes:
    name: str
    saved_per_image: float  # bytes autograd saves per image for one backward
    weights: float  # bytes of the parameters (fp32)
    scaled_from: str | None = None  # the measured size it was scaled from, if not measured at this one


def model_bytes(model: str, pixels: int) -> ModelBytes | None:
    """`model` at `pixels` px: measured, else the same model measured at another size with its
    saved bytes scaled by the pixel count (convolutions save per pixel), else None."""
    architecture = model.removeprefix("timm/").split(".")[0]
    key = f"{architecture}@{pixels}"
    if key in MEASURED:
        return ModelBytes(key, *map(float, MEASURED[key]))
    same = sorted((k for k in MEASURED if k.rsplit("@", 1)[0] == architecture), key=lambda k: int(k.rsplit("@")[1]))
    # a CIFAR variant (<= 32 px) and a timm model (above) of the same name are different networks
    same = [k for k in same if (int(k.rsplit("@")[1]) <= 32) == (pixels <= 32)]
    if not same:
        return None
    base = min(same, key=lambda k: abs(int(k.rsplit("@")[1]) - pixels))
    saved, weights = MEASURED[base]
    return ModelBytes(key, saved * (pixels / int(base.rsplit("@")[1])) ** 2, float(weights), scaled_from=base)


@dataclass(frozen=True)
class TrialMemory:
    """A setting's planned memory in bytes, slack included: each phase as fixed + per-image x batch."""

    label: str
    training_fixed: float  # weights, optimizer state, dataset (0 for a loaded model)
    training_per_image: float  # saved activations per image of the training batch
    train_batch: int
    hook_fixed: float  # every model's weights and the evaluation set
    hook_per_image: float  # the hook's largest part per image of its batch
    eval_batch: int
    hook_part: str  # the hook's largest part
    unknown: tuple[str, ...] = ()  # models without a measurement: left out of the estimate

    @property
    def training(self) -> float:
        return self.training_fixed + self.training_per_image * self.train_batch

    def hook_at(self, batch: int) -> float:
        return self.hook_fixed + self.hook_per_image * batch

    @property
    def hook(self) -> float:
        return self.hook_at(self.eval_batch)

    def hook_batch_within(self, cap: float) -> int:
        """The evaluation batch the hook runs at under `cap`: halved from its own until it fits
        (as the hook does on an out-of-memory error), 0 if not even one image fits."""
        batch = self.eval_batch
        while batch > 1 and self.hook_at(batch) > cap:
            batch //= 2
        return batch if self.hook_at(batch) <= cap else 0

    def largest_train_batch(self, cap: float) -> int:
        return int((cap - self.training_fixed) // self.training_per_image) if self.training_per_image else 0


# Image-sized float vectors each smoothness estimate keeps per image besides the graph: power
# iteration its iterate, its product and the start; Lanczos also its basis, one per product.
POWER_VECTORS = 3


@dataclass(frozen=True)
class HookShape:
    """What the evaluation settings add to the hook's memory (HookShape.of(EvalConfig))."""

    smoothness_vectors: int = POWER_VECTORS  # float images kept per image by the estimator
    # Images per image whose graphs one step keeps alive, of the attacks that differentiate the whole
    # surrogate at once (0: none): torchattack's and AutoAttack. An LGV ensemble then runs every
    # member in each forward (raystudy's own iterative attacks go member by member).
    whole_surrogate_copies: float = 0.0
    surrogate_copy: bool = False  # torchattack crafts on a copy of the surrogate
    defense_images: float = 0.0  # float images per image the largest defense holds at once

    @classmethod
    def of(cls, evaluation: Any) -> "HookShape":
        lanczos = evaluation.smoothness_method == "lanczos"
        theirs = [a for a in evaluation.attacks if is_torchattack(a)]
        whole = [images_per_forward(a, evaluation.options_of(a)) for a in theirs]
        return cls(
            smoothness_vectors=evaluation.lanczos_iterations + POWER_VECTORS if lanczos else POWER_VECTORS,
            whole_surrogate_copies=max(whole + ([1.0] if "autoattack" in evaluation.attacks else []), default=0.0),
            surrogate_copy=bool(theirs),
            defense_images=max([defense_images(d) for d in evaluation.defenses] or [0.0]),
        )


def defense_images(defense: str) -> float:
    """Float images per image that `defense` holds at once on the device: its input and output, and
    a median's windows (K x K copies of each pixel, reshaped for torch.median), resize-and-pad's
    larger canvas. JPEG runs on the host: only its output comes back."""
    largest = 0.0
    for step in parse_defense(defense):
        if step.kind == "median":
            held = step.value**2 + 4  # the windows, the padded input, the values and their int64 indices
        elif step.kind == "resize_pad":
            ratio = step.value if step.value is not None else RESIZE_PAD_RATIO
            held = 2 * ratio**2  # the canvas and the resized image inside it
        else:
            held = 1.0
        largest = max(largest, 1 + held)
    return largest


def step_factor(shape: Any) -> float:
    """Saved activations of one training step relative to a plain forward/backward, from the step's
    shape (`TrainConfig.shape()`: raystudy.mechanisms.StepShape)."""
    if shape is None:
        return 1.0
    if shape.double_backward:
        return DOUBLE_BACKWARD_FACTOR
    if shape.takes_finite_differences:
        return FINITE_DIFFERENCE_FACTOR
    return 1.0  # an attack's steps and SAM's two passes run one after the other


def trial_memory(
    label: str,
    surrogate: ModelBytes | None,
    targets: Sequence[ModelBytes | None],
    *,
    pixels: int,
    train_batch: int,
    train_images: int,
    eval_batch: int,
    eval_images: int,
    shape: Any = None,
    trains: bool = True,
    lgv_members: int = 0,
    lgv_batch: int = 0,
    lgv_shape: Any = None,
    hook_shape: HookShape = HookShape(),
) -> TrialMemory:
    """The two phases' memory, in bytes, with allocator slack (module docstring)."""
    unknown = tuple(["surrogate"] if surrogate is None else []) + tuple(
        f"target {i + 1}" for i, t in enumerate(targets) if t is None
    )
    known = [t for t in targets if t is not None]
    s = surrogate or ModelBytes("unknown", 0.0, 0.0)
    image = 3 * pixels * pixels
    training_fixed = training_per_image = 0.0
    if trains:
        sam = any(x is not None and x.sam for x in (shape, lgv_shape if lgv_members else None))
        state = s.weights * (4 if sam else 3)  # weights, gradients, momentum (+ SAM's saved weights)
        training_fixed = state + train_images * image  # the dataset, uint8 on the device
        # LGV fine-tunes at its own batch with its base's step (ST, SAM or SAM&JR): the larger step
        lgv_step = s.saved_per_image * step_factor(lgv_shape) * lgv_batch / max(1, train_batch) if lgv_members else 0
        training_per_image = max(s.saved_per_image * step_factor(shape), lgv_step)
    members = max(1, lgv_members)
    # the evaluation set kept as uint8 and in use as float32, and the attacks' float32 AEs of it
    hook_fixed = s.weights * members + sum(t.weights for t in known) + eval_images * image * (1 + 4 + 4)
    copies = hook_shape.whole_surrogate_copies
    hook_fixed += s.weights * members if hook_shape.surrogate_copy else 0  # torchattack's copy of the surrogate
    floats = image * 4
    parts = {  # per image of the hook's batch
        "smoothness": s.saved_per_image * (ENSEMBLE_HVP_FACTOR if lgv_members else DOUBLE_BACKWARD_FACTOR)
        + hook_shape.smoothness_vectors * floats,
        "similarity": max([s.saved_per_image, *(t.saved_per_image for t in known)]),
        # the graph (each copy's, every member's for the whole surrogate) and the copies, the AE, its gradient
        "attacks": max(s.saved_per_image + floats, copies * (members * s.saved_per_image + floats)) + 2 * floats,
        "defenses": hook_shape.defense_images * floats,
    }
    part = max(parts, key=parts.get)
    slack = ALLOCATOR_SLACK
    return TrialMemory(
        label,
        training_fixed * slack,
        training_per_image * slack,
        train_batch,
        hook_fixed * slack,
        parts[part] * slack if eval_batch else 0.0,
        eval_batch,
        part,
        unknown,
    )


def share_bytes(gpu_share: float, card: float) -> float:
    """What a trial with `gpu_share` of a `card`-byte GPU may allocate (raystudy.core.precision's cap)."""
    return gpu_share * card - CUDA_CONTEXT


def parse_memory(text: str) -> float:
    """`24GiB`, `24GB` (taken as GiB, as cards are sold), `80G`, `16384MiB` -> bytes; one line if not."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([GM])(?:i?B)?\s*", text or "", re.IGNORECASE)
    if not match or not 0 < float(match[1]) < 1e6:
        raise RaystudyError(f"--gpu-memory {str(text)[:40]!r}: give the card's memory, e.g. 24GiB or 80GiB")
    return float(match[1]) * (GiB if match[2].upper() == "G" else 1 << 20)


@dataclass(frozen=True)
class Card:
    memory: float  # bytes of one GPU
    what: str  # where the figure comes from
    cpus_per_gpu: float | None = None  # the node's CPUs over its GPUs, where the file says


def card_from_cluster(path: str | Path) -> Card | None:
    """The GPU worker's card in a Ray cluster launcher file, from its instance type, and its CPUs
    per GPU from its `resources: {CPU: n, GPU: m}`."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        config = yaml.safe_load(text) if len(text) < 1 << 20 else None
    except (OSError, ValueError, yaml.YAMLError):
        return None
    types = config.get("available_node_types") if isinstance(config, dict) else None
    for name, node in types.items() if isinstance(types, dict) else ():
        node_config = node.get("node_config") if isinstance(node, dict) else None
        if not isinstance(node_config, dict):
            continue
        instance = node_config.get("InstanceType") or node_config.get("machineType")
        if not isinstance(instance, str):
            continue
        family = instance.split(".")[0] if "." in instance else instance.rsplit("-", 1)[0]
        if family in INSTANCE_GPU_MEMORY:
            resources = node.get("resources") if isinstance(node.get("resources"), dict) else {}
            cpus, gpus = resources.get("CPU"), resources.get("GPU")
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (cpus, gpus))
            per_gpu = cpus / gpus if numbers else None
            return Card(float(INSTANCE_GPU_MEMORY[family]), f"{name}'s {instance} in {path}", per_gpu)
    return None


def fitting_share(peak: float, card: float) -> float:
    """The smallest GPU share, in twentieths, whose cap holds `peak` (above 1: no share does)."""
    return math.ceil((peak + CUDA_CONTEXT) * 20 / card) / 20


def gib(value: float) -> str:
    return f"{value / GiB:.1f} GiB"
