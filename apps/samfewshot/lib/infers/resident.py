"""What every samfewshot infer task shares: the network is the model's resident one (adapter hot-swapped),
a missing checkpoint or unreadable adapter answers 503 with the reason, a volume the models cannot segment
(unreadable, not 3D, NaN, constant, too large: lib/checks/volumes.py) answers 422 with the reason, and results carry
the adapter version and the engine that ran the image encoder (``lib.engines``: OpenVINO on a CPU once it has
compiled the served adapter, torch until then and everywhere else)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import nibabel as nib
import numpy as np
import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from torch import nn

from lib.adapters import AdapterError
from lib.checks.requests import IGNORED_KEY
from lib.checks.volumes import stored_image_grid
from lib.engines.openvino_engine import CompiledEncoder, EncoderEngine
from lib.errors import http_errors
from lib.networks.sam_backbone import CheckpointError
from lib.served_model import ServedModel

logger = logging.getLogger(__name__)


class ResidentModelInfer(BasicInferTask):
    """A 3D segmentation task on ``model``'s resident network; subclasses add description and config.

    Args:
        model: the served model whose resident network (on the request's device) runs and whose labels are reported.
        engine: compiles the network's image encoder (``encoding_graph``) for CPU requests; None runs torch throughout.
        preload: build the resident network and start the engine's build at start-up, not on the first request (an
            engine that quantises waits for the first request's volume); a missing checkpoint or bad adapter is then
            logged and the server starts anyway.
        type: MONAI Label infer type the task reports (``segmentation``; ``deepgrow`` for clicks).
        kwargs: passed on to ``BasicInferTask`` (``description``, ``config`` ...).
    """

    def __init__(
        self,
        model: ServedModel,
        *,
        engine: EncoderEngine | None = None,
        preload: bool = False,
        type: str = InferType.SEGMENTATION,
        **kwargs,
    ):
        self.model = model
        self.engine = engine
        super().__init__(path=model.adapter_path, network=None, type=type, labels=model.labels, dimension=3, **kwargs)
        if preload:
            try:
                self.model.resident(self.config()["device"])
                self.compiled_encoder(self.config()["device"])
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
        info["engine"] = self.engine.status() if self.engine else {"engine": "torch"}
        if self.model.notes:
            info["notes"] = self.model.notes
        return info

    def encoding_graph(self, network: nn.Module) -> nn.Module:
        """The network's image-dependent part as a module of its own (``image_encoding()``), for ``self.engine``."""
        return network.image_encoding()

    def compiled_encoder(self, device, calibration: Callable[[], torch.Tensor] | None = None) -> CompiledEncoder | None:
        """The engine's encoder for the adapter the resident network on ``device`` serves, or None while torch
        serves it (no engine, or the engine is still building for a newly published adapter: started here, once).
        An engine that quantises builds only where ``calibration`` gives it slices (a request's volume)."""
        if self.engine is None or str(device) != "cpu":
            return None
        stamp = self.model.loaded_stamp(str(device))
        compiled = self.engine.encoder(stamp)
        if compiled is None and (calibration or not self.engine.needs_calibration) and self.engine.claim(stamp):
            graph = self.model.copy_resident(str(device), stamp, self.encoding_graph)
            if graph is not None:
                self.engine.prepare(stamp, graph, calibration() if calibration else None)
        return compiled

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
        result_json["engine"] = data.get("engine", "torch")
        if data.get(IGNORED_KEY):  # request keys the route dropped: no task option has that name
            result_json[IGNORED_KEY] = data[IGNORED_KEY]
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
