from lib.networks.affinities import boundary_map, instance_affinities

from .em import em_training_transforms, em_volume_transforms
from .intensity import NormalizeIntensityByModalityd, image_modality
from .labels import RemapLabelsByNamed, argmax_labels, client_to_model_ids
from .slices import content_slices, inference_transforms, training_slice_transforms, volume_transforms
