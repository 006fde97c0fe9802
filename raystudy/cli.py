"""The `raystudy` command. User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from raystudy.errors import RaystudyError


def _fmt(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


def cmd_mechanisms(args: argparse.Namespace) -> int:
    from raystudy.mechanisms import MECHANISMS

    rows = [("mechanism", "magnitude", "CIFAR-10 grid", "ImageNette grid", "default (C10 / IN)", "what a step does")]
    for spec in MECHANISMS.values():
        if not spec.params:
            rows.append((spec.name, "-", "-", "-", "-", spec.summary))
        for i, p in enumerate(spec.params):
            default = f"{p.defaults['cifar10']:g} / {p.defaults['imagenette']:g}"
            if spec.tau5:  # augmentations: the headline table's two magnitudes
                default = f"tau1 {default}; tau5 {spec.tau5['cifar10'][p.name]:g} / {spec.tau5['imagenette'][p.name]:g}"
            rows.append((spec.name if i == 0 else "", p.name, _fmt(p.grids["cifar10"]), _fmt(p.grids["imagenette"]),
                         default, spec.summary if i == 0 else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raystudy.config import TrainConfig
    from raystudy.mechanisms import get_mechanism, parse_magnitudes
    from raystudy.train import MODEL_FILE, train

    recipe_name = args.lgv_base if args.mechanism == "LGV" else args.mechanism
    magnitudes = parse_magnitudes(args.magnitude, get_mechanism(recipe_name))
    config = TrainConfig.from_preset(
        args.preset, dataset=args.dataset, model=args.model, mechanism=args.mechanism, magnitudes=magnitudes,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, precision=args.precision, seed=args.seed, deterministic=args.deterministic,
        checkpoint_every=args.checkpoint_every, n_train=args.n_train, n_test=args.n_test, image_size=args.image_size,
        pretrained=args.pretrained, init_checkpoint=args.init, lgv_base=args.lgv_base,
        snapshots_per_epoch=args.lgv_models_per_epoch, data_path=args.data,
    )
    magnitude_text = ", ".join(f"{k}={v:g}" for k, v in config.magnitudes) or "no magnitude"
    print(f"training {config.model} on {config.dataset} with {config.mechanism} ({magnitude_text}), "
          f"{config.epochs} epochs, batch {config.batch_size}, seed {config.seed} -> {args.out}", flush=True)
    result = train(config, out_dir=args.out, device=args.device, log=lambda line: print(line, flush=True))
    last = result.history[-1] if result.history else {}
    print(f"done: test accuracy {100 * last.get('test_acc', float('nan')):.2f}%; weights in {args.out}/{MODEL_FILE}")
    if result.snapshots:
        print(f"LGV ensemble: {len(result.snapshots)} models in {result.snapshots[0].parent}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _add_train(sub) -> None:
    from raystudy.config import PRECISIONS, PRESETS

    p = sub.add_parser("train", help="train one model (surrogate, target or LGV ensemble)",
                       description="Train one model; rerun with the same --out to resume after an interruption.")
    p.add_argument("--dataset", default="cifar10", help="cifar10, imagenette or synthetic (default cifar10)")
    p.add_argument("--data", help="data folder (default: $RAYSTUDY_DATA, else download CIFAR-10)")
    p.add_argument("--model", default="resnet18", help="architecture (default resnet18)")
    p.add_argument("--mechanism", default="ST", help="training mechanism (see `raystudy mechanisms`; default ST)")
    p.add_argument("--magnitude", help="e.g. 0.5, or rho=0.1,lambda_jr=1e-4 (default: the mechanism's default)")
    p.add_argument("--preset", default="faithful", choices=sorted(PRESETS), help="schedule preset (default faithful)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=_positive_int)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--seed", type=_positive_int, default=0)
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (bit-exact resume on GPU)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=1, help="epochs between checkpoints (default 1)")
    p.add_argument("--n-train", type=_positive_int, help="seeded class-balanced training subset")
    p.add_argument("--n-test", type=_positive_int, help="seeded class-balanced test subset")
    p.add_argument("--image-size", type=_positive_int, default=32, help="synthetic data only (default 32)")
    p.add_argument("--pretrained", action="store_true", help="start from timm's ImageNet weights (needs network)")
    p.add_argument("--init", help="start from this model file (required for LGV)")
    p.add_argument("--lgv-base", default="ST", help="LGV's update: ST, SAM or SAM&JR (default ST)")
    p.add_argument("--lgv-models-per-epoch", type=_positive_int, help="LGV snapshots per epoch (default 4)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, model.pt, metrics.json")
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raystudy", description="Surrogate training for transfer attacks, studied with Ray Tune.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("mechanisms", help="list the training mechanisms, their magnitudes and grids").set_defaults(func=cmd_mechanisms)
    _add_train(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RaystudyError as err:
        print(f"raystudy: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raystudy: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
