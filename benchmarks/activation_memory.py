"""Measure the bytes autograd saves per image (and the weights' bytes) of every model the shipped
studies use, on the CPU, and print them as the table `raystudy/budget/memory.py` holds (MEASURED).

    python benchmarks/activation_memory.py [--model resnet18@32 ...] [--json results/activation_memory.json]

A model is NAME@PIXELS: a CIFAR variant at 32 px or below, any timm architecture above (weights
are not needed: the graph's size does not depend on them). Minutes on 2 cores for the whole list.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raystudy.core.activation_memory import measure  # noqa: E402

SHIPPED = [
    *(f"{m}@32" for m in ("resnet18", "resnet50", "vgg16", "inception_v3", "densenet121", "resnet8", "vgg_small")),
    "tiny_cnn@16",
    *(f"{m}@224" for m in ("resnet50", "vgg16", "densenet121", "mobilenetv2_100", "xception41")),
    *(f"{m}@224" for m in ("vit_base_patch16_224", "vit_base_patch32_224", "inception_v3", "inception_resnet_v2")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="NAME@PIXELS (default: every shipped one)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    table = {}
    for key in args.model or SHIPPED:
        name, pixels = key.rsplit("@", 1)
        start = time.perf_counter()
        found = measure(name, int(pixels))
        table[key] = (round(found["saved_bytes_per_image"]), round(found["parameter_bytes"]))
        print(
            f"# {key}: {found['saved_bytes_per_image'] / 2**20:.2f} MiB saved per image, "
            f"{found['parameter_bytes'] / 2**20:.1f} MiB of weights ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    print("MEASURED = {")
    for key, (saved, weights) in table.items():
        print(f'    "{key}": ({saved}, {weights}),')
    print("}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "bytes": table}, indent=1))


if __name__ == "__main__":
    main()
