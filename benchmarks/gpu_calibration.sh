#!/usr/bin/env bash
# The first run on a GPU: about 8 minutes on one H100-class GPU (`raystudy plan` says so first).
# It trains two CIFAR-10 targets and six ResNet-18 surrogates (ST, SAM, SAM&JR, MU, AT at a small
# and a large epsilon) on a shortened schedule, times every mechanism's step (exact and
# finite-difference penalty gradients) with benchmarks/throughput.py, and writes
#   $OUT/throughput_h100.json          the costs `raystudy plan --costs` reads
#   $OUT/calibration_h100/             report.md/.html, trials.csv, findings.json, the commands
# then prints the verdicts on the paper's findings.
#
#   bash benchmarks/gpu_calibration.sh                         # on the GPU machine, from the repo root
#   DATA=/path/to/cifar10-jpeg STORAGE=/tmp/calibration bash benchmarks/gpu_calibration.sh
#   SMOKE=1 bash benchmarks/gpu_calibration.sh                 # a tiny CPU dry run (tests/test_calibration.py)
#
# A rerun resumes: finished targets and trials are kept (`raystudy resume`).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-results}
STORAGE=${STORAGE:-$HOME/raystudy_calibration}
DATA=${DATA:-../shared/data/cifar10-jpeg}
DEVICE=${DEVICE:-cuda}
SPACES=search_spaces
THROUGHPUT=(--device "$DEVICE" --model resnet18 --batch-size 128)
RAY=()
if [ "${SMOKE:-0}" = 1 ]; then
    # The same steps on synthetic data with tiny models, a few seconds each: a dry run of the script.
    SPACES=$(mktemp -d)
    python - "$SPACES" <<'PY'
import sys
from pathlib import Path

import yaml

out = Path(sys.argv[1])
tiny = {"dataset": "synthetic", "model": "tiny_cnn", "resources": {"cpu": 1}}
train = {"epochs": 1, "warmup_epochs": 0, "batch_size": 32, "n_train": 256, "n_test": 64, "image_size": 16}
for name in ("calibration_targets", "calibration"):
    space = yaml.safe_load(Path(f"search_spaces/{name}.yaml").read_text())
    space.update(tiny, train=train)
    if name == "calibration":
        space["evaluation"].update(n_eval=32, budgets=[8], smoothness_samples=8)
    else:
        space["trials"] = [{"model": "tiny_cnn"}, {"model": "tiny_cnn", "mechanism": "MU", "magnitudes": {"p": 0.5}}]
    (out / f"{name}.yaml").write_text(yaml.safe_dump(space))
PY
    DATA=""
    DEVICE=cpu
    THROUGHPUT=(--device cpu --model tiny_cnn --batch-size 32 --image-size 16 --steps 1 --warmup 0 --rounds 1
        --targets tiny_cnn --n-eval 16)
    RAY=(--num-cpus 2)
fi
DATA_FLAG=()
[ -n "$DATA" ] && DATA_FLAG=(--data "$DATA")
run() { echo "+ $*"; "$@"; }
resume_or() {  # a rerun finishes the experiment instead of refusing it
    local verb=$1 space=$2 name
    name=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$space")
    if [ -f "$STORAGE/$name/raystudy-study.json" ]; then
        run raystudy resume "$STORAGE/$name" "${RAY[@]}"
    else
        run raystudy "$verb" "$space" --storage "$STORAGE" "${DATA_FLAG[@]}" "${RAY[@]}"
    fi
}

mkdir -p "$OUT/calibration_h100"
run raystudy plan "$SPACES/calibration_targets.yaml"
run raystudy plan "$SPACES/calibration.yaml"
start=$(date +%s)
resume_or targets "$SPACES/calibration_targets.yaml"
resume_or run "$SPACES/calibration.yaml"
run python benchmarks/throughput.py "${THROUGHPUT[@]}" --json "$OUT/throughput_h100.json"
run raystudy analyze "$STORAGE/calibration_targets" "$STORAGE/calibration" --out "$OUT/calibration_h100"
run raystudy findings "$STORAGE/calibration" --json "$OUT/calibration_h100/findings.json"
cat > "$OUT/calibration_h100/COMMANDS.md" <<EOF
Made by \`benchmarks/gpu_calibration.sh\` (SMOKE=${SMOKE:-0}, DEVICE=$DEVICE) in $(( $(date +%s) - start )) s
after the plans, on $(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"):
targets and surrogates from search_spaces/calibration_targets.yaml and calibration.yaml, step costs from
\`python benchmarks/throughput.py ${THROUGHPUT[*]} --json $OUT/throughput_h100.json\`.
EOF
