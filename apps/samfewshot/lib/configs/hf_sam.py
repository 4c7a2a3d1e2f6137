from typing import Any

from lib.configs.sam_segmentation import SamSegmentationConfig
from lib.networks.hf_sam import HFSam


class HFSamConfig(SamSegmentationConfig):
    """HF-SAM as the official code runs it: an AWFFM fuses the first global-attention block's output into the image
    tokens after SAM's two-way transformer; LoRA of rank 5 on q and v. ``--conf hf_sam_fusion`` picks the decoder."""

    network_cls = HFSam

    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.model.options = {"fusion": self.conf["hf_sam_fusion"]}

    def network_options(self) -> dict[str, Any]:
        return {"fusion": self.conf["hf_sam_fusion"]}
