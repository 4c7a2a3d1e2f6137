"""The interactive tasks in-process: the requests 3D Slicer's and OHIF's point tools really send (written here as
data, from MONAI Label 0.8.5's plugins), bad prompts refused, and an annotator's prompts kept with the final label,
replayed by training and removed with the label."""

from __future__ import annotations

import io
import json

import nibabel as nib
import nrrd
import numpy as np
import pytest

from lib.configs import SAM_MODELS

LABELS = {"white matter": 1, "grey matter": 2}
# 3D Slicer, onClickDeepgrow for a 3D deepgrow model: the segment's name and all its points, the model's infer config
# (first value of each option, getParamsFromConfig), then MONAILabelLogic.infer's result format and the client id.
SLICER_CONFIG = {"device": "cpu", "batch_size": 2, "modality": "auto"}
SLICER_FORMAT = {"result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "user-xyz"}
# OHIF v3, PointPrompts.onRunInference for a deepgrow model: points only (the class is unknown to it), then
# MonaiLabelClient.infer's result format; output=image.
OHIF_FORMAT = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}


def infer(client, model: str, image: str, params: dict, output: str = "all"):
    return client.post(f"/infer/{model}?image={image}&output={output}", data={"params": json.dumps(params)})


def nrrd_of(content: bytes, tmp_path) -> np.ndarray:
    path = tmp_path / "result.nrrd"
    path.write_bytes(content)
    return nrrd.read(str(path))[0]


def multipart(response) -> tuple[dict, bytes]:
    boundary = response.headers["content-type"].split("boundary=")[1].encode()
    parts = [p.split(b"\r\n\r\n", 1) for p in response.content.split(b"--" + boundary) if b"\r\n\r\n" in p]
    result = next(json.loads(body.rsplit(b"\r\n", 1)[0]) for head, body in parts if b"application/json" in head)
    label = next(body.rsplit(b"\r\n", 1)[0] for head, body in parts if b"application/json" not in head)
    return result, label


@pytest.mark.parametrize("model", SAM_MODELS)
def test_slicer_deepgrow_request_gives_the_segments_binary_mask(client, studies, tmp_path, model):
    params = {
        "label": "white matter",
        "foreground": [[60, 70, 62], [62, 75, 64]],
        "background": [[20, 20, 62]],
        **SLICER_CONFIG,
        **SLICER_FORMAT,
    }
    response = infer(client, f"{model}_interactive", "brain_003", params)
    assert response.status_code == 200, response.text
    result, label = multipart(response)
    mask = nrrd_of(label, tmp_path)
    assert mask.shape == nib.load(studies / "brain_003.nii.gz").shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    assert result["label_names"] == {"white matter": 1} and result["target_class"] == 1
    assert result["prompted_slices"] == [62, 64]  # the sample volumes are stored in RAS: the same slice indices
    assert "ignored_options" not in result  # Slicer sends options the task reads, nothing else

    # Slicer's ROI ([i0, i1, j0, j1, k0, k1]) bounds the result
    roi = [40, 80, 50, 90, 60, 66]
    response = infer(
        client,
        f"{model}_interactive",
        "brain_003",
        {"label": "grey matter", "foreground": [], "background": [], "roi": roi, **SLICER_FORMAT},
    )
    assert response.status_code == 200, response.text
    result, label = multipart(response)
    mask = nrrd_of(label, tmp_path)
    outside = np.ones_like(mask, dtype=bool)
    outside[40:81, 50:91, 60:67] = False
    assert not mask[outside].any()
    assert result["prompted_slices"] == list(range(60, 67)) and result["label_names"] == {"grey matter": 1}


def test_a_segment_name_outside_the_labels_is_a_new_structure_for_the_object_path(client, tmp_path):
    roi = [40, 80, 50, 90, 60, 66]
    params = {"label": "lesion", "foreground": [], "background": [], "roi": roi, **SLICER_FORMAT}
    response = infer(client, "hf_sam_interactive", "brain_003", params)
    assert response.status_code == 200, response.text
    result, label = multipart(response)
    assert result["prompt_path"] == "object" and result["label_names"] == {"lesion": 1} and result["target_class"] is None
    mask = nrrd_of(label, tmp_path)
    outside = np.ones_like(mask, dtype=bool)
    outside[40:81, 50:91, 60:67] = False
    assert not mask[outside].any()


def test_ohif_deepgrow_request_without_a_label(client, tmp_path):
    response = infer(
        client, "hf_sam_interactive", "brain_003", {"foreground": [[60, 70, 62]], "background": [], **OHIF_FORMAT}, output="image"
    )
    assert response.status_code == 200, response.text
    mask = nrrd_of(response.content, tmp_path)
    assert set(np.unique(mask)) <= {0, 1}


