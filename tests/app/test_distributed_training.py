"""Scale-out training: MONAI Label's ``multi_gpu`` path runs the shared trainer under torch DDP, here as two CPU
processes over gloo (on GPUs the same request runs one process per GPU over NCCL)."""

from __future__ import annotations

import pytest
import torch

from lib.adapters import read_adapter

# model -> (datastore fixture, its labelled volumes, a volume to infer)
DATASTORES = {
    "hf_sam": ("studies", ["brain_000", "brain_001"], "brain_002"),
    "masg_sam": ("studies", ["brain_000", "brain_001"], "brain_002"),
    "fgnet": ("em_studies", ["em_000", "em_001"], "em_002"),
}

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", list(DATASTORES))
def test_two_process_gloo_run_publishes_one_adapter(model, app_dir, request):
    from main import SamFewShotApp

    fixture, labelled, unlabelled = DATASTORES[model]
    studies = request.getfixturevalue(fixture)
    app = SamFewShotApp(str(app_dir), str(studies), {"models": model, "backbone": "tiny", "engine": "torch", "auto_scoring": "false"})
    served = app.models[model].model
    base = {n: p.detach().clone() for n, p in served.resident("cpu")[0].named_parameters() if p.requires_grad}

    stats = app.train({"model": model, "max_epochs": 2, "device": "cpu", "multi_gpu": True, "gpus": "0,1"})

    assert stats["epoch"] == 2 and stats["total_epochs"] == 2
    payload = read_adapter(served.adapter_path)
    info = payload["info"]
    assert payload["version"] == 1
    assert info["processes"] == 2  # both ranks joined the process group; rank 0 published
    assert sorted(info["train_volumes"]) == labelled
    # Published names are the model's own (no DistributedDataParallel 'module.' prefix) and the weights moved.
    assert set(payload["state_dict"]) == set(base)
    network, version = served.resident("cpu")
    assert version == 1
    changed = [n for n, p in network.named_parameters() if p.requires_grad and not torch.equal(p, base[n])]
    assert changed
    result = app.infer({"model": model, "image": unlabelled, "device": "cpu"})
    assert result["params"]["adapter_version"] == 1
