#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export MONAI_LABEL_TRACKING_ENABLED=false
exec .venv/bin/python -m pytest "$@"
