"""The label-quality check: a final label saved while an adapter is served is compared with that model's
prediction in the background; a label that disagrees far more than the adapter's sentinel score (white and grey
matter swapped) is flagged in its info and /info/, held out of training, and trains again once confirmed."""

from __future__ import annotations

import json
import shutil
import time

import nibabel as nib
import numpy as np
import pytest

from lib.adapters import publish_adapter
from lib.networks.lora import adapter_state_dict

IMAGE = "brain_002"  # a sample volume without a final label


@pytest.fixture
def client_conf() -> dict:
    return {"models": "hf_sam", "backbone": "tiny", "engine": "torch", "auto_scoring": "false"}


def save_final(client, path, params: dict):
    with open(path, "rb") as f:
        return client.put(f"/datastore/label?image={IMAGE}&tag=final", files={"label": (path.name, f)}, data={"params": json.dumps(params)})


def wait_for_check(app, model: str = "hf_sam") -> dict:
    """The label's stored check record, once the background check has written it."""
    app.wait_label_checks(timeout=120)
    datastore = app.datastore()
    info = datastore.get_label_info(datastore.get_labels_by_image_id(IMAGE)["final"], "final") or {}
    return info["label_check"][model]


def test_a_swapped_label_is_flagged_held_out_and_trains_once_confirmed(client, sample_data, tmp_path, monkeypatch):
    from monailabel.interfaces.utils.app import app_instance

    app = app_instance()
    served = app.models["hf_sam"].model
    truth = sample_data / "brain-mri-groundtruth" / f"{IMAGE}.nii.gz"
    image = nib.load(str(truth))
    swapped = np.asarray(image.dataobj).astype(np.uint8)
    swapped = np.where(swapped == 1, 2, np.where(swapped == 2, 1, 0)).astype(np.uint8)
    wrong = tmp_path / f"{IMAGE}.nii.gz"
    nib.save(nib.Nifti1Image(swapped, image.affine), str(wrong))
    names = {"label_info": [{"name": "white matter", "idx": 1}, {"name": "grey matter", "idx": 2}]}

    # Before any adapter the base weights' class heads are untrained: nothing to compare with.
    response = save_final(client, wrong, names)
    assert response.status_code == 200 and "label_check" not in response.json()

    # An adapter whose sentinel score was 0.8; the check runs the real segmentation task on the volume.
    info = {"metric": 0.8, "metric_name": "val_mean_dice", "val_volumes": ["brain_001"]}
    publish_adapter(served.adapter_path, adapter_state_dict(served.build_network()), served.adapter_config(), info)
    response = save_final(client, wrong, names)
    assert response.status_code == 200 and response.json()["label_check"] == ["hf_sam"]
    record = wait_for_check(app)
    assert record["adapter_version"] == 1 and record["reference"] == 0.8 and set(record["per_class"]) <= {"white matter", "grey matter"}

    # The decision, with a prediction known: the volume's own ground truth in place of the served model's answer.
    def truthful(model, image_id):
        path = tmp_path / f"prediction_{time.monotonic_ns()}.nii.gz"
        shutil.copy(truth, path)
        return str(path)

    monkeypatch.setattr(app, "_segmentation_file", truthful)
    assert save_final(client, truth, {}).status_code == 200
    assert not wait_for_check(app)["flagged"]  # a label as the model sees it
    assert save_final(client, wrong, names).status_code == 200
    record = wait_for_check(app)
    assert record["flagged"] and record["agreement"] < 0.1
    assert record["confused"] == {"white matter": "grey matter", "grey matter": "white matter"}
    checks = client.get("/info/").json()["label_checks"]
    expected = {"image": IMAGE, "model": "hf_sam", "agreement": record["agreement"], "reference": 0.8, "confirmed": False}
    assert checks == [{**expected, "confused": record["confused"]}]

    stats = client.post("/train/hf_sam?run_sync=true", json={"max_epochs": 1, "val_split": 0}).json()
    held = [u for u in stats["publication"]["unusable"] if u["id"] == IMAGE]
    assert held and "'white matter' matches the prediction's 'grey matter' better" in held[0]["reason"]
    assert "Save it again with label_confirmed: true" in held[0]["reason"]

    # The client may confirm, never forge the server's record; a confirmation is a JSON boolean.
    label_id = app.datastore().get_labels_by_image_id(IMAGE)["final"]
    for params, message in (({"label_check": {}}, "server's label-quality record"), ({"label_confirmed": "yes"}, "JSON boolean")):
        response = client.put(f"/datastore/updatelabelinfo?label={label_id}&tag=final", data={"params": json.dumps(params)})
        assert response.status_code == 422 and message in response.text
    response = client.put(f"/datastore/updatelabelinfo?label={label_id}&tag=final", data={"params": json.dumps({"label_confirmed": True})})
    assert response.status_code == 200, response.text
    assert client.get("/info/").json()["label_checks"][0]["confirmed"] is True
    stats = client.post("/train/hf_sam?run_sync=true", json={"max_epochs": 1, "val_split": 0}).json()
    assert not [u for u in stats["publication"]["unusable"] if u["id"] == IMAGE]
