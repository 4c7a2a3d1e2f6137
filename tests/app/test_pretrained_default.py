"""The app as a fresh offline install serves it: the default backbone (LiteMedSAM from the installed wheel), no
adapter yet. A box answers through the pretrained object decoding; the automatic task says what to do instead of
painting untrained class heads; MASG-SAM says in /info/ that it runs without DSF."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from lib.evaluation import dice

GREY_MATTER = 2


@pytest.fixture
def client_conf() -> dict:
    return {"models": "segmentation", "engine": "torch", "auto_scoring": "false"}  # the default backbone


def test_info_names_the_backbone_and_what_masg_sam_runs_without(client):
    info = client.get("/info/").json()
    assert "(litemedsam)" in info["models"]["hf_sam"]["description"]
    assert "notes" not in info["models"]["hf_sam"]
    assert any("DSF is off" in note and "clip_checkpoint" in note for note in info["models"]["masg_sam"]["notes"])


def test_the_automatic_task_says_what_to_do_before_any_training(client):
    response = client.post("/infer/hf_sam?image=brain_005")
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert "not been trained" in detail and "hf_sam_interactive" in detail and "POST /train/hf_sam" in detail


def test_a_box_segments_grey_matter_before_any_training(client, sample_data, tmp_path):
    truth = np.asarray(nib.load(sample_data / "brain-mri-groundtruth" / "brain_005.nii.gz").dataobj) == GREY_MATTER
    k = int(np.argmax(truth.sum((0, 1))))
    i, j = np.nonzero(truth[..., k])
    roi = [int(i.min()), int(i.max()), int(j.min()), int(j.max()), k, k]
    params = {"label": "grey matter", "foreground": [], "background": [], "roi": roi, "result_extension": ".nii.gz"}
    response = client.post("/infer/hf_sam_interactive?image=brain_005&output=json", data={"params": json.dumps(params)})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["prompt_path"] == "object" and result["adapter_version"] == 0
    assert result["label_names"] == {"grey matter": 1} and result["found_slices"] == [k]
    response = client.post("/infer/hf_sam_interactive?image=brain_005&output=image", data={"params": json.dumps(params)})
    path = tmp_path / "mask.nii.gz"
    path.write_bytes(response.content)
    mask = np.asarray(nib.load(path).dataobj) > 0
    assert not mask[..., :k].any() and not mask[..., k + 1 :].any()
    assert dice(mask[..., k], truth[..., k]) > 0.5  # the untrained class heads would give nothing of the kind


def test_uncertainty_is_not_scored_from_untrained_heads(client):
    from monailabel.interfaces.utils.app import app_instance

    app = app_instance()
    assert app._scoring_methods["uncertainty"]({"model": "hf_sam"}, app.datastore()) == {"scored": 0, "skipped": 0}
    assert all("uncertainty" not in app.datastore().get_image_info(i) for i in app.datastore().list_images())
