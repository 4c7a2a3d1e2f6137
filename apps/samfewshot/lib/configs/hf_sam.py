from lib.configs.sam_segmentation import SamSegmentationConfig
from lib.networks.hf_sam import HFSam


class HFSamConfig(SamSegmentationConfig):
    """HF-SAM: AWFFM skip-feature fusion before and after SAM's two-way transformer."""

    network_cls = HFSam
