"""End to end on the EM datastore: a real server with `--conf models fgnet`, driven by MONAILabelClient through
the annotation loop: info -> next sample -> infer instances -> save a corrected instance label -> fine-tune ->
infer again with the new adapter."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_client_loop import adapter_version, assert_same_geometry, client_for, infer, wait_for_training

pytestmark = pytest.mark.e2e

EM_CONF = (("models", "fgnet"),)


@pytest.fixture
def studies(em_studies) -> Path:
    """The servers of this module serve the EM datastore."""
    return em_studies


def test_em_annotation_loop(start_server, sample_data, tmp_path):
    server = start_server(*EM_CONF)
    client = client_for(server, tmp_path)

    info = client.info()
    assert list(info["models"]) == ["fgnet"] and list(info["trainers"]) == ["fgnet"], info["models"]
    assert info["models"]["fgnet"]["adapter_version"] == 0

    objects = client.datastore()["objects"]
    labelled = {i for i, o in objects.items() if "final" in o.get("labels", {})}
    assert len(labelled) == 2, labelled
    image_id = client.next_sample("first", {})["id"]
    assert image_id not in labelled
    image_path = server.studies / f"{image_id}.nii.gz"

    # infer: an instance label (16-bit ids) on the image's own grid
    before_path, before = infer(client, "fgnet", image_id, tmp_path / "before.nii.gz")
    assert_same_geometry(before_path, image_path)
    assert before["adapter_version"] == 0 and before["instances"] >= 1, before
    label = nib.load(str(before_path))
    assert label.get_data_dtype() == np.uint16
    pred_before = np.asarray(label.dataobj)
    assert pred_before.max() == before["instances"] and pred_before.min() >= 1  # every voxel belongs to a cell

    # save the corrected instances (here: the ground truth) as the final label
    truth = sample_data / "em-neurons-groundtruth" / f"{image_id}.nii.gz"
    saved = client.save_label(image_id, str(truth), tag="final")
    assert saved["image"] == image_id, saved

    # fine-tune and wait for it; the new adapter is published and served
    task = client.train_start("fgnet", {"max_epochs": 2})
    wait_for_training(client, server, task["id"])
    after_path, after = infer(client, "fgnet", image_id, tmp_path / "after.nii.gz")
    assert after["adapter_version"] == 1 and adapter_version(server, "fgnet") == 1, after
    assert_same_geometry(after_path, image_path)
    pred_after = np.asarray(nib.load(str(after_path)).dataobj)
    assert not np.array_equal(pred_after, pred_before), "the instances did not change after fine-tuning"

    model_dir = server.app_dir / "model"
    assert any("fgnet.v0001" in p.name for p in (model_dir / "history").iterdir())
    split = json.loads((model_dir / "fgnet_split.json").read_text())
    assert {image_id, *labelled} <= set(split["train"] + split["val"]), split
    stats = client.info()["train_stats"]["fgnet"]
    assert stats["total_epochs"] == 2 and "train_boundary_dice" in json.dumps(stats), stats


def test_em_request_options_are_checked(start_server, tmp_path):
    server = start_server(*EM_CONF)
    for params, message in (
        ({"seed_affinity": 0}, "seed_affinity"),
        ({"min_fragment_size": "many"}, "min_fragment_size"),
        ({"sw_overlap": 1.5}, "sw_overlap"),
    ):
        response = server.post("/infer/fgnet?image=em_002", data={"params": json.dumps(params)})
        assert response.status_code == 422 and message in response.text, (params, response.status_code, response.text)
    assert server.info()["models"]["fgnet"]  # still serving


def test_missing_sam2_weights_answer_503_naming_file_and_conf_key(start_server):
    """Official SAM2 weights cannot be had here (no network, none cached): the server starts, fgnet says why."""
    server = start_server(*EM_CONF, ("backbone", "vit_b"))
    assert not list((server.app_dir / "model").glob("sam2*")), "SAM2 weights unexpectedly present"
    response = server.post("/infer/fgnet?image=em_002", data={"params": "{}"}, timeout=60)
    assert response.status_code == 503, response.text
    assert "sam2.1_hiera_tiny.pt" in response.text and "--conf sam2_checkpoint" in response.text, response.text
    assert server.info()["models"]["fgnet"]["adapter_version"] == 0
