#!/usr/bin/env bash
# The first run on a GPU machine, after the README's install: about 10 minutes on one H100-class GPU.
# 1. the plans of the two calibration studies (`raystudy plan`: time and memory);
# 2. the speed and memory part, on synthetic images (no data needed): every mechanism's training
#    step (exact and finite-difference penalty gradients) timed as training runs it, with its peak
#    memory beside raystudy's planned figure, the packing gain of 4 trials on one GPU, and the
#    trial-end hook's parts and peak (benchmarks/throughput.py);
# 3. with CIFAR-10 (--data), two targets and six ResNet-18 surrogates (ST, SAM, SAM&JR, MU, AT at a
#    small and a large epsilon) on a shortened schedule, their report and the findings' verdicts.
# A study that fails does not stop the others; the script exits 1 at the end if any part failed.
# It writes, named after the device (e.g. nvidia_h100_80gb_hbm3):
#   $OUT/throughput_<device>.json        the costs `raystudy plan --costs` reads (with peak memory)
#   $OUT/calibration_<device>/           report.md/.html, trials.csv, findings.json, COMMANDS.md
#
#   bash benchmarks/gpu_calibration.sh --data /path/to/cifar-10-batches-py   # from the repo root
#   STORAGE=/tmp/calibration OUT=results bash benchmarks/gpu_calibration.sh --data DIR
#   SMOKE=1 bash benchmarks/gpu_calibration.sh                 # a tiny CPU dry run (tests/test_calibration.py)
#
# DATA=DIR works as --data does; without either (and without $RAYSTUDY_DATA) only parts 1-2 run.
# A rerun resumes: finished targets and trials are kept (`raystudy resume`).
set -uo pipefail

DATA=${DATA:-${RAYSTUDY_DATA:-}}
while [ $# -gt 0 ]; do
    case "$1" in
        --data) DATA=${2:?--data needs a folder}; shift 2 ;;
        --data=*) DATA=${1#--data=}; shift ;;
        *) echo "gpu_calibration.sh: unknown argument $1 (use --data DIR)" >&2; exit 2 ;;
    esac
done
# a relative --data is the caller's, not the repository's
if [ -n "$DATA" ] && [ "$DATA" != synthetic ]; then
    [ -d "$DATA" ] || { echo "gpu_calibration.sh: --data $DATA: no such folder" >&2; exit 2; }
    DATA=$(cd "$DATA" && pwd)
fi
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
STORAGE=${STORAGE:-$HOME/raystudy_calibration}
DEVICE=${DEVICE:-cuda}
SPACES=search_spaces
THROUGHPUT=(--device "$DEVICE" --model resnet18 --batch-size 128 --packing 4)
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
    DATA=synthetic
    DEVICE=cpu
    THROUGHPUT=(--device cpu --model tiny_cnn --batch-size 32 --image-size 16 --steps 1 --warmup 0 --rounds 1
        --targets tiny_cnn --n-eval 16 --packing 2 --packing-mechanisms ST)
    RAY=(--num-cpus 2)
fi
PLAN=()
if [ "${DEVICE#cuda}" != "$DEVICE" ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_calibration.sh: torch sees no CUDA device here; run it on the GPU machine (or SMOKE=1 for a CPU dry run)" >&2
    exit 2
fi
NAME=$(python -c "
import re, sys, torch
name = torch.cuda.get_device_name(sys.argv[1]) if sys.argv[1].startswith('cuda') else 'cpu'
print(re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_'))" "$DEVICE")
if [ "${DEVICE#cuda}" != "$DEVICE" ]; then  # plan memory for this card, not cluster.yaml's
    PLAN=(--gpu-memory "$(python -c "import sys, torch; print(torch.cuda.get_device_properties(sys.argv[1]).total_memory >> 20)" "$DEVICE")MiB")
fi
REPORT="$OUT/calibration_$NAME"
COSTS="$OUT/throughput_$NAME.json"
DATA_FLAG=()
[ -n "$DATA" ] && [ "$DATA" != synthetic ] && DATA_FLAG=(--data "$DATA")
FAILED=()
run() { echo "+ $*"; "$@" || { echo "FAILED ($?): $*"; FAILED+=("$*"); return 1; }; }
resume_or() {  # a rerun finishes the experiment instead of refusing it
    local verb=$1 space=$2 name
    name=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$space")
    if [ -f "$STORAGE/$name/raystudy-study.json" ]; then
        run raystudy resume "$STORAGE/$name" ${RAY[@]+"${RAY[@]}"}
    else
        run raystudy "$verb" "$space" --storage "$STORAGE" ${DATA_FLAG[@]+"${DATA_FLAG[@]}"} ${RAY[@]+"${RAY[@]}"}
    fi
}

mkdir -p "$REPORT"
run raystudy plan "$SPACES/calibration_targets.yaml" ${PLAN[@]+"${PLAN[@]}"}
run raystudy plan "$SPACES/calibration.yaml" ${PLAN[@]+"${PLAN[@]}"}
start=$(date +%s)
if [ -f "$COSTS" ]; then  # a rerun finishes what is missing: delete the file to measure again
    echo "step costs kept from an earlier run: $COSTS"
else
    run python benchmarks/throughput.py "${THROUGHPUT[@]}" --json "$COSTS"
fi
if [ -z "$DATA" ]; then
    echo "no CIFAR-10 given: the studies are skipped; rerun with --data DIR (cifar-10-batches-py, or the JPEG archive's folder)"
else
    resume_or targets "$SPACES/calibration_targets.yaml" && resume_or run "$SPACES/calibration.yaml"
    run raystudy analyze "$STORAGE/calibration_targets" "$STORAGE/calibration" --out "$REPORT"
    run raystudy findings "$STORAGE/calibration" --json "$REPORT/findings.json"
fi
cat > "$REPORT/COMMANDS.md" <<EOF
Made by \`benchmarks/gpu_calibration.sh\` (SMOKE=${SMOKE:-0}, DEVICE=$DEVICE, data: ${DATA:-none}) in
$(( $(date +%s) - start )) s after the plans, on $NAME: step costs, peak memory and packing from
\`python benchmarks/throughput.py ${THROUGHPUT[*]} --json $COSTS\`; targets and surrogates from
search_spaces/calibration_targets.yaml and calibration.yaml.
Failed parts: ${FAILED[*]:-none}.
EOF
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'gpu_calibration.sh: %d part(s) failed:\n' "${#FAILED[@]}"
    printf '  %s\n' "${FAILED[@]}"
    exit 1
fi
