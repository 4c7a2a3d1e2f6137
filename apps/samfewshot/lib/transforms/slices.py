"""Transform chains that turn volumes into the axial slices the SAM models see.

Volumes are loaded, put in RAS orientation (so the last axis is axial), intensity-normalised by modality and
resized in-plane to the model size; every geometric step is invertible, so a prediction goes back to the
input's own geometry with ``Invertd``.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def volume_transforms(img_size: int, modality: str, model_labels: Mapping[str, int] | None = None) -> list:
    """Image (and label, when ``model_labels`` is given) -> RAS, normalised, (1, S, S, D) volumes."""
    keys = ["image", "label"] if model_labels is not None else ["image"]
    transforms = [
        LoadImaged(keys=keys, image_only=True),
        NrrdSpaceToKeysd(keys=keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
        NormalizeIntensityByModalityd(keys="image", modality=modality),
    ]
    if model_labels is not None:
        transforms.append(RemapLabelsByNamed(keys="label", model_labels=model_labels))
    transforms.append(
        Resized(keys=keys, spatial_size=(img_size, img_size, -1), mode=["bilinear", "nearest"][: len(keys)])
    )
    return transforms


def inference_transforms(img_size: int, modality: str) -> list:
    return volume_transforms(img_size, modality) + [EnsureTyped(keys="image", dtype=np.float32)]


def training_slice_transforms(
    img_size: int, modality: str, model_labels: Mapping[str, int], slices_per_volume: int, foreground_ratio: float
) -> list:
    """Volumes -> ``slices_per_volume`` random axial slices (1, S, S), ``foreground_ratio`` of them centred on
    labelled voxels so that slices showing the structures dominate; light 2D augmentation."""
    keys = ["image", "label"]
    return volume_transforms(img_size, modality, model_labels) + [
        RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=(-1, -1, 1),
            pos=foreground_ratio,
            neg=1.0 - foreground_ratio,
            num_samples=slices_per_volume,
        ),
        SqueezeDimd(keys=keys, dim=-1),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandAffined(
            keys=keys,
            prob=0.5,
            rotate_range=np.deg2rad(10),
            scale_range=0.1,
            mode=["bilinear", "nearest"],
            padding_mode="zeros",
        ),
        EnsureTyped(keys=keys, dtype=[np.float32, np.int64]),
    ]


def content_slices(volume: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """(1, S, S, D) intensities normalised to [0, 1] -> (D,) bool: axial slices holding anything brighter than
    ``threshold`` (the body or the field of view, not the air or padding around it)."""
    return volume[0].flatten(0, 1).amax(0) > threshold
