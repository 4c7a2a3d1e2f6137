"""A volume prepared once (loaded, reoriented, normalised, resampled) serves the model's next requests on it, the
automatic and the interactive task alike, with the same answers; an edited file is prepared again."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from monai.transforms import LoadImaged


def label_of(result) -> np.ndarray:
    return np.asarray(nib.load(result["label"]).dataobj)


def test_a_prepared_volume_serves_both_tasks_until_its_file_changes(app_dir, studies, monkeypatch):
    from lib.monailabel_compat import forget_prepared_volumes
    from main import SamFewShotApp

    loads = []
    load = LoadImaged.__call__
    monkeypatch.setattr(LoadImaged, "__call__", lambda self, data, *a, **k: loads.append(data["image"]) or load(self, data, *a, **k))
    app = SamFewShotApp(str(app_dir), str(studies), {"models": "hf_sam", "backbone": "tiny", "engine": "torch", "auto_scoring": "false"})
    request = {"model": "hf_sam", "image": "brain_002", "device": "cpu"}
    click = {**request, "model": "hf_sam_interactive", "foreground": [[60, 70, 62]], "label": "white matter"}

    first = app.infer(request)
    assert len(loads) == 1
    clicked = app.infer(click)
    again = app.infer(request)
    assert len(loads) == 1  # the click and the re-run read the prepared volume
    assert np.array_equal(label_of(again), label_of(first))

    forget_prepared_volumes()
    assert np.array_equal(label_of(app.infer(click)), label_of(clicked))  # prepared again: the same answer
    assert len(loads) == 2

    path = loads[0]
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))  # the file was edited
    app.infer(request)
    assert len(loads) == 3
