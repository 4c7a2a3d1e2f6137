from .hf_sam import HFSamConfig

# Model name (the --conf models value and the name clients see) -> its TaskConfig.
MODEL_CONFIGS = {"hf_sam": HFSamConfig}
