from lib.conf import CONF_KEYS

from .fgnet import FGNetConfig
from .hf_sam import HFSamConfig
from .masg_sam import MASGSamConfig
from .sam_segmentation import SamSegmentationConfig

# Model name (the --conf models value and the name clients see) -> its TaskConfig.
MODEL_CONFIGS = {"hf_sam": HFSamConfig, "masg_sam": MASGSamConfig, "fgnet": FGNetConfig}
# The models that segment classes on axial slices (with an interactive task each), as opposed to FGNet's instances.
SAM_MODELS = tuple(name for name, config in MODEL_CONFIGS.items() if issubclass(config, SamSegmentationConfig))

__all__ = ["CONF_KEYS", "MODEL_CONFIGS", "SAM_MODELS"]  # CONF_KEYS: the shared keys and every model's own
