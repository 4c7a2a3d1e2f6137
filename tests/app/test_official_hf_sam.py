"""The official HF-SAM through the app: --conf recipe paper trains with SGD on the decoder's logits and records the
recipe with the published adapter; an adapter of the earlier fused-qkv format is refused with a message that says
what to do, stays on disk, and the next training run publishes one that serves."""

from __future__ import annotations

import pytest
import torch
from fastapi import HTTPException

from lib.networks.sam_segmenter import SamSegmenter


def test_paper_recipe_trains_with_sgd_on_decoder_logits(app_dir, studies, monkeypatch):
    from main import SamFewShotApp

    optimisers, outputs = [], []
    sgd = torch.optim.SGD

    class RecordedSGD(sgd):
        def __init__(self, params, **options):
            optimisers.append(options)
            super().__init__(params, **options)

    forward = SamSegmenter.forward

    def recorded_forward(self, image, *args, **kwargs):
        logits = forward(self, image, *args, **kwargs)
        if self.training:
            outputs.append((tuple(image.shape[-2:]), tuple(logits.shape[-2:])))
        return logits

    monkeypatch.setattr(torch.optim, "SGD", RecordedSGD)
    monkeypatch.setattr(SamSegmenter, "forward", recorded_forward)
    conf = {"models": "hf_sam", "backbone": "tiny", "engine": "torch", "auto_scoring": "false", "recipe": "paper"}
    app = SamFewShotApp(str(app_dir), str(studies), conf)
    stats = app.train({"model": "hf_sam", "max_epochs": 1, "val_split": 0, "device": "cpu"})
    assert stats["epoch"] == 1
    assert optimisers == [{"lr": 0.005, "momentum": 0.9, "weight_decay": 1e-4}]
    assert outputs and all(logits == (size[0] // 4, size[1] // 4) for size, logits in outputs)
    payload = torch.load(app_dir / "model" / "hf_sam.pt", weights_only=True)
    assert payload["info"]["recipe"] == "paper"


def test_fused_qkv_adapter_is_refused_with_a_message_and_training_replaces_it(app_dir, studies):
    from main import SamFewShotApp

    old = {"format": "samfewshot-adapter", "format_version": 1, "version": 3, "config": {}, "info": {}, "state_dict": {}}
    (app_dir / "model").mkdir(exist_ok=True)
    torch.save(old, app_dir / "model" / "hf_sam.pt")
    app = SamFewShotApp(str(app_dir), str(studies), {"models": "hf_sam", "backbone": "tiny", "engine": "torch", "auto_scoring": "false"})
    request = {"model": "hf_sam", "image": "brain_004", "device": "cpu"}
    with pytest.raises(HTTPException) as refused:
        app.infer(request)
    assert refused.value.status_code == 503 and "format 1 (LoRA on the fused qkv projection)" in refused.value.detail
    assert torch.load(app_dir / "model" / "hf_sam.pt", weights_only=True) == old  # kept as it was

    app.train({"model": "hf_sam", "max_epochs": 1, "val_split": 0, "device": "cpu"})
    assert app.infer(request)["params"]["adapter_version"] == 4
