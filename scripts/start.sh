#!/usr/bin/env bash
# Set up (idempotent), then serve the sample brain-MRI datastore on loopback; extra arguments pass through and
# win over these (EM: ./scripts/start.sh --studies sample-datasets/em-neurons --conf models fgnet),
# e.g. ./scripts/start.sh --conf backbone tiny   or   ./scripts/start.sh --port 8001
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# mlflow 3 rejects monailabel's file-store tracking URI; experiment tracking stays off unless asked for.
export MONAI_LABEL_TRACKING_ENABLED=${MONAI_LABEL_TRACKING_ENABLED:-false}
# monailabel's launcher runs the first `python` on PATH: make it the venv's.
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/monailabel start_server \
  --app apps/samfewshot \
  --studies sample-datasets/brain-mri \
  --host 127.0.0.1 --port "${PORT:-8000}" \
  --conf models segmentation \
  "$@"
