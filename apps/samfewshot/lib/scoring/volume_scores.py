"""Per-volume active-learning scores, written into the datastore's image info.

``info[<method>][<model>] = {<value key>: ..., <other fields>, "adapter_version": v, "ts": t}``. A volume is scored again only when
the model's served adapter changed since its stored score, so re-running a scoring method after nothing was
trained is cheap. Both methods look at up to ``max_slices`` axial slices evenly spread over the slices that show
anything (the body), at the model size.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.networks.sam_backbone import encode_with_taps
from lib.scoring.uncertainty import class_entropies, foreground_uncertainty, tta_probabilities
from lib.served_model import ServedModel
from lib.transforms import content_slices, volume_transforms

logger = logging.getLogger(__name__)


def body_slices(model: ServedModel, image_path: str, max_slices: int) -> torch.Tensor:
    """(N, 1, S, S) normalised axial slices of the volume, evenly spread over the non-empty ones."""
    volume = Compose(volume_transforms(model.img_size, model.modality, intensity=model.intensity))({"image": image_path})[
        "image"
    ].as_tensor()
    indexes = torch.nonzero(content_slices(volume)).flatten()
    if len(indexes) == 0:
        indexes = torch.arange(volume.shape[-1])
    chosen = indexes[np.linspace(0, len(indexes) - 1, min(max_slices, len(indexes))).round().astype(int)]
    return volume[..., chosen].permute(3, 0, 1, 2).float()


class VolumeScoring(ScoringMethod):
    """Scores every datastore volume with every model (or the request's ``model``); subclasses define the value."""

    key: str = ""
    value_key: str = ""
    #: the value reads the class heads, which a pretrained backbone has untrained until its first adapter
    needs_trained_heads: bool = False

    def __init__(self, models: dict[str, ServedModel], device: str, description: str, max_slices: int = 24):
        super().__init__(description)
        self.models = models
        self.device = device
        self.max_slices = max_slices

    def value(self, model: ServedModel, network: torch.nn.Module, slices: torch.Tensor) -> dict[str, Any]:
        """The fields stored for one volume (``value_key`` among them)."""
        raise NotImplementedError

    def __call__(self, request, datastore: Datastore):
        names = [request["model"]] if request.get("model") else list(self.models)
        unknown = [n for n in names if n not in self.models]
        if unknown:
            raise ValueError(f"unknown model {unknown} for scoring '{self.key}'; valid: {', '.join(self.models)}")
        result = {"scored": 0, "skipped": 0}
        for name in names:
            model = self.models[name]
            network, version = model.resident(self.device)
            if self.needs_trained_heads and model.pretrained and version == 0:
                logger.info(f"scoring '{self.key}' for {name}: not before its first adapter (its class heads are untrained)")
                continue
            for image_id in datastore.list_images():
                stored = datastore.get_image_info(image_id).get(self.key, {})
                if stored.get(name, {}).get("adapter_version") == version:
                    result["skipped"] += 1
                    continue
                slices = body_slices(model, datastore.get_image_uri(image_id), self.max_slices).to(self.device)
                entry = {**self.value(model, network, slices), "adapter_version": version, "ts": int(time.time())}
                datastore.update_image_info(image_id, {self.key: {**stored, name: entry}})
                result["scored"] += 1
        logger.info(f"scoring '{self.key}' for {names}: {result}")
        return result


class UncertaintyScoring(VolumeScoring):
    """Mean voxel entropy of the softmax under flips and MC dropout over the predicted foreground (``score``), and per
    class weighted by the class probability (``per_class``, {label name: entropy})."""

    key = "uncertainty"
    value_key = "score"
    needs_trained_heads = True

    def __init__(self, models, device, mc_samples: int = 2, dropout: float = 0.1, **kwargs):
        super().__init__(models, device, "Predictive entropy under test-time flips and MC dropout (foreground)", **kwargs)
        self.mc_samples = mc_samples
        self.dropout = dropout

    def value(self, model, network, slices):
        probabilities = tta_probabilities(network, slices, self.mc_samples, self.dropout)
        per_class = dict(zip(model.labels, class_entropies(probabilities)))
        return {"score": foreground_uncertainty(probabilities), "per_class": per_class}


class EmbeddingScoring(VolumeScoring):
    """Compact volume descriptor: the SAM image embedding of the slices, average-pooled, L2-normalised."""

    key = "embedding"
    value_key = "vector"

    def __init__(self, models, device, **kwargs):
        super().__init__(models, device, "Pooled SAM image-encoder features of sampled slices (for diversity)", **kwargs)

    @torch.no_grad()
    def value(self, model, network, slices):
        embedding, _ = encode_with_taps(network.image_encoder, slices.expand(-1, 3, -1, -1), ())
        return {"vector": F.normalize(embedding.mean((0, 2, 3)), dim=0).cpu().tolist()}
