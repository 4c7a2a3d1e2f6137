"""Transform chains for EM volumes (FGNet): no resampling, since neurons are only a few voxels apart at
membranes, and the array order is kept, with the section (anisotropic) axis last as stored."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import (
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from .intensity import NormalizeIntensityByModalityd

EM_MODALITY = "EM"  # any non-CT modality is normalised by its 0.5-99.5 percentiles


def em_volume_transforms(with_label: bool = False) -> list:
    """Image (and instance label) -> (1, X, Y, Z) float image in [0, 1] (and int64 ids)."""
    keys = ["image", "label"] if with_label else ["image"]
    return [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        NormalizeIntensityByModalityd(keys="image", modality=EM_MODALITY),
        EnsureTyped(keys=keys, dtype=[np.float32, np.int64][: len(keys)]),
    ]


def em_training_transforms(patch_size: Sequence[int], samples_per_volume: int) -> list:
    """Volumes -> ``samples_per_volume`` patches centred on labelled voxels (a partly annotated correction trains
    where it was annotated), with flips, in-plane 90-degree rotations and intensity jitter. Affinities are computed
    from the augmented label by the loss, so augmentation never has to transform them."""
    keys = ["image", "label"]
    return em_volume_transforms(with_label=True) + [
        SpatialPadd(keys=keys, spatial_size=patch_size),  # label padding is 0 = unlabelled: masked in the loss
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch_size, pos=1.0, neg=0.0, num_samples=samples_per_volume),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys=keys, prob=0.5, spatial_axes=(0, 1)),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        EnsureTyped(keys=keys, dtype=[np.float32, np.int64]),
    ]
