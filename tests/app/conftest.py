"""The app in-process: MONAI Label's FastAPI application on a private app copy and datastore."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def client_conf() -> dict:
    """The app's --conf for the `client` fixture; a test module overrides it to serve other models."""
    return {"models": "segmentation", "backbone": "tiny", "engine": "torch", "auto_scoring": "false"}


@pytest.fixture
def client(app_dir, studies, client_conf):
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    settings.MONAI_LABEL_APP_DIR = str(app_dir)
    settings.MONAI_LABEL_STUDIES = str(studies)
    settings.MONAI_LABEL_APP_CONF = client_conf
    clear_cache()
    from monailabel.app import app

    with TestClient(app) as c:
        yield c
    clear_cache()
