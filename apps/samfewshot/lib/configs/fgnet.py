"""FGNet: SAM2-guided neuron instance segmentation of 3D EM volumes (serve EM datastores with ``--conf models fgnet``).

``--conf`` keys: ``sam2_variant`` (hiera_t default, hiera_s, hiera_b+, hiera_l; ``backbone tiny`` switches to a
small random Hiera), ``sam2_checkpoint`` (path or URL; default the official SAM 2.1 file of the variant),
``sam2_checkpoint_sha256`` (pins the file's hash), ``sam2_lora_rank`` (0 = SAM2 frozen, the default),
``fgnet_patch`` (X,Y,Z patch in voxels; X and Y multiples of 32), plus the shared ``device``, ``preload``,
``engine``, ``precision`` (of the engine) and ``max_epochs``.
"""

from __future__ import annotations

import os
from typing import Any

from monailabel.interfaces.config import TaskConfig

from lib.compute import torch_device
from lib.conf import ConfKey, declare_conf_keys, parse_conf
from lib.engines.openvino_engine import engine_from_conf
from lib.infers.affinity_instances import AffinityInstances
from lib.networks.fgnet import IN_PLANE_STRIDE, FGNet, FGNetOptions, build_fgnet, options_config
from lib.networks.sam2_backbone import HIERA_VARIANTS, SAM2_CHECKPOINTS, get_hiera_spec
from lib.networks.sam_backbone import CheckpointError
from lib.served_model import ServedModel
from lib.trainers.fgnet_trainer import FGNetTrainer
from lib.weights import load_sam2_encoder_state, resolve_checkpoint

# Patches: 16 sections by 256 x 256 pixels (about 1 um square at 4 nm); the tiny model uses smaller ones on CPU.
DEFAULT_PATCH = (256, 256, 16)
TINY_PATCH = (64, 64, 16)
CONF_KEYS = declare_conf_keys(
    ConfKey("sam2_variant", "hiera_t", "FGNet's SAM2 image encoder", choices=tuple(v for v in HIERA_VARIANTS if v != "tiny")),
    ConfKey("sam2_checkpoint", "", "FGNet's SAM2 weights: a path or URL (default: the official file of the variant)"),
    ConfKey("sam2_checkpoint_sha256", "", "expected sha256 of the SAM2 file"),
    ConfKey("sam2_lora_rank", "0", "LoRA rank on Hiera's attention; 0 keeps SAM2 frozen", kind=int, minimum=0),
    ConfKey("fgnet_patch", "", "FGNet patch X,Y,Z in voxels (default 256,256,16; 64,64,16 with backbone tiny)"),
)


def parse_patch(value: str) -> tuple[int, int, int]:
    try:
        patch = tuple(int(v) for v in value.split(","))
    except ValueError:
        patch = ()
    if len(patch) != 3 or min(patch) < 1 or patch[0] % IN_PLANE_STRIDE or patch[1] % IN_PLANE_STRIDE:
        raise ValueError(f"--conf fgnet_patch must be X,Y,Z voxels with X and Y multiples of {IN_PLANE_STRIDE}, got '{value}'")
    return patch


class FGNetConfig(TaskConfig):
    scores_volumes = False  # the active-learning scores are defined for the segmentation models

    def init(self, name: str, model_dir: str, conf: dict[str, Any], planner: Any, **kwargs):
        super().init(name, model_dir, parse_conf(conf), planner, **kwargs)
        conf = self.conf
        tiny = conf["backbone"] == "tiny"
        variant = "tiny" if tiny else conf["sam2_variant"]
        self.patch_size = parse_patch(conf["fgnet_patch"] or ",".join(map(str, TINY_PATCH if tiny else DEFAULT_PATCH)))
        self.device = torch_device(conf["device"])
        self.path = os.path.join(model_dir, f"{name}.pt")
        self.model = ServedModel(
            name=name,
            labels={},
            backbone=variant,
            adapter_path=self.path,
            build_network=self.build_network,
            modality="EM",
            lora_rank=conf["sam2_lora_rank"],
            options={"patch_size": list(self.patch_size), **options_config(FGNetOptions())},
        )

    def build_network(self) -> FGNet:
        checkpoint = None
        if self.model.backbone != "tiny" or self.conf["sam2_checkpoint"]:
            checkpoint = resolve_checkpoint(
                self.conf["sam2_checkpoint"], SAM2_CHECKPOINTS.get(self.model.backbone), self.model_dir, "sam2_checkpoint", "SAM2"
            )
        spec = get_hiera_spec(self.model.backbone)
        state = load_sam2_encoder_state(checkpoint, spec, self.conf["sam2_checkpoint_sha256"] or None) if checkpoint else None
        try:
            return build_fgnet(self.model.backbone, self.model.lora_rank, state)
        except CheckpointError as e:
            raise CheckpointError(f"'{checkpoint}': {e}") from e

    def infer(self) -> AffinityInstances:
        return AffinityInstances(
            self.model,
            self.patch_size,
            device=self.device,
            preload=self.conf["preload"],
            engine=engine_from_conf(self.name, self.model_dir, self.conf, self.device, "fp32"),
        )

    def trainer(self) -> FGNetTrainer:
        config = {"device": self.device, "max_epochs": self.conf["max_epochs"]}
        return FGNetTrainer(self.model, self.patch_size, config=config)
