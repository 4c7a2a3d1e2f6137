"""Multi-class SAM: the part HF-SAM and MASG-SAM share.

A slice in [0, 1] (no ImageNet mean/std, as SAMed/H-SAM) is repeated to three channels and encoded by SAM's
ViT; the mask decoder runs with SAM's default sparse/dense prompt embeddings (or with point/box prompts when a
client sends them) and one mask token per class (background included), so a softmax over the mask logits is the
class posterior. Models differ only in the hooks: ``fuse_before`` (image embedding before the two-way
transformer), ``class_tokens`` (the mask tokens), ``fuse_after`` (image tokens after the transformer),
``refine_upscaled`` (upscaled features before the hypernetwork product) and ``training_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from segment_anything.modeling.common import LayerNorm2d
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
    seeded_init,
)


@dataclass
class Prompts:
    """SAM prompts in model-input pixels (x, y): points (B, N, 2) with labels (B, N) (1 foreground, 0 background,
    -1 padding) and/or boxes (B, 4) as x0, y0, x1, y1."""

    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None


@dataclass
class SliceFeatures:
    """What the hooks may read: the encoder input (B, 3, S, S) and the projected encoder taps."""

    image: torch.Tensor
    taps: list[torch.Tensor]


class ChannelSpatialAttention(nn.Module):
    """CBAM-style attention: channel weights from a shared MLP on average- and max-pooled descriptors, then a
    spatial map from a conv over the channel-wise mean and max; (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, reduction: int = 4, spatial_kernel: int = 7):
        super().__init__()
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(inplace=True), nn.Conv2d(channels // reduction, channels, 1)
        )
        self.spatial_conv = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(self.channel_mlp(x.mean((2, 3), keepdim=True)) + self.channel_mlp(x.amax((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.spatial_conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)))


class SamSegmenter(nn.Module):
    """SAM as a semantic segmenter of ``num_classes`` classes (background included).

    forward: (B, 1 or 3, H, W) in [0, 1] -> logits (B, num_classes, H, W); inputs are resized to ``spec.img_size``.
    """

    #: parameter-name prefixes that train beside the LoRA weights; subclasses add their own modules
    trainable_prefixes: tuple[str, ...] = ("prompt_encoder.", "mask_decoder.", "tap_projections.")

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
        # Encoder taps are projected embed_dim -> prompt_dim like SAM's neck (1x1 conv + LayerNorm2d).
        self.tap_projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(spec.embed_dim, spec.prompt_dim, 1, bias=False), LayerNorm2d(spec.prompt_dim))
            for _ in self.tap_indexes
        )
        self.segmentation_loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.1, lambda_dice=0.9)
        # Monte-Carlo dropout on the decoder's image tokens, set only while estimating uncertainty.
        self.mc_dropout = 0.0

    def project_taps(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder taps (B, embed_dim, h, w) -> (B, prompt_dim, h, w)."""
        return [proj(t) for proj, t in zip(self.tap_projections, taps)]

    def fuse_before(self, embedding: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        """(B, C, h, w) image embedding before the two-way transformer."""
        return embedding

    def class_tokens(self) -> torch.Tensor:
        """(K, C) mask tokens, one per class."""
        return self.mask_decoder.mask_tokens.weight

    def fuse_after(self, tokens: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        """(B, C, h, w) image tokens after the two-way transformer."""
        return tokens

    def refine_upscaled(self, upscaled: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        """(B, C/8, 4h, 4w) upscaled features before the hypernetwork product."""
        return upscaled

    def training_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Loss of the last training forward; logits (B, K, H, W), label (B, 1, H, W) class ids."""
        return self.segmentation_loss(logits, label)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Everything that depends on the image alone: (B, 3, S, S) model input -> image embedding (B, C, h, w)
        and projected taps [(B, C, h, w)]. Prompts only enter after it, so a caller may reuse its result."""
        embedding, taps = encode_with_taps(self.image_encoder, image, self.tap_indexes)
        return embedding, self.project_taps(taps)

    def forward(
        self,
        image: torch.Tensor,
        prompts: Prompts | None = None,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]] | None = None,
    ) -> torch.Tensor:
        """``encode`` replaces ``self.encode`` (e.g. by a lookup of embeddings computed before)."""
        size = image.shape[-2:]
        if image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)
        model_size = (self.spec.img_size, self.spec.img_size)
        if tuple(size) != model_size:
            image = F.interpolate(image, size=model_size, mode="bilinear", align_corners=False)
        embedding, taps = (encode or self.encode)(image)
        features = SliceFeatures(image=image, taps=taps)
        masks = self.decode(self.fuse_before(embedding, features), features, prompts)
        return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)

    def decode(self, embedding: torch.Tensor, features: SliceFeatures, prompts: Prompts | None = None) -> torch.Tensor:
        """SAM's ``MaskDecoder.predict_masks`` with the hooks; (B, C, h, w) -> (B, K, 4h, 4w)."""
        decoder = self.mask_decoder
        b, c, h, w = embedding.shape
        prompts = prompts or Prompts()
        points = (prompts.points, prompts.point_labels) if prompts.points is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=prompts.boxes, masks=None)
        tokens = torch.cat([decoder.iou_token.weight, self.class_tokens()], dim=0)
        tokens = torch.cat([tokens[None].expand(b, -1, -1), sparse.expand(b, -1, -1)], dim=1)
        src = embedding + dense
        pos = self.prompt_encoder.get_dense_pe().expand(b, -1, -1, -1)
        hs, src = decoder.transformer(src, pos, tokens)
        src = self.fuse_after(src.transpose(1, 2).reshape(b, c, h, w), features)
        if self.mc_dropout:
            src = F.dropout(src, self.mc_dropout, training=True)
        upscaled = self.refine_upscaled(decoder.output_upscaling(src), features)
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
    **model_kwargs,
) -> SamSegmenter:
    """Build ``model_cls(spec, num_classes, **model_kwargs)`` with LoRA, from an official SAM checkpoint when given.

    Random initialisation is seeded, so every process (server, training subprocess) builds the same
    frozen backbone and an adapter trained in one applies in another.
    """
    spec = get_encoder_spec(backbone)
    with seeded_init():
        model = model_cls(spec, num_classes, **model_kwargs)
        if sam_checkpoint:
            official = load_official_checkpoint(sam_checkpoint, spec)
            try:
                model.load_sam_state(official)
            except CheckpointError as e:
                raise CheckpointError(f"'{sam_checkpoint}': {e}") from e
        model.add_lora(lora_rank)
    return model