@pytest.mark.parametrize(
    "params,message",
    [
        ({"label": "white matter", "foreground": [[60, 70, 500]]}, "lie outside the volume"),
        ({"label": "Grey Mater", "foreground": [[60, 70, 62]]}, "labels but close to 'grey matter': send 'grey matter'"),
        ({"label": "white matter", "foreground": [["a", 70, 62]]}, "foreground must be a list of at most 1000"),
        ({"label": "white matter", "roi": [1, 2, 3, 4]}, "roi must be [i0, i1, j0, j1, k0, k1]"),
        ({"label": "white matter", "foreground": [], "background": []}, "send foreground or background points"),
        ({"background": [[60, 70, 62]]}, "background points alone do not say which structure"),
    ],
)
def test_bad_prompts_are_refused(client, studies, params, message):
    before = (studies / "datastore_v2.json").read_bytes() if (studies / "datastore_v2.json").exists() else None
    response = infer(client, "hf_sam_interactive", "brain_003", params)
    assert response.status_code == 422 and message in response.text, response.text
    after = (studies / "datastore_v2.json").read_bytes() if (studies / "datastore_v2.json").exists() else None
    assert before == after


def test_prompts_are_kept_with_the_final_label_replayed_and_removed_with_it(client, sample_data, monkeypatch):
    from monailabel.interfaces.utils.app import app_instance

    from lib.annotator_prompts import InteractionLog
    from lib.trainers import simulated_prompts
    from lib.trainers.adapter_trainer import AdapterTrainer

    slicer = {"label": "grey matter", "foreground": [[50, 60, 70]], "background": [[70, 80, 70]]}
    assert infer(client, "hf_sam_interactive", "brain_002", {**slicer, **SLICER_FORMAT}).status_code == 200
    response = infer(client, "hf_sam_interactive", "brain_002", {"foreground": [[55, 65, 71]], **OHIF_FORMAT})
    assert response.status_code == 200 and multipart(response)[0]["ignored_options"] == ["restore_label_idx"], response.text
    kept = app_instance().interactions
    restarted = InteractionLog(kept.store_dir)  # what a server restarted now would hold
    assert restarted.take("brain_002") == [{**slicer}, {"label": None, "foreground": [[55, 65, 71]]}]
    kept.record("brain_002", {"foreground": [[55, 65, 71]]})  # the take above removed the file; write it again
    truth = (sample_data / "brain-mri-groundtruth" / "brain_002.nii.gz").read_bytes()
    saved = client.put(
        "/datastore/label?image=brain_002&tag=final",
        files={"label": ("label.nii.gz", io.BytesIO(truth))},
        data={"params": json.dumps({"label_info": [{"name": n, "idx": i} for n, i in LABELS.items()]})},
    )
    assert saved.status_code == 200, saved.text
    info = client.get("/datastore/label/info?label=brain_002&tag=final").json()
    assert info["interactions"] == [{**slicer}, {"label": None, "foreground": [[55, 65, 71]]}]
    assert app_instance().interactions.take("brain_002") == []  # they now belong to the label
    assert InteractionLog(kept.store_dir).take("brain_002") == []  # on disk too
    assert "interactions" not in client.get("/datastore/label/info?label=brain_000&tag=final").json()  # not shared

    replayed = []
    original = simulated_prompts.replay
    monkeypatch.setattr(simulated_prompts, "replay", lambda *a, **k: replayed.append(original(*a, **k)) or replayed[-1])
    # Every slice prompted, a replay wherever there is one: the crop of the interaction slice replays each epoch.
    monkeypatch.setattr(
        AdapterTrainer, "train_iteration_update", lambda self, context: simulated_prompts.SimulatedInteraction(share=1.0, replay_share=1.0)
    )
    response = client.post("/train/hf_sam?run_sync=true", json={"max_epochs": 2, "val_split": 0})
    assert response.status_code == 200, response.text
    assert any(r and r["prompt"]["points"] for r in replayed), "training never replayed the annotator's prompts"

    assert client.delete("/datastore/label?id=brain_002&tag=final").status_code == 200
    assert client.get("/datastore/label/info?label=brain_002&tag=final").status_code == 404


