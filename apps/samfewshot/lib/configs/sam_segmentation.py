"""TaskConfig shared by the SAM segmentation models; a model's own config file only names its network."""

from __future__ import annotations

import json
import os
from typing import Any

from monailabel.interfaces.config import TaskConfig

from lib.compute import resolve_precision, torch_device
from lib.conf import listed_names, parse_conf
from lib.engines.openvino_engine import engine_from_conf
from lib.infers.embedding_cache import EmbeddingCache
from lib.infers.interactive import SliceInteraction
from lib.infers.slice_segmentation import SamSliceInfer, SliceSegmentation
from lib.networks.sam_backbone import CheckpointError, get_encoder_spec
from lib.networks.sam_segmenter import SamSegmenter, build_segmenter
from lib.served_model import ServedModel, parse_labels
from lib.trainers.adapter_trainer import AdapterTrainer
from lib.trainers.recipes import RECIPES
from lib.weights import load_official_checkpoint, resolve_sam_checkpoint

# Label set of the brain-MRI sample datastore.
DEFAULT_LABELS = {"white matter": 1, "grey matter": 2}


def parse_object_labels(text: str, labels: dict[str, int]) -> frozenset[str]:
    """``--conf object_labels``: comma-separated names of ``labels``; an unknown one stops the server with the
    nearest label."""
    return frozenset(listed_names("object_labels", text, labels))


class SamSegmentationConfig(TaskConfig):
    """Reads the shared ``--conf`` keys (backbone, sam_checkpoint, labels, object_labels, lora_rank, modality, device, preload,
    precision, train_precision, engine, embedding_cache_mb, max_epochs, recipe)."""

    network_cls: type[SamSegmenter]
    scores_volumes = True  # uncertainty and embedding scores come from these models

    def init(self, name: str, model_dir: str, conf: dict[str, Any], planner: Any, **kwargs):
        super().init(name, model_dir, parse_conf(conf), planner, **kwargs)
        conf = self.conf
        backbone = conf["backbone"]
        try:
            labels = json.loads(conf["labels"]) if conf["labels"] else DEFAULT_LABELS
        except json.JSONDecodeError as e:
            raise ValueError(f"--conf labels must be JSON like '{json.dumps(DEFAULT_LABELS)}': {e}") from e
        self.labels = parse_labels(labels)
        self.object_labels = parse_object_labels(conf["object_labels"], self.labels)
        self.device = torch_device(conf["device"])
        self.path = os.path.join(model_dir, f"{name}.pt")
        self.model = ServedModel(
            name=name,
            labels=self.labels,
            backbone=backbone,
            adapter_path=self.path,
            build_network=self.build_network,
            modality=conf["modality"],
            lora_rank=conf["lora_rank"] or self.network_cls.default_lora_rank,
        )

    def network_options(self) -> dict[str, Any]:
        """Model-specific constructor arguments; they become part of the adapter's config."""
        return {}

    def build_network(self) -> SamSegmenter:
        checkpoint = resolve_sam_checkpoint(self.model.backbone, self.conf["sam_checkpoint"], self.model_dir)
        state = load_official_checkpoint(checkpoint, get_encoder_spec(self.model.backbone)) if checkpoint else None
        try:
            return build_segmenter(
                self.network_cls, self.model.backbone, self.model.num_classes, self.model.lora_rank, state, **self.network_options()
            )
        except CheckpointError as e:
            raise CheckpointError(f"'{checkpoint}': {e}") from e

    def infer(self) -> dict[str, SamSliceInfer]:
        """The segmentation task and its interactive sibling (``<name>_interactive``), on one resident network and
        one image-embedding cache."""
        # On the 2-core CPU, 8 slices per forward ran vit_b 1.8x slower per slice than 2 (cache-bound attention);
        # a GPU needs the larger batches to fill (docs/benchmarks.md).
        precision = resolve_precision(self.conf["precision"], self.device)
        options = {
            "device": self.device,
            "batch_size": 8 if self.device.startswith("cuda") else 2,
            "preload": self.conf["preload"],
            "precision": precision,
            "engine": engine_from_conf(self.name, self.model_dir, self.conf, self.device, precision, self.conf["quantize"]),
        }
        embeddings = EmbeddingCache(self.conf["embedding_cache_mb"] << 20)
        return {
            self.name: SliceSegmentation(self.model, embeddings, **options),
            f"{self.name}_interactive": SliceInteraction(self.model, embeddings, object_labels=self.object_labels, **options),
        }

    def trainer(self) -> AdapterTrainer:
        config = {"device": self.device, "max_epochs": self.conf["max_epochs"]}
        # Half of the training slices are spent on simulated clicks, boxes and propagation (lib.trainers.simulated_prompts).
        precision = resolve_precision(self.conf["train_precision"], self.device, "train_precision")
        return AdapterTrainer(self.model, recipe=RECIPES[self.conf["recipe"]], interactive_share=0.5, precision=precision, config=config)
