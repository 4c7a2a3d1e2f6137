"""A training run that cannot publish (read-only model directory, full disk) fails with the cause named, and the
server keeps serving the adapter it had."""

from __future__ import annotations

import errno
import os

import pytest

import lib.adapters as adapters
from lib.adapters import AdapterError

pytestmark = pytest.mark.slow


def test_run_that_cannot_publish_fails_with_the_reason_and_the_old_adapter_stays_served(app_dir, studies, monkeypatch):
    from main import SamFewShotApp

    app = SamFewShotApp(str(app_dir), str(studies), {"models": "hf_sam", "backbone": "tiny", "engine": "torch", "auto_scoring": "false"})
    request = {"model": "hf_sam", "max_epochs": 1, "device": "cpu"}
    app.train(request)
    adapter = app.models["hf_sam"].model.adapter_path
    before = open(adapter, "rb").read()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(adapters, "atomic_write", read_only)  # the adapter file only: the run's split and stats still write
    with pytest.raises(AdapterError, match="the model directory is read-only.*version 1 stays served"):
        app.train(request)
    monkeypatch.undo()

    assert open(adapter, "rb").read() == before
    assert app.infer({"model": "hf_sam", "image": "brain_002", "device": "cpu"})["params"]["adapter_version"] == 1
    app.train(request)  # the directory is writable again: the next run publishes normally
    assert app.models["hf_sam"].model.served_version() == 2
