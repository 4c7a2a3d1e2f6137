from lib.configs.sam_segmentation import SamSegmentationConfig
from lib.networks.hf_sam import HFSam


class HFSamConfig(SamSegmentationConfig):
    """HF-SAM as the official code runs it: an AWFFM fuses the first global-attention block's output into the image
    tokens after SAM's two-way transformer; LoRA of rank 5 on q and v."""

    network_cls = HFSam
