"""--conf recipe paper through the app's own training run: SGD as the official HF-SAM code, the loss on the decoder's
logits, and the recipe recorded with the published adapter."""

from __future__ import annotations

import torch

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
