"""What every samfewshot infer task shares: the network is the model's resident one (adapter hot-swapped),
a missing checkpoint or unreadable adapter answers 503 with the reason, a volume the models cannot segment
(unreadable, not 3D, NaN, constant, too large: lib/validation.py) answers 422 with the reason, and results carry
the adapter version."""

from __future__ import annotations

import logging
from typing import Any

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.model import SegmentationModel
from lib.networks.lora import AdapterError
from lib.networks.sam_backbone import CheckpointError
from lib.validation import http_errors, stored_image_grid

logger = logging.getLogger(__name__)


class ResidentModelInfer(BasicInferTask):
    """A 3D segmentation task on ``model``'s resident network; subclasses add description and config."""

    def __init__(self, model: SegmentationModel, *, preload: bool = False, type: str = InferType.SEGMENTATION, **kwargs):
        self.model = model
        super().__init__(path=model.adapter_path, network=None, type=type, labels=model.labels, dimension=3, **kwargs)
        if preload:
            try:
                self.model.resident(self._config["device"])
            except (CheckpointError, AdapterError) as e:
                # The server still starts; every request to this model answers with the reason.
                logger.error(f"{model.name}: cannot preload: {e}")

    def __call__(self, request, callbacks=None):
        image = request.get("image")
        if isinstance(image, str):
            with http_errors():
                stored_image_grid(image)
        return super().__call__(request, callbacks)

    def is_valid(self) -> bool:
        # The base weights are enough to serve; an adapter is optional.
        return True

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["adapter_version"] = self.model.served_version()
        return info

    def _get_network(self, device, data):
        try:
            network, version = self.model.resident(str(device))
        except (CheckpointError, AdapterError) as e:
            logger.error(f"{self.model.name} is unavailable: {e}")
            raise HTTPException(status_code=503, detail=f"{self.model.name} is unavailable: {e}") from e
        if data is not None:
            data["adapter_version"] = version
        return network

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        result_file, result_json = super().writer(data, extension, dtype)
        result_json["adapter_version"] = data.get("adapter_version", 0)
        keep_spatial_units(data.get("image_path"), result_file)
        return result_file, result_json


def keep_spatial_units(image_path: str | None, label_path: str | None) -> None:
    """Give a NIfTI label the spatial units of its NIfTI image. EM and microscopy volumes are often stored in microns;
    MONAI Label's label writer assumes mm, and a viewer that honours the units would put the label 1000x off."""
    nifti = (".nii", ".nii.gz")
    if not (isinstance(image_path, str) and isinstance(label_path, str)):
        return
    if not (image_path.endswith(nifti) and label_path.endswith(nifti)):
        return
    units = nib.load(image_path).header.get_xyzt_units()[0]
    label = nib.load(label_path)
    if units in ("unknown", label.header.get_xyzt_units()[0]):
        return
    label = nib.Nifti1Image(np.asarray(label.dataobj), label.affine, label.header)
    label.header.set_xyzt_units(xyz=units)
    nib.save(label, label_path)