def test_malformed_stored_prompts_are_refused_at_the_door_and_never_fail_a_run(client, sample_data, studies):
    """Prompts a client sends as label metadata are checked before they are stored; what is already stored unusable
    (malformed prompts, a truncated label file planted past the datastore) is left out of the run, named in its
    publication, left as it is on disk, and the run completes on the rest."""
    from monailabel.datastore.local import LocalDatastore
    from monailabel.interfaces.utils.app import app_instance

    truth = (sample_data / "brain-mri-groundtruth" / "brain_002.nii.gz").read_bytes()
    label_info = [{"name": n, "idx": i} for n, i in LABELS.items()]

    def save(params: dict):
        files = {"label": ("label.nii.gz", io.BytesIO(truth))}
        return client.put("/datastore/label?image=brain_002&tag=final", files=files, data={"params": json.dumps(params)})

    refused = save({"label_info": label_info, "interactions": "xyz"})
    assert refused.status_code == 422 and "'interactions' must be a list of prompt objects, got str" in refused.text
    assert client.head("/datastore/label?image=brain_002&tag=final").status_code == 404  # nothing stored
    assert save({"label_info": label_info}).status_code == 200
    bad_info = {"interactions": [{"label": ["white matter"], "foreground": [[1, 2, 3]]}]}
    refused = client.put("/datastore/label/info?label=brain_002&tag=final", data={"info": json.dumps(bad_info)})
    assert refused.status_code == 422 and "'interactions'[0] must be an object with a 'label'" in refused.text
    assert "interactions" not in client.get("/datastore/label/info?label=brain_002&tag=final").json()

    LocalDatastore.update_label_info(app_instance().datastore(), "brain_002", "final", {"interactions": "xyz"})  # planted
    planted = studies / "labels" / "final" / "brain_000.nii.gz"
    planted.write_bytes(planted.read_bytes()[:2000])  # truncated on disk
    stats = client.post("/train/hf_sam?run_sync=true", json={"max_epochs": 1, "val_split": 0}).json()
    assert stats["epoch"] == 1, stats
    unusable = stats["publication"]["unusable"]
    assert [(u["id"], u["what"]) for u in unusable] == [("brain_000", "label"), ("brain_002", "interactions")], unusable
    assert "truncated or corrupt" in unusable[0]["reason"] and "must be a list" in unusable[1]["reason"]
    assert len(planted.read_bytes()) == 2000
    assert client.get("/info/").json()["train_stats"]["hf_sam"]["publication"]["unusable"] == unusable


def test_background_points_with_a_learned_class_take_regions_away(client, tmp_path):
    """What the README says of background points alone: with a class's name on the class path (the tiny model
    answers by class from the start) they are a correction; without a name they say nothing (422, above)."""
    params = {"label": "grey matter", "background": [[60, 70, 62]], **SLICER_FORMAT}
    response = infer(client, "hf_sam_interactive", "brain_003", params)
    assert response.status_code == 200, response.text
    result, label = multipart(response)
    assert result["prompt_path"] == "class" and nrrd_of(label, tmp_path)[60, 70, 62] == 0


def test_an_object_label_answers_the_prompted_components_only(client, tmp_path, monkeypatch):
    """``--conf object_labels``: a lesion-like label answers the connected components its clicks touch, the other
    labels (tissues) the whole class. The propagation is replaced by one that finds two separate blobs of the
    class, one at the click, and the label's scope is switched on the running task."""
    import torch
    from monailabel.interfaces.utils.app import app_instance
    from scipy import ndimage

    def two_blobs(network, volume, prompted, target_class, *args, **kwargs):
        k, ((x, y, _),) = min(prompted), prompted[min(prompted)]["points"]
        probabilities = torch.zeros(volume.shape[1], volume.shape[2], volume.shape[3])
        probabilities[int(y) - 4 : int(y) + 5, int(x) - 4 : int(x) + 5, k - 2 : k + 3] = 1  # at the click
        probabilities[1:8, 1:8, k - 2 : k + 3] = 1  # elsewhere in the slices
        return probabilities, list(range(k - 2, k + 3)), target_class

    monkeypatch.setattr("lib.infers.interactive.propagate", two_blobs)
    task = app_instance()._infers["hf_sam_interactive"]
    params = {"label": "grey matter", "foreground": [[60, 70, 62]], "background": [], **SLICER_FORMAT}
    for scope, labels, blobs in (("class", frozenset(), 2), ("object", frozenset({"grey matter"}), 1)):
        monkeypatch.setattr(task, "object_labels", labels)
        response = infer(client, "hf_sam_interactive", "brain_003", params)
        assert response.status_code == 200, response.text
        result, label = multipart(response)
        mask = nrrd_of(label, tmp_path)
        assert result["scope"] == scope and mask[60, 70, 62] == 1
        assert ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] == blobs

    params |= {"foreground": [], "background": [[60, 70, 62]]}
    response = infer(client, "hf_sam_interactive", "brain_003", params)
    assert response.status_code == 422 and "answered object by object" in response.text
