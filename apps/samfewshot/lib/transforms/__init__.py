from .intensity import NormalizeIntensityByModalityd, image_modality
from .labels import RemapLabelsByNamed, client_to_model_ids
from .slices import inference_transforms, training_slice_transforms, volume_transforms
