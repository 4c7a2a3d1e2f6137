#!/usr/bin/env bash
# Idempotent set-up: .venv with the pinned packages, then the sample data.
# Install order matters: torch first, then sam2 built against that torch (no build isolation, no CUDA
# extension), then everything else; otherwise pip builds sam2 against a second torch.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

stamp=.venv/.samfewshot-requirements
want=$(cat requirements.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements into .venv"
  "${PIP[@]}" install -q --upgrade pip wheel setuptools
  "${PIP[@]}" install -q $(grep -E '^(torch|torchvision|numpy)==' requirements.txt)
  SAM2_BUILD_CUDA=0 "${PIP[@]}" install -q --no-build-isolation $(grep -E '^sam2==' requirements.txt)
  "${PIP[@]}" install -q -r requirements.txt
  echo "$want" > "$stamp"
fi

.venv/bin/python scripts/prepare_sample_data.py --skip-existing
