"""PUT /model/{model}: only an adapter of the model's own configuration is accepted, and it is published as a new
numbered version; anything else answers 422 and the served adapter stays as it was."""

from __future__ import annotations

import io

import torch

from lib.adapters import list_versions, publish_adapter, read_adapter
from lib.networks.lora import adapter_state_dict


def adapter_bytes(tmp_path, model, config: dict) -> bytes:
    path = tmp_path / "elsewhere" / "adapter.pt"
    publish_adapter(str(path), adapter_state_dict(model.build_network()), config, {"note": "trained elsewhere"})
    return path.read_bytes()


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def put(client, model: str, content: bytes):
    return client.put(f"/model/{model}", files={"file": ("adapter.pt", io.BytesIO(content))})


def test_adapter_upload_is_checked_and_published_as_a_version(client, tmp_path):
    from monailabel.interfaces.utils.app import app_instance

    served = app_instance().models["hf_sam"].model
    good = adapter_bytes(tmp_path, served, served.adapter_config())

    for content, reason in [
        (b"not a checkpoint", "cannot read adapter"),
        (good[: len(good) // 2], "cannot read adapter"),
        (saved({"weights": 1}), "is not a samfewshot adapter"),
        (adapter_bytes(tmp_path, served, {**served.adapter_config(), "lora_rank": 8}), "lora_rank"),
    ]:
        response = put(client, "hf_sam", content)
        assert response.status_code == 422, response.text
        assert "not an adapter of hf_sam" in response.text and reason in response.text
    assert put(client, "no_such_model", good).status_code in (404, 422)
    assert list_versions(served.adapter_path) == [] and client.get("/info/").json()["models"]["hf_sam"]["adapter_version"] == 0

    response = put(client, "hf_sam", good)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 1
    payload = read_adapter(served.adapter_path)
    assert payload["info"]["uploaded_version"] == 1 and payload["info"]["note"] == "trained elsewhere"
    assert list_versions(served.adapter_path) == [1]
    assert client.get("/info/").json()["models"]["hf_sam"]["adapter_version"] == 1
