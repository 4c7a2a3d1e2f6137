from .fgnet import FGNetConfig
from .hf_sam import HFSamConfig
from .masg_sam import MASGSamConfig

# Model name (the --conf models value and the name clients see) -> its TaskConfig.
MODEL_CONFIGS = {"hf_sam": HFSamConfig, "masg_sam": MASGSamConfig, "fgnet": FGNetConfig}
