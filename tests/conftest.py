"""Shared fixtures: every test works on its own copy of the app and of the sample datastore."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "samfewshot"
SAMPLES = REPO / "sample-datasets"

os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
# MONAI Label drops and re-imports `lib.*` whenever it loads an app; in one test process that would leave two
# copies of every class (isinstance checks across tests fail). The app copies hold the same code.
os.environ.setdefault("MONAI_LABEL_RELOAD_APP_LIB", "false")
# The app's modules import as `lib.*` / `main`, as MONAI Label loads them.
sys.path.insert(0, str(APP_DIR))


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The sample datasets; generated here when scripts/setup.sh has not made them yet."""
    if not all((SAMPLES / d / "manifest.json").exists() for d in ("brain-mri-groundtruth", "em-neurons-groundtruth")):
        sys.path.insert(0, str(REPO / "scripts"))
        from prepare_sample_data import generate, generate_em

        generate(str(SAMPLES), skip_existing=True)
        generate_em(str(SAMPLES), skip_existing=True)
    return SAMPLES


def _copy_datastore(sample_data: Path, name: str, tmp_path: Path) -> Path:
    """Copy a sample datastore without the state a server leaves in it (index, lock, originals)."""
    dst = tmp_path / name
    shutil.copytree(sample_data / name, dst, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock", "original"))
    return dst


@pytest.fixture
def studies(tmp_path, sample_data) -> Path:
    """A private copy of the brain-MRI datastore (two volumes with final labels)."""
    return _copy_datastore(sample_data, "brain-mri", tmp_path)


@pytest.fixture
def em_studies(tmp_path, sample_data) -> Path:
    """A private copy of the EM datastore (two volumes with final instance labels)."""
    return _copy_datastore(sample_data, "em-neurons", tmp_path)


@pytest.fixture
def app_dir(tmp_path) -> Path:
    """A private copy of the app, so adapters and splits written by a test stay in its tmp dir."""
    dst = tmp_path / "app"
    shutil.copytree(APP_DIR, dst, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    return dst


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
