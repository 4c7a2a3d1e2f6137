#!/usr/bin/env bash
# First run on a GPU: every CUDA path of the app, exercised and measured in one go (under 8 minutes on an H100/H200).
#
#   scripts/gpu_check.sh              # needs an NVIDIA GPU: stops at once, with exit code 3, if torch sees none
#   scripts/gpu_check.sh --cpu        # the same steps, small, on the CPU (what the test suite runs to keep it working)
#   scripts/gpu_check.sh --out DIR    # where the JSON files go (default: gpu-check/)
#
# Steps, each recorded as ok/failed in DIR/steps.json (a failed step does not stop the others; the exit code says):
#   tests      tests/unit/test_device_paths.py on the device: every model's forward at the app's precision and batch
#              and an optimiser step, for tiny and vit_b (random weights in the official layout)
#   benchmark  scripts/benchmark.py for hf_sam and masg_sam (vit_b) and fgnet: slices/s, share of the measured bf16
#              matmul peak, the embedding cache, peak GPU memory, and the update latency (label saved -> new adapter
#              served: the training run plus the next infer, which serves the new version)
#   ddp        one update through MONAI Label's multi_gpu path over NCCL (scripts/gpu_check.py ddp)
#   report     DIR/gpu_check.json with the GPU's name, and a table against the goals
#
# On a machine whose Python lacks the app's packages (monai, monailabel, nibabel, ...), scripts/gpu_wheels.sh fills
# .whl/ here with wheels for that Python (about 47 MB for Python 3.12), and this script installs them into a private
# folder first; the sample data is then built there (prepare_sample_data.py, nilearn among the wheels). On the lent
# H200: run(command="scripts/gpu_check.sh --out $OUT/check", carry=[".whl"]).
set -uo pipefail
cd "$(dirname "$0")/.."

CPU=0
OUT=gpu-check
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --out) OUT="$2"; shift ;;
        *) echo "gpu_check: unknown option $1 (valid: --cpu, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .whl ] && ! "$PY" -c "import monailabel" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/samfewshot-site .whl/*.whl || exit 4
    export PYTHONPATH=/tmp/samfewshot-site${PYTHONPATH:+:$PYTHONPATH}
fi
export MONAI_LABEL_TRACKING_ENABLED=false PYTHONUNBUFFERED=1

if [ "$CPU" = 1 ]; then
    DEVICE=cpu BACKBONES=tiny BACKBONE=tiny SLICES=8 IN_PLANE=0 EPOCHS=1 REPEATS=1 PROCESSES=1
else
    DEVICE=cuda BACKBONES=tiny,vit_b BACKBONE=vit_b SLICES=100 IN_PLANE=512 EPOCHS=3 REPEATS=3 PROCESSES=1
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: CUDA was asked for, but $("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1) sees no CUDA device." >&2
        echo "gpu_check: run it on a machine with an NVIDIA GPU, or with --cpu to check the script itself." >&2
        exit 3
    fi
fi
if [ ! -f sample-datasets/brain-mri-groundtruth/manifest.json ] || [ ! -f sample-datasets/em-neurons-groundtruth/manifest.json ]; then
    "$PY" scripts/prepare_sample_data.py --skip-existing || { echo "gpu_check: no sample data, and it cannot be built here" >&2; exit 4; }
fi

declare -A RESULTS
step() {  # step NAME COMMAND...: run it, record ok/failed
    local name=$1; shift
    echo "== gpu_check: $name"
    if "$@"; then RESULTS[$name]=ok; else RESULTS[$name]="failed (exit $?)"; fi
}

step tests env SAMFEWSHOT_TEST_DEVICE=$DEVICE SAMFEWSHOT_TEST_BACKBONES=$BACKBONES \
    "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_device_paths.py
SAM_MODELS=$("$PY" -c "import sys; sys.path.insert(0, 'apps/samfewshot'); from lib.configs import SAM_MODELS; print(*SAM_MODELS)")
[ -n "$SAM_MODELS" ] || { echo "gpu_check: cannot read the SAM models from apps/samfewshot/lib/configs" >&2; exit 1; }
for model in $SAM_MODELS; do
    step "benchmark $model" "$PY" scripts/benchmark.py --model $model --backbone $BACKBONE --device $DEVICE \
        --slices $SLICES --in-plane $IN_PLANE --repeats $REPEATS --update-epochs $EPOCHS --out "$OUT/benchmark_$model.json"
done
step "benchmark fgnet" "$PY" scripts/benchmark.py --model fgnet --backbone $BACKBONE --device $DEVICE \
    --repeats $REPEATS --update-epochs $EPOCHS --out "$OUT/benchmark_fgnet.json"
step ddp "$PY" scripts/gpu_check.py ddp --device $DEVICE --processes $PROCESSES --out "$OUT/ddp.json"

{
    printf '{"device": "%s", "results": {' "$DEVICE"
    first=1
    for name in tests $(printf 'benchmark_%s ' $SAM_MODELS) benchmark_fgnet ddp; do
        name=${name/benchmark_/benchmark }
        [ $first = 1 ] || printf ', '
        printf '"%s": "%s"' "$name" "${RESULTS[$name]}"
        first=0
    done
    printf '}}\n'
} > "$OUT/steps.json"
"$PY" scripts/gpu_check.py report "$OUT"
