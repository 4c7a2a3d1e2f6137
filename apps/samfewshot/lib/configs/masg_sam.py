from __future__ import annotations

import os
from typing import Any

from lib.class_text import ClassTextEmbedder, class_prompts
from lib.conf import ConfKey, declare_conf_keys
from lib.configs.sam_segmentation import SamSegmentationConfig
from lib.networks.masg_sam import MASGSam

MASG_MODULES = ("hae", "bfe", "dsf")
CONF_KEYS = declare_conf_keys(
    ConfKey("masg_modules", ",".join(MASG_MODULES), "MASG-SAM modules to build", choices=MASG_MODULES, listed=True),
    ConfKey("clip_model", "ViT-B-16", "open_clip model of MASG-SAM's class prompts"),
    ConfKey(
        "clip_checkpoint",
        "",
        "open_clip weights file, or pretrained tag downloaded once (e.g. openai); empty: none (no CLIP weights install "
        "offline), so MASG-SAM runs without DSF, as /info/ says",
    ),
)


class MASGSamConfig(SamSegmentationConfig):
    """MASG-SAM: hierarchical attention (HAE), boundary enhancement (BFE), CLIP-guided semantic fusion (DSF).

    ``--conf masg_modules`` (default ``hae,bfe,dsf``) switches modules off for ablation; ``clip_model`` and
    ``clip_checkpoint`` choose the open_clip text encoder (``backbone tiny``: a small random one). No CLIP weights
    install offline, so without a ``clip_checkpoint`` DSF is not built, and the model's ``notes`` (in ``/info/``) say so.
    """

    network_cls = MASGSam

    def init(self, name, model_dir, conf, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.modules = [m for m in self.conf["masg_modules"].split(",") if m]
        if "dsf" in self.modules and self.model.pretrained and not self.conf["clip_checkpoint"]:
            self.modules.remove("dsf")
            self.model.notes.append(
                "DSF is off: it needs an open_clip text encoder, and no CLIP weights install offline; set --conf "
                "clip_checkpoint to a weights file for --conf clip_model (or to an open_clip tag such as openai, "
                "downloaded once) to build it"
            )
        self.text = ClassTextEmbedder(
            clip_model=self.conf["clip_model"],
            clip_checkpoint=self.conf["clip_checkpoint"],
            tiny=self.model.backbone == "tiny",
            cache_dir=os.path.join(model_dir, "text_embeddings"),
        )
        self.prompts = class_prompts(list(self.labels), self.model.modality)
        self.model.options = {"masg_modules": self.modules, "class_prompts": self.prompts, **self.text.identity}

    def network_options(self) -> dict[str, Any]:
        use = {f"use_{m}": m in self.modules for m in MASG_MODULES}
        return {"class_text": self.text.embed(self.prompts) if use["use_dsf"] else None, **use}
