"""The app in-process through MONAI Label's FastAPI application and TestClient."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest

from lib.configs import SAM_MODELS

MODELS = list(SAM_MODELS)


def test_info_lists_every_model_with_its_labels(client):
    info = client.get("/info/").json()
    assert info["name"] == "samfewshot"
    assert sorted(info["trainers"]) == MODELS
    assert sorted(info["models"]) == sorted(MODELS + [f"{m}_interactive" for m in MODELS])
    for name in MODELS:
        for task, kind in ((name, "segmentation"), (f"{name}_interactive", "deepgrow")):
            model = info["models"][task]
            assert model["type"] == kind and model["dimension"] == 3
            assert model["labels"] == {"white matter": 1, "grey matter": 2}
            assert model["adapter_version"] == 0
    assert {"random", "first"} <= set(info["strategies"])


def _infer(client, image_id: str, params: dict, model: str = "hf_sam") -> tuple[bytes, dict]:
    r = client.post(f"/infer/{model}?image={image_id}&output=all", data={"params": json.dumps(params)})
    assert r.status_code == 200, r.text
    boundary = r.headers["content-type"].split("boundary=")[1]
    parts = [p for p in r.content.split(b"--" + boundary.encode()) if b"\r\n\r\n" in p]
    result = {}
    label = b""
    for part in parts:
        head, body = part.split(b"\r\n\r\n", 1)
        body = body.rsplit(b"\r\n", 1)[0]
        if b"application/json" in head:
            result = json.loads(body)
        else:
            label = body
    return label, result


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    "extension,dtype,reader",
    [(".nii.gz", "uint8", "nibabel"), (".nrrd", "uint16", "nrrd")],
)
def test_infer_honours_writer_keys_and_keeps_geometry(client, studies, tmp_path, model, extension, dtype, reader):
    label, result = _infer(client, "brain_003", {"result_extension": extension, "result_dtype": dtype}, model)
    assert result["label_names"] == {"white matter": 1, "grey matter": 2}
    path = tmp_path / f"label{extension}"
    path.write_bytes(label)
    image = nib.load(studies / "brain_003.nii.gz")
    if reader == "nibabel":
        out = nib.load(path)
        assert out.shape == image.shape
        np.testing.assert_allclose(out.affine, image.affine, atol=1e-4)
        values = np.asarray(out.dataobj)
    else:
        import nrrd

        values, header = nrrd.read(str(path))
        assert values.shape == image.shape
        np.testing.assert_allclose(np.abs(np.diag(header["space directions"])), image.header.get_zooms(), atol=1e-4)
    assert values.dtype == np.dtype(dtype)
    assert set(np.unique(values)) <= {0, 1, 2}


def _as_array(label: bytes, tmp_path, name: str) -> np.ndarray:
    path = tmp_path / name
    path.write_bytes(label)
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.parametrize("model", MODELS)
def test_prompts_are_sent_to_the_interactive_task(client, model):
    r = client.post(f"/infer/{model}?image=brain_003", data={"params": json.dumps({"foreground": [[60, 70, 62]]})})
    assert r.status_code == 422 and f"send foreground to {model}_interactive" in r.text


def test_malformed_prompt_is_a_client_error(client):
    r = client.post("/infer/masg_sam?image=brain_003", data={"params": json.dumps({"roi": [1, 2, 3]})})
    assert r.status_code == 422 and "roi" in r.text


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_save_label_then_sync_train_serves_new_adapter(client, studies, sample_data, model):
    truth = nib.load(sample_data / "brain-mri-groundtruth" / "brain_002.nii.gz")
    swapped = np.asarray(truth.dataobj).copy()
    swapped[truth.get_fdata() == 1], swapped[truth.get_fdata() == 2] = 2, 1
    body = nib.Nifti1Image(swapped, truth.affine)
    path = studies.parent / "corrected.nii.gz"
    nib.save(body, path)
    label_info = [{"name": "grey matter", "idx": 1}, {"name": "white matter", "idx": 2}]
    with open(path, "rb") as f:
        r = client.put(
            "/datastore/label?image=brain_002&tag=final",
            files={"label": ("corrected.nii.gz", f)},
            data={"params": json.dumps({"label_info": label_info})},
        )
    assert r.status_code == 200, r.text

    _, before = _infer(client, "brain_004", {}, model)
    r = client.post(f"/train/{model}?run_sync=true", json={"max_epochs": 2})
    assert r.status_code == 200, r.text
    _, after = _infer(client, "brain_004", {}, model)
    assert (before["adapter_version"], after["adapter_version"]) == (0, 1)
    assert client.get("/info/").json()["models"][model]["adapter_version"] == 1
    stats = client.get("/info/").json()["train_stats"][model]
    assert stats["epoch"] == 2


@pytest.mark.parametrize(
    "conf,message",
    [
        ({"models": "hf_sam,masg_sm"}, "--conf models 'hf_sam,masg_sm': By 'masg_sm', did you mean 'masg_sam'?"),
        ({"models": "segmentaton,fgnet"}, "--conf models 'segmentaton,fgnet': By 'segmentaton', did you mean 'segmentation'?"),
        (
            {"models": "masg_sam", "masg_modules": "hae,xyz"},
            "'xyz' is not a valid value.",
        ),
        ({"models": "hf_sam", "backbone": "vit-b"}, "--conf backbone 'vit-b': By 'vit-b', did you mean 'vit_b'?"),
        ({"models": "hf_sam", "backbnoe": "tiny"}, "--conf backbnoe: not a key of this app. By 'backbnoe', did you mean 'backbone'?"),
        ({"models": "hf_sam", "lora_rank": "four"}, "--conf lora_rank 'four': expected int"),
        ({"models": "hf_sam", "embedding_cache_mb": "-1"}, "--conf embedding_cache_mb '-1': must be at least 0"),
        ({"models": "hf_sam", "engine": "onnx"}, "--conf engine 'onnx'"),
        ({"models": "hf_sam", "labels": "{not json"}, "--conf labels must be JSON"),
        ({"models": "hf_sam", "labels": '{"a": 1, "b": 3}'}, "ids 1..N"),
        ({"models": "fgnet", "sam2_variant": "hiera_x"}, "--conf sam2_variant 'hiera_x': By 'hiera_x', did you mean"),
        ({"models": "fgnet", "fgnet_patch": "48,64,8"}, "X and Y multiples of 32"),
    ],
)
def test_bad_conf_is_a_clear_start_up_error(app_dir, studies, conf, message):
    from main import SamFewShotApp

    with pytest.raises(ValueError, match=re.escape(message)):
        SamFewShotApp(str(app_dir), str(studies), {"backbone": "tiny", "engine": "torch", **conf})


def test_slices_without_content_are_background_without_a_forward_pass(client, studies, tmp_path):
    from monailabel.interfaces.utils.app import app_instance

    # brain_003 with 20 slices of air added above and below
    img = nib.load(str(studies / "brain_003.nii.gz"))
    data = np.asarray(img.dataobj)
    padded = np.concatenate([np.zeros_like(data[..., :20]), data, np.zeros_like(data[..., :20])], axis=-1)
    shifted = img.affine.copy()
    shifted[:3, 3] -= shifted[:3, 2] * 20
    upload = tmp_path / "padded.nii.gz"
    nib.save(nib.Nifti1Image(padded, shifted), str(upload))
    # Through the upload endpoint: a file dropped into the studies folder is listed only once the datastore's
    # watcher has seen it, which may be after the request.
    with open(upload, "rb") as f:
        r = client.put("/datastore/image", params={"image": "padded"}, files={"file": ("padded.nii.gz", f)})
    assert r.status_code == 200, r.text

    network, _ = app_instance().models["hf_sam"].model.resident("cpu")
    seen = []
    hook = network.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    try:
        label, result = _infer(client, "padded", {})
    finally:
        hook.remove()
    assert result["skipped_slices"] >= 40
    assert sum(seen) == padded.shape[-1] - result["skipped_slices"]  # the network saw only the slab with content
    pred = _as_array(label, tmp_path, "padded_label.nii.gz")
    assert pred.shape == padded.shape
    assert not pred[..., :20].any() and not pred[..., -20:].any()


def test_models_segmentation_means_every_sam_model_and_mixes_with_names():
    from main import selected_models

    assert selected_models("segmentation") == list(SAM_MODELS)
    assert selected_models("fgnet, segmentation") == ["fgnet", *SAM_MODELS]
    assert selected_models("hf_sam,segmentation") == list(SAM_MODELS)  # each once
