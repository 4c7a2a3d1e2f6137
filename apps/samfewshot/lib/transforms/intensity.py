"""Intensity normalisation by modality (docs/architecture.md, data conventions): CT -> HU window -> [0, 1]; others ->
0.5-99.5 percentiles -> [0, 1]. The window and whether the percentiles count zero voxels follow the backbone's
pretraining (``ServedModel.intensity``): [-125, 275] and all voxels for SAM's ViT (SAMed, HF-SAM); W400/L40 and the
non-zero voxels for LiteMedSAM (its ``pre_CT_MR.py``)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRangePercentiles, Transform

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


class ScaleNonzeroPercentiles(Transform):
    """Clip to the ``PERCENTILES`` of the non-zero voxels and map that range to [0, 1] (zero voxels stay 0 when the
    image is non-negative), as LiteMedSAM's ``pre_CT_MR.py`` prepares MR."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        values = torch.as_tensor(image).flatten()
        nonzero = values[values != 0]
        if not len(nonzero):
            return image * 0
        low, high = torch.quantile(nonzero.float()[:: max(1, len(nonzero) // 1_000_000)], torch.tensor(PERCENTILES) / 100).tolist()
        return ScaleIntensityRange(low, high, b_min=0.0, b_max=1.0, clip=True)(image)


class NormalizeIntensityByModalityd(MapTransform):
    """Map intensities to [0, 1]: CT by the HU window, every other modality by its 0.5-99.5 percentiles.

    Args:
        keys: the images to normalise.
        modality: 'auto' or a DICOM modality code; a ``modality`` entry in the data overrides it per request.
        ct_window: (low, high) HU of the CT window.
        nonzero_percentiles: the percentiles of the non-zero voxels only (``ScaleNonzeroPercentiles``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality: str = "auto",
        ct_window: tuple[float, float] = CT_WINDOW,
        nonzero_percentiles: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.modality = modality
        self.ct = ScaleIntensityRange(*ct_window, b_min=0.0, b_max=1.0, clip=True)
        self.other = (
            ScaleNonzeroPercentiles()
            if nonzero_percentiles
            else ScaleIntensityRangePercentiles(*PERCENTILES, b_min=0.0, b_max=1.0, clip=True)
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            modality = image_modality(d[key], d.get("modality") or self.modality)
            d[key] = (self.ct if modality == "CT" else self.other)(d[key])
        return d
