"""Volume segmentation with a 2D SAM model, slice by slice; shared by HF-SAM and MASG-SAM (their interactive
sibling is ``lib.infers.interactive``)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from monai.data import MetaTensor
from monai.inferers import Inferer, SliceInferer
from monai.transforms import Activationsd, CastToTyped, Compose, Invertd, Lambdad, SqueezeDimd
from monailabel.transform.cache import CacheTransformDatad
from monailabel.transform.writer import Writer
from monailabel.utils.others.generic import strtobool

from lib.compute import autocast
from lib.engines.openvino_engine import calibration_slices
from lib.infers.embedding_cache import CachedEncoding, EmbeddingCache
from lib.infers.resident import ResidentModelInfer
from lib.scoring.uncertainty import normalised_entropy, tta_probabilities
from lib.served_model import ServedModel
from lib.transforms import argmax_labels, content_slices, inference_transforms

# Logit margin of background over every class on slices without content: softmax gives background with certainty.
BACKGROUND_LOGIT_GAP = 1e4


def untrained_message(name: str) -> str:
    """What the automatic task answers before any adapter was trained: what to do instead."""
    return (
        f"{name} has not been trained on this label set yet: its class heads start untrained, so an automatic "
        f"segmentation now would be noise. Segment with a box or clicks on {name}_interactive, which the pretrained "
        f"backbone already answers; save one or two volumes as final labels and train {name} (Train in 3D Slicer or "
        f"OHIF, POST /train/{name}, or --conf auto_train true), then run it again."
    )


def prepared_volume_key(image: Any, model: ServedModel) -> str | None:
    """What a prepared volume depends on: the file (real path, size, modification time) and the model's slice size,
    modality and intensity normalisation; None for an image that is not a file."""
    if not isinstance(image, str) or not os.path.isfile(image):
        return None
    stat = os.stat(image)
    return json.dumps([os.path.realpath(image), stat.st_size, stat.st_mtime_ns, model.img_size, model.modality, model.intensity])


class SamSliceInfer(ResidentModelInfer):
    """What the SAM models' tasks share: the resident network behind an image-embedding cache (one per model, passed
    to each of its tasks, so a click on a volume just segmented runs only the decoder), the inference transforms,
    slice batches and precision.

    Args:
        model: the served SAM model (HF-SAM or MASG-SAM); its ``img_size`` and ``modality`` set the inference transforms.
        embeddings: the model's image-embedding cache, shared by all its tasks; ``max_bytes`` 0 turns it off.
        device: the default device requests run on, and the resident network lives on (``cpu``, ``cuda``, ``cuda:1`` ...).
        batch_size: slices per forward (and per encoder batch when propagating clicks); a request's ``batch_size`` overrides it.
        precision: ``fp32``, or ``bf16`` to run the network under autocast (already resolved from ``auto``).
        preload: build the resident network at start-up rather than on the first request.
        kwargs: passed on to ``ResidentModelInfer`` (``engine``, ``type``, ``description`` ...).
    """

    def __init__(
        self,
        model: ServedModel,
        embeddings: EmbeddingCache,
        *,
        device: str = "cpu",
        batch_size: int = 8,
        precision: str = "fp32",
        preload: bool = False,
        **kwargs,
    ):
        self.batch_size = batch_size
        self.precision = precision
        self.embeddings = embeddings
        # The same transform instances must run forwards and be inverted (MONAI matches them by identity; a volume
        # read back from the cache carries no identity, so either of the model's tasks may invert it).
        self._pre = inference_transforms(model.img_size, model.modality, model.intensity) + [
            CacheTransformDatad(keys="image", hash_key="prepared_volume")
        ]
        config = {"device": device, "batch_size": batch_size, "modality": model.modality}
        super().__init__(model, preload=preload, config=config, **kwargs)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "precision": self.precision}  # chosen at start-up (--conf precision), not per request

    def _get_network(self, device, data):
        """The resident network, its image encoder run by the engine once it is ready for the served adapter, and
        the image embeddings of slices seen before with the same adapter read from the cache (``embedding_cache_mb``;
        0 turns it off).

        The cache outlives a change of engine: torch and the engine's compiled copy encode the same adapter to within
        the engine's tolerance (tests/unit/test_engine.py), and the engine becomes ready while an annotator
        works on a volume torch has just encoded; starting over then cost the first request on the engine the whole
        volume again (docs/benchmarks.md). ``engine`` in a result names the encoder of the slices not cached."""
        network = super()._get_network(device, data)
        if data is None:
            return network
        compiled = self.compiled_encoder(device, lambda: network.model_input(calibration_slices(torch.as_tensor(data["image"]).float())))
        data["engine"] = compiled.label if compiled else f"torch-{self.precision}"
        if compiled is None and not self.embeddings.max_bytes:
            return network
        scope = (str(device), data["adapter_version"])
        return CachedEncoding(network, self.embeddings, scope, compiled or network.encode)

    def pre_transforms(self, data=None) -> list:
        return self._pre

    def run_pre_transforms(self, data: dict[str, Any], transforms: list) -> dict[str, Any]:
        """The transforms, or the volume they prepared before: an annotator's clicks, boxes and re-runs come one after
        another on one volume, and preparing a 512 x 512 x 100 volume (1.8 s) takes longer than decoding a click.
        MONAI Label's ``CacheTransformDatad`` keeps it in memory for 10 minutes under the file's identity (path,
        size, modification time) and the model's preprocessing, so both of the model's tasks reuse it and an edited
        file is prepared again; an image given as data, not as a file, is not kept."""
        key = prepared_volume_key(data.get("image"), self.model)
        if key is None:
            return super().run_pre_transforms(data, [t for t in transforms if not isinstance(t, CacheTransformDatad)])
        data["prepared_volume"] = key
        return super().run_pre_transforms(data, transforms)

    def inverse_transforms(self, data=None):
        return None  # Invertd in post_transforms restores the geometry


class SliceSegmentation(SamSliceInfer):
    """Load any MONAI-readable volume -> normalise -> axial slices at the model size, in batches -> softmax ->
    back to the input's geometry and orientation -> arg-max label. The result JSON carries ``label_names``.

    Args:
        model: the served SAM model.
        embeddings: the model's image-embedding cache, shared with its interactive task.
        description: the task's description in MONAI Label; default names the model and its backbone.
        kwargs: passed on to ``SamSliceInfer`` (``device``, ``batch_size``, ``precision``, ``preload``, ``engine``).
    """

    def __init__(self, model: ServedModel, embeddings: EmbeddingCache, description: str = "", **kwargs):
        description = description or f"{model.name} ({model.backbone}) segmentation of axial slices"
        super().__init__(model, embeddings, description=description, **kwargs)

    def inferer(self, data=None) -> Inferer:
        size = self.model.img_size
        batch = int((data or {}).get("batch_size", self.batch_size))
        return SliceInferer(roi_size=(size, size), sw_batch_size=batch, spatial_dim=2, progress=False)

    def post_transforms(self, data=None) -> list:
        maps = ["pred", "uncertainty"]  # the uncertainty map exists only when the request asked for it
        return [
            Activationsd(keys="pred", softmax=True),
            Invertd(keys=maps, transform=Compose(self._pre), orig_keys=["image"] * 2, nearest_interp=False, allow_missing_keys=True),
            Lambdad(keys="pred", func=argmax_labels),
            Lambdad(keys="uncertainty", func=lambda u: (u.clamp(0, 1) * 255).round(), allow_missing_keys=True),
            SqueezeDimd(keys=maps, dim=0, allow_missing_keys=True),
            CastToTyped(keys=maps, dtype=np.uint8, allow_missing_keys=True),
        ]

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        """Every slice through the SliceInferer (prompt-free: clicks and boxes go to the model's interactive task).

        With ``precision`` bf16 the network runs under autocast (the bound against fp32 is in docs/benchmarks.md and
        tests/unit/test_precision.py); logits are handed on as fp32.
        """
        prompts = [k for k in ("foreground", "background", "roi") if data.get(k)]
        if prompts:
            raise HTTPException(
                status_code=422,
                detail=f"{self.model.name} segments without prompts; send {', '.join(prompts)} to {self.model.name}_interactive",
            )
        if self.model.pretrained and self.model.served_version() == 0:
            self._get_network(device, data)  # missing base weights answer first (503, naming the file)
            raise HTTPException(status_code=409, detail=untrained_message(self.model.name))
        with autocast(self.precision, device):
            data = self._segment_content(data, convert_to_batch, device)
            # The request's flag gives way to the map itself (or to nothing): later steps look for the map.
            if strtobool(data.pop("uncertainty", False)):
                data["uncertainty"] = self._uncertainty_map(data, device)
        data["pred"] = data["pred"].float()
        if data.get("uncertainty") is not None:
            data["uncertainty"] = data["uncertainty"].float()
        return data

    def _segment_content(self, data: dict[str, Any], convert_to_batch, device) -> dict[str, Any]:
        """Run the network on the slab of slices that hold content (``content_slices``) only; slices of air or
        padding above and below it are background without a forward pass."""
        image = data["image"]
        content = torch.nonzero(content_slices(image.as_tensor())).flatten()
        if len(content) == 0 or (content[0] == 0 and content[-1] == image.shape[-1] - 1):
            return super().run_inferer(data, convert_to_batch, device)
        first, last = int(content[0]), int(content[-1]) + 1
        data["image"] = image[..., first:last]
        data = super().run_inferer(data, convert_to_batch, device)
        slab = torch.as_tensor(data["pred"])
        pred = torch.full((slab.shape[0], *image.shape[1:]), -BACKGROUND_LOGIT_GAP, dtype=slab.dtype, device=slab.device)
        pred[0] = 0.0
        pred[..., first:last] = slab
        data["image"], data["pred"] = image, MetaTensor(pred, meta=image.meta)
        data["skipped_slices"] = int(image.shape[-1] - (last - first))
        return data

    def _uncertainty_map(self, data: dict[str, Any], device) -> MetaTensor:
        """(1, S, S, D) normalised entropy of the flip-averaged softmax, per voxel, with the image's geometry."""
        network = self._get_network(device, data)
        image = data["image"]
        slices = image.as_tensor().to(device).permute(3, 0, 1, 2)  # (D, 1, S, S)
        entropy = normalised_entropy(tta_probabilities(network, slices, batch_size=self.batch_size))
        return MetaTensor(entropy.permute(1, 2, 0)[None].cpu(), meta=image.meta, applied_operations=image.applied_operations)

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        result_file, result_json = super().writer(data, extension, dtype)
        result_json["skipped_slices"] = data.get("skipped_slices", 0)
        if data.get("uncertainty") is not None:
            # Stored by the app as a datastore label with tag "uncertainty"; 255 = maximal entropy (log K).
            uncertainty = data["uncertainty"]
            result_json["uncertainty"] = {
                "file": Writer(label="uncertainty")(data)[0],
                "scale": "normalised entropy of the flip-averaged softmax x 255",
                "mean": round(float(uncertainty.float().mean()) / 255, 4),
                "max": round(float(uncertainty.max()) / 255, 4),
            }
        return result_file, result_json
