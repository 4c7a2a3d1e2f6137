"""Clicks end to end: a real server, trained a little, driven by `monailabel.client.MONAILabelClient` with the
request 3D Slicer's MONAI Label module sends for a 3D deepgrow model (onClickDeepgrow, then MONAILabelLogic.infer),
the annotator played by the ground truth: each click at the centre of the largest error of the segment shown."""

from __future__ import annotations

import shutil
import time

import nibabel as nib
import nrrd
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from lib.evaluation import dice
from lib.transforms.clicks import error_click

pytestmark = pytest.mark.e2e

MODEL, SEGMENT, CLASS = "hf_sam", "grey matter", 2
HELD_OUT = "brain_005"
CLICKS = 5
TRAIN_DEADLINE_S = 600


def slicer_params(info: dict, foreground: list, background: list) -> dict:
    """What 3D Slicer sends: the segment's name and all its points, the model's infer config (the first value of
    each option, getParamsFromConfig), then the result format MONAILabelLogic.infer asks for."""
    config = {k: v[0] if isinstance(v, list) else v for k, v in info["models"][f"{MODEL}_interactive"]["config"].items()}
    return {
        "label": SEGMENT,
        "foreground": foreground,
        "background": background,
        **config,
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
    }


def wait_for_new_adapter(server, deadline_s: float = TRAIN_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while server.info()["models"][MODEL]["adapter_version"] < 1:
        failed = [t for t in server.get("/train/?all=true").json() if t["status"] == "ERROR"]
        assert not failed, "training failed:\n" + "\n".join(failed[0].get("details") or [])
        assert time.monotonic() < deadline, f"no adapter within {deadline_s} s\n{server.log_tail()}"
        time.sleep(2)


def test_slicer_clicks_on_a_trained_model_raise_dice(start_server, sample_data, tmp_path):
    server = start_server(("models", MODEL))
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    info = client.info()
    interactive = info["models"][f"{MODEL}_interactive"]
    assert (interactive["type"], interactive["dimension"]) == ("deepgrow", 3), interactive
    client.train_start(MODEL, {"max_epochs": 60, "lr": 0.002, "val_split": 0})
    wait_for_new_adapter(server)

    image = nib.load(str(server.studies / f"{HELD_OUT}.nii.gz"))
    truth = np.asarray(nib.load(str(sample_data / "brain-mri-groundtruth" / f"{HELD_OUT}.nii.gz")).dataobj) == CLASS
    automatic_file, _ = client.infer(MODEL, HELD_OUT, {"result_extension": ".nii.gz"})
    automatic = np.asarray(nib.load(automatic_file).dataobj) == CLASS

    areas = truth.sum((0, 1))
    slices = np.nonzero(areas > 0.5 * areas.max())[0][[0, -1]].tolist() + [int(np.argmax(areas))]
    before, after = [], []
    for k in slices:
        before.append(dice(automatic[..., k], truth[..., k]))
        shown, foreground, background = automatic[..., k], [], []
        for _ in range(CLICKS):
            x, y, label = error_click(shown, truth[..., k])  # (column j, row i) of the stored (i, j) plane
            (foreground if label else background).append([y, x, k])
            result_file, result = client.infer(f"{MODEL}_interactive", HELD_OUT, slicer_params(info, foreground, background))
            assert result["label_names"] == {SEGMENT: 1}, result
            mask = nrrd.read(result_file)[0]
            assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 1}
            shown = mask[..., k] > 0
        shutil.copyfile(result_file, tmp_path / f"clicked_{k}.nrrd")
        after.append(dice(shown, truth[..., k]))
    assert np.mean(after) >= np.mean(before) + 0.01, f"Dice before clicks {before}, after {CLICKS} clicks {after}"
