"""End to end: a real `monailabel start_server` driven by the real `monailabel.client.MONAILabelClient`.

The annotation loop of the issue: info -> next sample -> infer -> save a corrected label (Slicer-style label_info,
ids swapped relative to the model) -> fine-tune -> infer again with the new adapter. Plus auto_train and
start-up/weights errors. Everything on CPU with `--conf backbone tiny`; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from lib.configs import SAM_MODELS

pytestmark = pytest.mark.e2e

# Segmentation models served with the brain-MRI label set; adding a name here runs the whole loop for it.
SEGMENTATION_MODELS = SAM_MODELS
MODEL_LABELS = {"white matter": 1, "grey matter": 2}
# 3D Slicer's ids for the same segments, swapped relative to the model, so the server must remap by name.
SLICER_LABEL_INFO = [{"name": "grey matter", "idx": 1}, {"name": "white matter", "idx": 2}]
TRAIN_DEADLINE_S = 300
AUTO_TRAIN_DEADLINE_S = 300


# ---- helpers ----------------------------------------------------------------------------------------------
def client_for(server, tmp_path: Path) -> MONAILabelClient:
    tmpdir = tmp_path / "client"
    tmpdir.mkdir(exist_ok=True)
    return MONAILabelClient(server.url, tmpdir=str(tmpdir))


def infer(client: MONAILabelClient, model: str, image_id: str, keep_as: Path) -> tuple[Path, dict]:
    """Infer and keep the label under ``keep_as`` (the client writes every result to the same file name)."""
    result_file, result = client.infer(model, image_id, {"result_extension": ".nii.gz"})
    assert result_file, f"infer returned no label file; result: {result}"
    shutil.copyfile(result_file, keep_as)
    return keep_as, result


def assert_same_geometry(label_path: Path, image_path: Path) -> None:
    label, image = nib.load(str(label_path)), nib.load(str(image_path))
    assert label.shape == image.shape, f"label shape {label.shape} != image shape {image.shape}"
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4, err_msg="label affine differs from the image's")
    # The same through ITK, as Slicer reads it.
    lab, img = sitk.ReadImage(str(label_path)), sitk.ReadImage(str(image_path))
    assert lab.GetSize() == img.GetSize()
    np.testing.assert_allclose(lab.GetSpacing(), img.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(lab.GetOrigin(), img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(lab.GetDirection(), img.GetDirection(), atol=1e-5)


def swapped_ground_truth(sample_data: Path, image_id: str, out: Path) -> Path:
    """The ground truth of ``image_id`` with ids 1 and 2 swapped (the SLICER_LABEL_INFO numbering)."""
    gt = nib.load(str(sample_data / "brain-mri-groundtruth" / f"{image_id}.nii.gz"))
    data = np.asarray(gt.dataobj).astype(np.uint8)
    assert set(np.unique(data)) <= {0, 1, 2} and {1, 2} <= set(np.unique(data)), "ground truth should hold ids 1 and 2"
    swapped = data.copy()
    swapped[data == 1] = 2
    swapped[data == 2] = 1
    nib.save(nib.Nifti1Image(swapped, gt.affine, gt.header), str(out))
    return out


def train_tasks(server) -> list[dict]:
    response = server.get("/train/?all=true")
    if response.status_code == 404:  # "No Train Tasks Found"
        return []
    assert response.status_code == 200, f"/train/ answered {response.status_code}: {response.text}"
    return response.json()


def wait_for_training(client: MONAILabelClient, server, task_id: str, limit_s: float = TRAIN_DEADLINE_S) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        tasks = [t for t in train_tasks(server) if t["id"] == task_id]
        assert tasks, f"train task {task_id} is not listed by /train/"
        task = tasks[0]
        if task["status"] == "DONE":
            return task
        if task["status"] == "ERROR":
            pytest.fail("training failed:\n" + "\n".join(task.get("details") or []) + "\n" + server.log_tail())
        if server.process.poll() is not None:
            pytest.fail(f"server died while training; log tail:\n{server.log_tail()}")
        time.sleep(1)
    # The client's own status call, for the failure message.
    pytest.fail(f"training did not finish in {limit_s} s: {client.train_status()}\n{server.log_tail()}")


def adapter_version(server, model: str) -> int:
    return int(server.info()["models"][model]["adapter_version"])


# ---- the annotation loop ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", SEGMENTATION_MODELS)
def test_annotation_loop(model, start_server, sample_data, tmp_path):
    server = start_server()
    client = client_for(server, tmp_path)

    # info: the model and its label set
    info = client.info()
    assert model in info["models"], f"{model} not served: {list(info['models'])}"
    assert info["models"][model]["labels"] == MODEL_LABELS
    assert info["models"][model]["adapter_version"] == 0
    assert model in info["trainers"]

    # next sample: an image without a final label
    objects = client.datastore()["objects"]
    labelled = {i for i, o in objects.items() if "final" in o.get("labels", {})}
    sample = client.next_sample("first", {})
    image_id = sample["id"]
    assert image_id in objects and image_id not in labelled, f"next_sample gave {sample}; labelled: {labelled}"
    image_path = server.studies / f"{image_id}.nii.gz"

    # infer: a label in the image's geometry, with label names and the adapter version
    before_path, before = infer(client, model, image_id, tmp_path / "before.nii.gz")
    assert_same_geometry(before_path, image_path)
    assert before["label_names"] == MODEL_LABELS, before
    assert before["adapter_version"] == 0, before
    pred_before = np.asarray(nib.load(str(before_path)).dataobj)
    assert set(np.unique(pred_before)) <= {0, 1, 2}

    # save the correction as Slicer would: its own ids, named in label_info
    corrected = swapped_ground_truth(sample_data, image_id, tmp_path / f"{image_id}_corrected.nii.gz")
    saved = client.save_label(image_id, str(corrected), tag="final", params={"label_info": SLICER_LABEL_INFO})
    assert saved["image"] == image_id, saved
    label_info = server.get(f"/datastore/label/info?label={saved['label']}&tag=final").json()
    assert label_info.get("label_info") == SLICER_LABEL_INFO, label_info

    # fine-tune and wait for it
    task = client.train_start(model, {"max_epochs": 3})
    assert task.get("id"), f"train_start: {task}"
    wait_for_training(client, server, task["id"])

    # the new adapter is served and published
    after_path, after = infer(client, model, image_id, tmp_path / "after.nii.gz")
    assert after["adapter_version"] == 1, after
    assert after["label_names"] == MODEL_LABELS
    assert_same_geometry(after_path, image_path)
    assert adapter_version(server, model) == 1
    model_dir = server.app_dir / "model"
    assert (model_dir / f"{model}.pt").is_file()
    history = sorted(p.name for p in (model_dir / "history").iterdir())
    assert any("v0001" in name for name in history), history
    pred_after = np.asarray(nib.load(str(after_path)).dataobj)
    assert pred_after.shape == pred_before.shape
    assert not np.array_equal(pred_after, pred_before), "the prediction did not change after fine-tuning"

    # the persisted split knows the saved volume
    split = json.loads((model_dir / f"{model}_split.json").read_text())
    assert image_id in split["train"] + split["val"], split
    assert not set(split["train"]) & set(split["val"]), split


# ---- auto_train -------------------------------------------------------------------------------------------
def test_auto_train_after_final_label(start_server, studies, sample_data, tmp_path):
    server = start_server(("auto_train", "true"), ("max_epochs", "3"))
    client = client_for(server, tmp_path)
    assert all(adapter_version(server, m) == 0 for m in SEGMENTATION_MODELS)
    unlabelled = sorted(i for i, o in client.datastore()["objects"].items() if "final" not in o.get("labels", {}))
    assert len(unlabelled) >= 3, unlabelled
    first, second, third = unlabelled[:3]

    # an 'original' label (e.g. a stored prediction) starts nothing
    prediction, _ = infer(client, SEGMENTATION_MODELS[0], second, tmp_path / "prediction.nii.gz")
    saved = client.save_label(second, str(prediction), tag="original")
    assert not saved.get("auto_train"), saved
    assert train_tasks(server) == [], "saving an 'original' label started training"

    # a final label queues one run per model (MONAI Label runs them one at a time)
    corrected = swapped_ground_truth(sample_data, first, tmp_path / f"{first}_corrected.nii.gz")
    saved = client.save_label(first, str(corrected), tag="final", params={"label_info": SLICER_LABEL_INFO})
    assert sorted(saved.get("auto_train", [])) == sorted(SEGMENTATION_MODELS), saved
    tasks = train_tasks(server)
    assert sorted(t["request"]["model"] for t in tasks) == sorted(SEGMENTATION_MODELS), tasks

    # another final label at once: a model whose run is still waiting gets no second one
    waiting_model = tasks[-1]["request"]["model"]
    corrected = swapped_ground_truth(sample_data, third, tmp_path / f"{third}_corrected.nii.gz")
    saved = client.save_label(third, str(corrected), tag="final", params={"label_info": SLICER_LABEL_INFO})
    assert waiting_model not in saved.get("auto_train", []), saved
    assert sum(t["request"]["model"] == waiting_model for t in train_tasks(server)) == 1

    deadline = time.monotonic() + AUTO_TRAIN_DEADLINE_S
    while any(adapter_version(server, m) < 1 for m in SEGMENTATION_MODELS):
        failed = [t for t in train_tasks(server) if t["status"] == "ERROR"]
        if failed:
            pytest.fail("auto_train run failed:\n" + "\n".join(failed[0].get("details") or []) + "\n" + server.log_tail())
        if time.monotonic() > deadline:
            pytest.fail(f"no new adapter versions within {AUTO_TRAIN_DEADLINE_S} s: {train_tasks(server)}\n{server.log_tail()}")
        time.sleep(1)
    for task in train_tasks(server):
        wait_for_training(client, server, task["id"])

    # another 'original' save after the runs: nothing new
    count = len(train_tasks(server))
    saved = client.save_label(second, str(prediction), tag="original")
    assert not saved.get("auto_train"), saved
    assert len(train_tasks(server)) == count
    _, result = infer(client, SEGMENTATION_MODELS[0], second, tmp_path / "prediction2.nii.gz")
    assert result["adapter_version"] >= 1


# ---- start-up and weights errors --------------------------------------------------------------------------
def test_unknown_model_fails_start_with_valid_names(start_server):
    server = start_server(("models", "nope"), expect_failure=True)
    assert server.process.returncode != 0
    log = server.log()
    assert "nope" in log and "valid" in log, server.log_tail()
    valid_line = next(line for line in log.splitlines() if "nope" in line and "valid" in line)
    for name in SEGMENTATION_MODELS:
        assert name in valid_line, valid_line


@pytest.fixture
def vit_b_without_weights(start_server):
    """A server configured for the official vit_b weights, which cannot be had here (no network, none cached)."""
    server = start_server(("backbone", "vit_b"))
    assert not list((server.app_dir / "model").glob("sam_vit_b*")), "vit_b weights unexpectedly present"
    return server


def test_missing_weights_server_starts_and_infer_fails(vit_b_without_weights):
    server = vit_b_without_weights
    model = SEGMENTATION_MODELS[0]
    assert model in server.info()["models"]
    image_id = "brain_002"  # no final label in the sample datastore
    # Short timeout: without a route to the download host, the attempt must fail fast, not hang.
    response = requests.post(f"{server.url}/infer/{model}?image={image_id}", data={"params": "{}"}, timeout=60)
    assert response.status_code >= 400, response.text[:500]
    # The server stays up and still answers.
    assert server.info()["models"][model]["adapter_version"] == 0
    assert "sam_vit_b_01ec64.pth" in server.log() and "sam_checkpoint" in server.log()


def test_missing_weights_error_names_file_and_conf_key(vit_b_without_weights, tmp_path):
    server = vit_b_without_weights
    client = client_for(server, tmp_path)
    with pytest.raises(MONAILabelClientException) as excinfo:
        client.infer(SEGMENTATION_MODELS[0], "brain_002", {"result_extension": ".nii.gz"})
    message = excinfo.value.msg
    assert "sam_vit_b_01ec64.pth" in message, message
    assert "sam_checkpoint" in message, message


def test_missing_weights_with_preload_server_still_starts(start_server):
    server = start_server(("backbone", "vit_b"), ("preload", "true"))
    assert SEGMENTATION_MODELS[0] in server.info()["models"]
    response = server.post(f"/infer/{SEGMENTATION_MODELS[0]}?image=brain_002", data={"params": "{}"})
    assert response.status_code == 503, response.text
    assert "sam_vit_b_01ec64.pth" in response.text and "sam_checkpoint" in response.text
