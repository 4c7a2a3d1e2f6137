#!/usr/bin/env bash
# Fill .whl/ with wheels of the packages scripts/gpu_check.sh needs and a GPU machine's image lacks (its Python has
# torch, numpy, scipy, scikit-image, scikit-learn, h5py, peft, einops, requests, pytest... but not the app's stack),
# for that machine's Python (default 3.12), at the versions requirements.txt pins. sam2 has no wheel on PyPI: it is
# built here without its CUDA extension, as setup.sh installs it. Prints the total, which must stay under what may
# travel with the repository (64 MiB per call, the working tree included).
#
#   scripts/gpu_wheels.sh            # then: scripts/gpu_check.sh on the GPU machine installs .whl/*.whl first
#   PYTHON_VERSION=3.11 scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${PYTHON_VERSION:-3.12}
PY=${PYTHON:-.venv/bin/python}
# Imported by the app, monailabel's modules it loads, the benchmark (segment_anything, sam2 for the random official
# weights), FGNet (waterz) and the sample data (nilearn: building it there travels lighter than the volumes);
# openvino and nncf stay behind: a CUDA server runs the torch engine, and the app imports them only where found.
PACKAGES="monai monailabel nibabel pydicom pynetdicom dicomweb-client highdicom pillow-jpls pydantic pydantic_core
pydantic-settings python-dotenv fastapi starlette python-multipart uvicorn annotated-types typing-inspection cachetools
expiringdict expiring-dict schedule timeloop watchdog pytorch-ignite segment-anything open_clip_torch ftfy wcwidth
waterz hydra-core omegaconf antlr4-python3-runtime iopath pynrrd pydicom-seg passlib PyJWT bcrypt jsonschema nilearn"
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
for name in $PACKAGES; do
    pin=$(grep -i -E "^${name}==" requirements.txt || true)
    [ -n "$pin" ] || { echo "gpu_wheels: $name is not pinned in requirements.txt" >&2; exit 1; }
    # A binary wheel for that Python where PyPI has one; a package published as source only is pure Python here
    # (timeloop, expiringdict, ...), so its wheel built here serves any Python 3.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$pin" 2>/dev/null ||
        "$PY" -m pip wheel -q --no-deps -w .whl "$pin"
done
SAM2_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$(grep -E '^sam2==' requirements.txt)"
du -ch .whl/*.whl | tail -1
