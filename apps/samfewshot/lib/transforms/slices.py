"""Transform chains that turn volumes into the axial slices the SAM models see.

Volumes are loaded, put in RAS orientation (so the last axis is axial), intensity-normalised by modality and
resized in-plane to the model size; every geometric step is invertible, so a prediction goes back to the
input's own geometry with ``Invertd``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    Randomizable,
    Resized,
    SqueezeDimd,
)

from .intensity import NormalizeIntensityByModalityd
from .labels import RemapLabelsByNamed

# NRRD names its space in words; MONAI's NrrdReader keeps the words for RAS files (3D Slicer's .seg.nrrd), and
# Orientation accepts only its own keys.
NRRD_SPACES = {"right-anterior-superior": "RAS", "left-posterior-superior": "LPS"}


class NrrdSpaceToKeysd(MapTransform):
    """Set ``meta['space']`` from NRRD's words to MONAI's SpaceKeys; the affine already matches that space."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", None)
            if meta is not None and meta.get("space") in NRRD_SPACES:
                meta["space"] = NRRD_SPACES[meta["space"]]
        return d


def volume_transforms(
    img_size: int,
    modality: str,
    model_labels: Mapping[str, int] | None = None,
    intensity: Mapping[str, Any] | None = None,
    annotated_key: str | None = None,
) -> list:
    """Image (and label, when ``model_labels`` is given) -> RAS, normalised, (1, S, S, D) volumes; ``intensity``: the
    normalisation's options (``ServedModel.intensity``); ``annotated_key``: where the classes the label annotates
    go (``RemapLabelsByNamed``)."""
    keys = ["image", "label"] if model_labels is not None else ["image"]
    transforms = [
        LoadImaged(keys=keys, image_only=True),
        NrrdSpaceToKeysd(keys=keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
        NormalizeIntensityByModalityd(keys="image", modality=modality, **(intensity or {})),
    ]
    if model_labels is not None:
        transforms.append(RemapLabelsByNamed(keys="label", model_labels=model_labels, annotated_key=annotated_key))
    transforms.append(Resized(keys=keys, spatial_size=(img_size, img_size, -1), mode=["bilinear", "nearest"][: len(keys)]))
    return transforms


def inference_transforms(img_size: int, modality: str, intensity: Mapping[str, Any] | None = None) -> list:
    return volume_transforms(img_size, modality, intensity=intensity) + [EnsureTyped(keys="image", dtype=np.float32)]


def training_slice_transforms(
    img_size: int,
    modality: str,
    model_labels: Mapping[str, int],
    slices_per_volume: int,
    foreground_ratio: float,
    intensity: Mapping[str, Any] | None = None,
) -> list:
    """Volumes -> ``slices_per_volume`` random axial slices (1, S, S), ``foreground_ratio`` of them centred on
    labelled voxels so that slices showing the structures dominate, one of them an annotator's interaction slice
    when the volume has any (``InteractionPromptsd``, ``InteractionMapd``); light 2D augmentation, the interaction map
    moving with the label. Each slice carries its label's ``annotated`` classes (``RemapLabelsByNamed``)."""
    keys = ["image", "label", "click_map"]
    return volume_transforms(img_size, modality, model_labels, intensity, annotated_key="annotated") + [
        InteractionPromptsd(model_labels),
        InteractionMapd(),
        WithInteractionSliced(
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=(-1, -1, 1),
                pos=foreground_ratio,
                neg=1.0 - foreground_ratio,
                num_samples=slices_per_volume,
            ),
            keys,
        ),
        SqueezeDimd(keys=keys, dim=-1),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandAffined(
            keys=keys,
            prob=0.5,
            rotate_range=np.deg2rad(10),
            scale_range=0.1,
            mode=["bilinear", "nearest", "nearest"],
            padding_mode="zeros",
        ),
        EnsureTyped(keys=keys, dtype=[np.float32, np.int64, np.uint8]),
    ]


