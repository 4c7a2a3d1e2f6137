"""Prompt-free multi-class SAM: the part HF-SAM and MASG-SAM share.

A slice in [0, 1] (no ImageNet mean/std, as SAMed/H-SAM) is repeated to three channels and encoded by SAM's
ViT; the mask decoder runs with SAM's default sparse/dense prompt embeddings and one mask token per class
(background included), so a softmax over the mask logits is the class posterior. Models differ only in the
hooks ``fuse_before`` (image embedding before the two-way transformer) and ``fuse_after`` (image tokens after
it, before upscaling and the hypernetwork heads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import apply_lora, mark_trainable
from .sam_backbone import (
    CheckpointError,
    SamEncoderSpec,
    build_image_encoder,
    build_mask_decoder,
    build_prompt_encoder,
    encode_with_taps,
    get_encoder_spec,
    load_official_checkpoint,
)


class SamSegmenter(nn.Module):
    """SAM as a semantic segmenter of ``num_classes`` classes (background included).

    forward: (B, 1 or 3, S, S) in [0, 1] -> logits (B, num_classes, S, S), S = ``spec.img_size``.
    """

    #: parameter-name prefixes that train beside the LoRA weights; subclasses add their own modules
    trainable_prefixes: tuple[str, ...] = ("prompt_encoder.", "mask_decoder.")

    def __init__(self, spec: SamEncoderSpec, num_classes: int, tap_indexes: tuple[int, ...] = ()):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.spec = spec
        self.num_classes = num_classes
        self.tap_indexes = tuple(tap_indexes)
        self.image_encoder = build_image_encoder(spec)
        self.prompt_encoder = build_prompt_encoder(spec)
        self.mask_decoder = build_mask_decoder(spec, num_classes)

    def fuse_before(self, embedding: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        """(B, C, h, w) image embedding before the two-way transformer."""
        return embedding

    def fuse_after(self, tokens: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        """(B, C, h, w) image tokens after the two-way transformer."""
        return tokens

    def project_taps(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder taps (B, embed_dim, h, w) -> whatever the fusion hooks consume."""
        return taps

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-2:]
        if image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)
        if tuple(size) != (self.spec.img_size, self.spec.img_size):
            image = F.interpolate(image, size=(self.spec.img_size,) * 2, mode="bilinear", align_corners=False)
        embedding, taps = encode_with_taps(self.image_encoder, image, self.tap_indexes)
        taps = self.project_taps(taps)
        masks = self.decode(self.fuse_before(embedding, taps), taps)
        return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)

    def decode(self, embedding: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        """SAM's ``MaskDecoder.predict_masks`` with the ``fuse_after`` hook; (B, C, h, w) -> (B, K, 4h, 4w)."""
        decoder = self.mask_decoder
        b, c, h, w = embedding.shape
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens[None].expand(b, -1, -1), sparse.expand(b, -1, -1)], dim=1)
        src = embedding + dense
        pos = self.prompt_encoder.get_dense_pe().expand(b, -1, -1, -1)
        hs, src = decoder.transformer(src, pos, tokens)
        src = self.fuse_after(src.transpose(1, 2).reshape(b, c, h, w), taps)
        upscaled = decoder.output_upscaling(src)
        hyper = torch.stack(
            [mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )  # (B, K, C/8)
        return (hyper @ upscaled.flatten(2)).view(b, self.num_classes, *upscaled.shape[-2:])

    def load_sam_state(self, official: dict[str, torch.Tensor]) -> None:
        """Load an official SAM state dict already adapted to ``spec`` (``load_official_checkpoint``/
        ``adapt_official_state``); call before ``add_lora``.

        SAM has four mask tokens and hypernetwork heads; class k starts from SAM's token ``k % 4`` so every
        class begins from a pretrained mask head. The IoU head is not part of this model.
        """
        state = dict(official)
        state = {k: v for k, v in state.items() if not k.startswith("mask_decoder.iou_prediction_head.")}
        tokens = state["mask_decoder.mask_tokens.weight"]
        n_official = tokens.shape[0]
        state["mask_decoder.mask_tokens.weight"] = tokens[[k % n_official for k in range(self.num_classes)]]
        hyper = "mask_decoder.output_hypernetworks_mlps."
        official_heads = {k: v for k, v in state.items() if k.startswith(hyper)}
        for key in official_heads:
            del state[key]
        for k in range(self.num_classes):
            for key, value in official_heads.items():
                index, rest = key[len(hyper) :].split(".", 1)
                if int(index) == k % n_official:
                    state[f"{hyper}{k}.{rest}"] = value
        own = set(self.state_dict())
        missing = [k for k in own if k not in state and k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder."))]
        if missing:
            raise CheckpointError(f"truncated SAM checkpoint: {len(missing)} tensors are missing, e.g. {missing[:3]}")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    def add_lora(self, rank: int) -> None:
        """LoRA on the encoder's attention qkv; afterwards only LoRA and ``trainable_prefixes`` train."""
        apply_lora(self, rank=rank, target_modules=r"image_encoder\.blocks\.\d+\.attn\.qkv")
        mark_trainable(self, self.trainable_prefixes)


def build_segmenter(
    model_cls: type[SamSegmenter],
    backbone: str,
    num_classes: int,
    lora_rank: int = 4,
    sam_checkpoint: str | None = None,
) -> SamSegmenter:
    """Build ``model_cls`` with LoRA, from an official SAM checkpoint when given.

    Random initialisation is seeded, so every process (server, training subprocess) builds the same
    frozen backbone and an adapter trained in one applies in another.
    """
    spec = get_encoder_spec(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(spec, num_classes)
        if sam_checkpoint:
            official = load_official_checkpoint(sam_checkpoint, spec)
            try:
                model.load_sam_state(official)
            except CheckpointError as e:
                raise CheckpointError(f"'{sam_checkpoint}': {e}") from e
        model.add_lora(lora_rank)
    return model
