"""Intensity normalisation by modality (docs/architecture.md, data conventions): CT -> HU window [-125, 275] -> [0, 1];
others -> percentiles."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRangePercentiles

CT_WINDOW = (-125.0, 275.0)
PERCENTILES = (0.5, 99.5)
# Air is about -1000 HU; no MR scanner writes values this negative, so it marks an image in Hounsfield units.
HU_AIR_THRESHOLD = -500.0


def image_modality(image: torch.Tensor, requested: str = "auto") -> str:
    """'CT' or the requested/recorded modality; 'auto' reads the DICOM Modality tag, else looks for HU air."""
    if requested and requested.lower() != "auto":
        return requested.upper()
    meta = image.meta if isinstance(image, MetaTensor) else {}
    recorded = meta.get("0008|0060") or meta.get("Modality")
    if recorded:
        return str(recorded).strip().upper()
    return "CT" if float(image.min()) <= HU_AIR_THRESHOLD else "MR"


class NormalizeIntensityByModalityd(MapTransform):
    """Map intensities to [0, 1]: CT by the HU window, every other modality by its 0.5-99.5 percentiles.

    ``modality`` is 'auto' or a DICOM modality code; a ``modality`` entry in the data overrides it per request.
    """

    def __init__(self, keys: KeysCollection, modality: str = "auto", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.modality = modality
        self.ct = ScaleIntensityRange(*CT_WINDOW, b_min=0.0, b_max=1.0, clip=True)
        self.other = ScaleIntensityRangePercentiles(*PERCENTILES, b_min=0.0, b_max=1.0, clip=True)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            modality = image_modality(d[key], d.get("modality") or self.modality)
            d[key] = (self.ct if modality == "CT" else self.other)(d[key])
        return d
