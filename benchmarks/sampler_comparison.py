"""Which Optuna sampler finds the best SAM&JR configuration of the smoke search within a fixed number
of trials: each sampler (raystudy's written-out settings) with several seeds, every trial trained and
measured in this process exactly as a study's trial is (raystudy.training.trial.run_one_trial, the
function Ray's trainable wraps), told its objective before the next is asked (one trial at a time).

    python benchmarks/sampler_comparison.py --targets runs --trials 16 --seeds 0 1 2 \\
        --samplers tpe cmaes gp random --n-eval 128 --csv results/sampler_comparison.csv

`--targets`: a storage holding the smoke targets (`raystudy targets search_spaces/smoke_targets.yaml
--storage runs`). Prints, per sampler and seed, the best objective after 4, 8, ... trials.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch
import yaml

from raystudy.cluster.searcher import SearchSpace, build_sampler
from raystudy.config import parse_space
from raystudy.config.sampler import parse_sampler
from raystudy.core.data import dataset_for
from raystudy.training.trial import FINAL_KEY, TrialContext, run_one_trial

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVE = "asr/pgd/untargeted/8/mean"


def smoke_search(n_eval: int) -> dict:
    """The smoke search (search_spaces/smoke_optuna.yaml) on `n_eval` images."""
    space = yaml.safe_load((ROOT / "search_spaces" / "smoke_optuna.yaml").read_text())
    space.update(name="sampler_comparison", evaluation={**space["evaluation"], "n_eval": n_eval})
    return space


def measure(spec, config: dict, targets: Path, work: Path) -> float:
    """The objective of one sample: its trial trained and measured here."""
    plan = spec.plan_for_sample(config)
    final = {}

    def report(metrics: dict, state_path) -> None:
        if metrics.get(FINAL_KEY) == 1:
            final.update(metrics)

    folder = Path(tempfile.mkdtemp(dir=work))
    context = TrialContext(spec, str(targets), str(folder), folder / "work", torch.device("cpu"))
    (folder / "work").mkdir()
    run_one_trial(plan, context, dataset_for(plan.train), report)
    return float(final[OBJECTIVE])


def search(spec, sampler_name: str, seed: int, trials: int, targets: Path, work: Path) -> list[float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = build_sampler(parse_sampler(sampler_name, "--samplers"), seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    space = SearchSpace.of(spec)
    values = []
    for _ in range(trials):
        trial = study.ask()
        value = measure(spec, space.draw(trial), targets, work)
        study.tell(trial, value)
        values.append(value)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=Path, required=True, help="storage holding smoke_targets/targets")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["tpe", "cmaes", "gp"])
    parser.add_argument("--n-eval", type=int, default=32, help="evaluation images (the objective's resolution)")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = parse_space(smoke_search(args.n_eval), str(ROOT / "search_spaces" / "sampler_comparison.yaml"))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.samplers:
            for seed in args.seeds:
                start = time.time()
                values = search(spec, name, seed, args.trials, args.targets, Path(work))
                best = [max(values[: i + 1]) for i in range(len(values))]
                rows.append(
                    {"sampler": name, "seed": seed, "n_eval": args.n_eval}
                    | {f"best_after_{i + 1}": b for i, b in enumerate(best)}
                )
                marks = ", ".join(f"{i}: {best[i - 1]:.3f}" for i in range(4, args.trials + 1, 4))
                print(f"{name:6s} seed {seed}: best after {marks}  ({time.time() - start:.0f} s)", flush=True)
    if args.csv:
        with args.csv.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
