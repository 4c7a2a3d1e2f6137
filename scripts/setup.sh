#!/usr/bin/env bash
# Idempotent set-up: Debian packages for the hospital path (as root), .venv with the pinned packages, then the
# sample data.
# Install order matters: torch first, then sam2 built against that torch (no build isolation, no CUDA
# extension), then everything else; otherwise pip builds sam2 against a second torch.
set -euo pipefail
cd "$(dirname "$0")/.."
# One set-up at a time: a second caller (another terminal, a parallel test run) waits, then finds it done.
exec 9>.setup.lock
flock 9

# Orthanc with DICOMweb (the PACS of the DICOM tests and of scripts/orthanc.sh) and Chromium with its driver
# (the OHIF browser test) come from Debian. Without root they are left to the administrator and those tests skip.
DEBIAN_PACKAGES=(orthanc orthanc-dicomweb chromium chromium-driver)
missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[setup] not installed (needs root): ${missing[*]}; the tests that need them will skip" >&2
  fi
fi

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
