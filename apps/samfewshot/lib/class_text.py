"""open_clip class-name embeddings for MASG-SAM's semantic fusion, computed once per label set.

Each class (background included) becomes the prompt "a {modality} image of the {label}" and is embedded by an
open_clip text tower. The embeddings are constants of the label set, so they are cached in memory and on disk
(keyed by encoder and prompts): the CLIP weights are loaded only when a label set is seen for the first time,
and renaming a label changes its prompt and so its embedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, _build_text_tower

from lib.files import atomic_write
from lib.networks.sam_backbone import CheckpointError
from lib.process_local import ProcessLocal

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "a {modality} image of the {label}"
MODALITY_WORDS = {"CT": "CT", "MR": "MRI", "PT": "PET", "US": "ultrasound", "EM": "electron microscopy"}
# `backbone tiny`: a small randomly initialised text tower with the real CLIP tokenizer and context length.
TINY_TEXT_WIDTH = 64
TINY_TEXT_CFG = CLIPTextCfg(width=TINY_TEXT_WIDTH, heads=2, layers=2)


class TextEncoderError(CheckpointError):
    """The open_clip model or its weights cannot be had."""


def class_prompts(label_names: list[str], modality: str) -> list[str]:
    """Prompts for background + the labels, in class-id order."""
    word = MODALITY_WORDS.get(modality.upper(), "medical") if modality and modality.lower() != "auto" else "medical"
    return [PROMPT_TEMPLATE.format(modality=word, label=name) for name in ["background", *label_names]]


class ClassTextEmbedder(ProcessLocal):
    """Embeds class prompts with ``clip_model`` (open_clip name) and ``clip_checkpoint`` (file path or open_clip
    pretrained tag); ``tiny`` builds the small random tower instead. ``embed`` returns (K, D), L2-normalised."""

    process_local = {"_memory": dict, "_lock": threading.Lock}

    def __init__(
        self, clip_model: str = "ViT-B-16", clip_checkpoint: str | None = "openai", tiny: bool = False, cache_dir: str | None = None
    ):
        self.clip_model = clip_model
        self.clip_checkpoint = None if tiny else clip_checkpoint
        self.tiny = tiny
        self.cache_dir = cache_dir
        self._memory: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.encoder_loads = 0  # how often a text tower was built (the cache should keep this at most 1)

    @property
    def identity(self) -> dict[str, str | None]:
        return {"clip_model": self.clip_model, "clip_checkpoint": self.clip_checkpoint, "tiny": str(self.tiny)}

    def _key(self, prompts: list[str]) -> str:
        return hashlib.sha256(json.dumps([self.identity, prompts]).encode()).hexdigest()[:24]

    def embed(self, prompts: list[str]) -> torch.Tensor:
        key = self._key(prompts)
        with self._lock:
            if key in self._memory:
                return self._memory[key]
            path = os.path.join(self.cache_dir, f"text_{key}.pt") if self.cache_dir else None
            if path and os.path.exists(path):
                embeddings = torch.load(path, map_location="cpu", weights_only=True)
            else:
                embeddings = self._encode(prompts)
                if path:
                    with atomic_write(path, "wb") as f:
                        torch.save(embeddings, f)
            self._memory[key] = embeddings
            return embeddings

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = open_clip.get_tokenizer(self.clip_model)
        self.encoder_loads += 1
        if self.tiny:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                tower = _build_text_tower(TINY_TEXT_WIDTH, TINY_TEXT_CFG)
            encode = tower
        else:
            try:
                model = open_clip.create_model(self.clip_model, pretrained=self.clip_checkpoint, require_pretrained=True)
            except Exception as e:
                raise TextEncoderError(
                    f"open_clip text encoder '{self.clip_model}' with weights '{self.clip_checkpoint}' is not available "
                    f"({e}). Set --conf clip_model to an open_clip model name and --conf clip_checkpoint to a local "
                    f"weights file for it; for an offline trial use --conf backbone tiny"
                ) from e
            encode = model.encode_text
        logger.info(f"embedding {len(prompts)} class prompts with {self.identity}")
        with torch.no_grad():
            return F.normalize(encode(tokenizer(prompts)).float(), dim=-1)
