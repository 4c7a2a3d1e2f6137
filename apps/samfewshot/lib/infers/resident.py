"""What every samfewshot infer task shares: the network is the model's resident one (adapter hot-swapped),
a missing checkpoint or unreadable adapter answers 503 with the reason, and results carry the adapter version."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import HTTPException
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.model import SegmentationModel
from lib.networks.lora import AdapterError
from lib.networks.sam_backbone import CheckpointError

logger = logging.getLogger(__name__)


class ResidentModelInfer(BasicInferTask):
    def __init__(self, model: SegmentationModel, *, preload: bool = False, **kwargs):
        self.model = model
        super().__init__(path=model.adapter_path, network=None, **kwargs)
        if preload:
            try:
                self.model.resident(self._config["device"])
            except (CheckpointError, AdapterError) as e:
                # The server still starts; every request to this model answers with the reason.
                logger.error(f"{model.name}: cannot preload: {e}")

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
        return result_file, result_json
