"""Incremental fine-tuning of FGNet on saved instance labels.

Everything but the data and the metrics is the shared LoRA trainer's: persisted train/val split, resume from
the published adapter, AdamW with warm-up and poly decay, best adapter published atomically as a new version.
Training samples patches centred on labelled voxels; both affinity heads are supervised by the network's loss.
Validation segments whole held-out volumes (sliding window + watershed) and scores them with the adapted Rand
error, so the published adapter is the one that made the best instances, not the best affinities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from monai.handlers import MeanDice, from_engine
from monai.inferers import SlidingWindowInferer
from monai.transforms import Activationsd, MapTransform
from monailabel.tasks.train.basic_train import Context

from lib.evaluation import instance_scores
from lib.infers.affinity_instances import affinity_watershed
from lib.served_model import ServedModel
from lib.trainers.adapter_trainer import AdapterTrainer
from lib.transforms import em_training_transforms, em_volume_transforms, instance_affinities


class BoundaryPairsd(MapTransform):
    """Training output -> binary boundary maps for a Dice metric: pred = refined affinity < 0.5, label = true
    boundary edges, both (3, X, Y, Z) and zero on unlabelled edges."""

    def __call__(self, data):
        d = dict(data)
        target, mask = instance_affinities(d["label"][0])
        d["pred"] = (torch.sigmoid(d["pred"][:3]) < 0.5).float() * mask
        d["label"] = (1 - target) * mask
        return d


class InstanceAgreement(Metric):
    """Mean of 1 - adapted Rand error between watershed instances of the predicted affinities and the label
    (volumes without any annotated voxel have no score and are skipped)."""

    def reset(self):
        self._scores: list[float] = []

    def update(self, output):
        for affinity, label in zip(*output):
            instances = affinity_watershed(affinity.detach().cpu())
            arand = instance_scores(instances, np.asarray(label.cpu())[0])["arand"]
            if not np.isnan(arand):
                self._scores.append(1.0 - arand)

    def compute(self):
        return float(np.mean(self._scores)) if self._scores else 0.0


class FGNetTrainer(AdapterTrainer):
    TRAIN_METRIC = "train_boundary_dice"
    VAL_METRIC = "val_instance_agreement"

    def __init__(self, model: ServedModel, patch_size: Sequence[int], samples_per_volume: int = 4, config: dict[str, Any] | None = None):
        self.patch_size = tuple(patch_size)
        self.samples_per_volume = samples_per_volume
        super().__init__(model, description=f"Incremental fine-tuning of {model.name} on neuron instance labels", config=config)

    def train_pre_transforms(self, context: Context):
        return em_training_transforms(self.patch_size, self.samples_per_volume)

    def val_pre_transforms(self, context: Context):
        return em_volume_transforms(with_label=True)

    def train_post_transforms(self, context: Context):
        return [BoundaryPairsd(keys=("pred", "label"))]

    def val_post_transforms(self, context: Context):
        return [Activationsd(keys="pred", sigmoid=True)]

    def val_inferer(self, context: Context):
        return SlidingWindowInferer(roi_size=self.patch_size, sw_batch_size=2, overlap=0.25, mode="gaussian", progress=False)

    def train_key_metric(self, context: Context):
        return {self.TRAIN_METRIC: MeanDice(output_transform=from_engine(["pred", "label"]), include_background=True)}

    def val_key_metric(self, context: Context):
        return {self.VAL_METRIC: InstanceAgreement(output_transform=from_engine(["pred", "label"]))}