# Marks of an annotator's interaction drawn into a training volume (``InteractionMapd``).
POSITIVE_MARK, NEGATIVE_MARK, BOX_MARK = 1, 2, 3
MARK_RADIUS = 1  # a point is drawn as a (2r + 1)^2 square, so rotation and scaling in augmentation keep it


class InteractionPromptsd(MapTransform):
    """An annotator's interactions with this volume (``interactions``: the prompts of their requests in voxel
    indices of the volume as stored, kept with the saved label) -> the same on the model's volume: a list of
    (class, {slice: SlicePrompt}), the class 0 when the client named none. Deterministic, so it runs before a
    dataset's cache, where the volume still carries its geometry; interactions that do not fit this volume (a
    refused request's) or name a structure outside the model's labels (answered by the object path) are left out."""

    def __init__(self, model_labels: Mapping[str, int]):
        super().__init__(keys=["image"])
        self.model_labels = dict(model_labels)

    def __call__(self, data):
        from lib.transforms.prompts import slice_prompts

        d = dict(data)
        converted = []
        for interaction in d.pop("interactions", None) or []:
            if interaction.get("label") is not None and interaction["label"] not in self.model_labels:
                continue
            try:
                prompted = slice_prompts(d["image"], interaction)
            except (ValueError, KeyError, TypeError):
                continue
            if prompted:
                converted.append((self.model_labels.get(interaction.get("label"), 0), prompted))
        d["interaction_prompts"] = converted
        return d


class InteractionMapd(Randomizable, MapTransform):
    """One of a volume's interactions (``interaction_prompts``, from ``InteractionPromptsd``), at random, drawn on one
    of its slices into ``click_map`` (1, S, S, D): ``POSITIVE_MARK``/``NEGATIVE_MARK`` points over a filled
    ``BOX_MARK`` box, so they move with the label through augmentation. ``click_class`` is the class they were for
    (0: the client named none), ``click_slice`` the slice (-1: none)."""

    def __init__(self):
        super().__init__(keys=["image"])

    def __call__(self, data):
        d = dict(data)
        interactions = d.pop("interaction_prompts", None) or []
        marks = torch.zeros((1, *d["image"].shape[1:]), dtype=torch.uint8)
        d["click_class"], d["click_slice"] = 0, -1
        if interactions:
            target_class, prompted = interactions[self.R.randint(len(interactions))]
            k = sorted(prompted)[self.R.randint(len(prompted))]
            plane = marks[0, :, :, k]
            if prompted[k]["box"]:
                x0, y0, x1, y1 = (int(round(v)) for v in prompted[k]["box"])
                plane[y0 : y1 + 1, x0 : x1 + 1] = BOX_MARK
            for x, y, label in prompted[k]["points"]:
                row, col = int(round(y)), int(round(x))
                plane[max(row - MARK_RADIUS, 0) : row + MARK_RADIUS + 1, max(col - MARK_RADIUS, 0) : col + MARK_RADIUS + 1] = (
                    POSITIVE_MARK if label == 1 else NEGATIVE_MARK
                )
            d["click_class"], d["click_slice"] = target_class, k
        d["click_map"] = marks
        return d


class WithInteractionSliced(Randomizable):
    """``cropper``'s random slices of a volume, the first replaced by its interaction slice when it has one
    (``click_slice`` >= 0), so training replays an annotator's interaction in every epoch."""

    def __init__(self, cropper: RandCropByPosNegLabeld, keys: list[str]):
        self.cropper = cropper
        self.keys = keys

    def set_random_state(self, seed=None, state=None):
        self.cropper.set_random_state(seed, state)
        return super().set_random_state(seed, state)

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data):
        d = dict(data)
        k = d.pop("click_slice", -1)
        crops = self.cropper(d)
        if k >= 0:
            crops[0] = {**crops[0], **{key: d[key][..., k : k + 1] for key in self.keys}}
        return crops


def content_slices(volume: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """(1, S, S, D) intensities normalised to [0, 1] -> (D,) bool: axial slices holding anything brighter than
    ``threshold`` (the body or the field of view, not the air or padding around it)."""
    return volume[0].flatten(0, 1).amax(0) > threshold
