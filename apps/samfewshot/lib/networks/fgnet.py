"""FGNet: SAM2-guided 3D neuron segmentation for electron microscopy (Li et al., AAAI 2026), from the paper's
description (no public code).

An EM patch (B, 1, X, Y, Z) in [0, 1], Z the section axis (anisotropic, e.g. 40 nm against 4 nm in-plane), goes
two ways:

- SAM2's Hiera encoder sees every section as an image (frozen by default, LoRA optional). Its FPN maps at
  strides 4, 8 and 16 are projected, summed at stride 4 and stacked back along Z: the *generic* features.
- The Fine-Grained Encoder (FGE), a small 3D CNN, sees the raw patch at full resolution. It downsamples in-plane
  only (strides 2, 2) because sections are already ten times coarser than pixels.

Feature-Guided Attention (FGA) lets the generic features steer the FGE. Queries come from FGE features, keys and
values from the SAM2 features of the same place, and a sigmoid gate computed from the SAM2 features scales what is
added back. So the fine branch attends most where SAM2 is uncertain about a boundary.

The dual-affinity decoder predicts nearest-neighbour affinities on (z, y, x) twice:
- a coarse map from the SAM2 features alone, at stride 4 then upsampled;
- a refined map from the FGA-guided fine features (a U-Net path up to full resolution), which also reads the
  coarse logits.

Both heads are supervised. The refined map is the output that watershed turns into instances.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from .affinities import instance_affinities
from .lora import apply_lora, mark_trainable
from .sam2_backbone import IMAGE_MEAN, IMAGE_STD, HieraSpec, build_sam2_image_encoder, get_hiera_spec, load_sam2_encoder
from .sam_backbone import seeded_init

IN_PLANE_STRIDE = 32  # Hiera's total in-plane stride: patch sides must be multiples of it


@dataclass(frozen=True)
class FGNetOptions:
    """Widths of the fine branch and attention settings; part of every adapter's config.

    Attributes:
        fine_channels: (c0, c1, c2) FGE widths at full, 1/2 and 1/4 in-plane resolution; SAM2's features are projected to c2.
        attention_heads: heads of both FGA blocks; must divide c1 and c2.
        attention_window: side in voxels of FGA's in-plane windows at 1/4 and 1/2 resolution; X/4 and Y/4 must be multiples of it.
        coarse_loss_weight: weight of the coarse head's affinity loss beside the refined head's.
    """

    fine_channels: tuple[int, int, int] = (16, 32, 64)
    attention_heads: int = 4
    attention_window: int = 8
    coarse_loss_weight: float = 0.5


class SamSectionFeatures(nn.Module):
    """SAM2 features per section: (B, 1, X, Y, Z) -> (B, C, X/4, Y/4, Z).

    Sections are encoded as 3-channel ImageNet-normalised images, ``section_batch`` at a time. Without LoRA the
    encoder is frozen and runs without autograd, which keeps training memory to the fine branch's.

    Args:
        spec: the SAM2 Hiera variant to build the encoder of (``get_hiera_spec``).
        out_channels: C, the width each FPN level is projected to (1x1 conv + LayerNorm2d) before the levels are summed.
        section_batch: sections per encoder pass; bounds memory, not the result.
    """

    def __init__(self, spec: HieraSpec, out_channels: int, section_batch: int = 16):
        super().__init__()
        self.encoder = build_sam2_image_encoder(spec)
        self.section_batch = section_batch
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(spec.d_model, out_channels, 1, bias=False), LayerNorm2d(out_channels)) for _ in range(3)
        )
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def fpn(self, sections: torch.Tensor) -> list[torch.Tensor]:
        """(N, 1, X, Y) -> FPN maps at strides 4, 8, 16, each (N, d_model, X/s, Y/s), in one pass."""
        return self.encoder((sections.expand(-1, 3, -1, -1) - self.mean) / self.std)["backbone_fpn"]

    def encode(self, sections: torch.Tensor) -> list[torch.Tensor]:
        """``fpn``, ``section_batch`` sections at a time."""
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            chunks = [self.fpn(c) for c in sections.split(self.section_batch)]
        return [torch.cat(level) for level in zip(*chunks)]

    def forward(self, volume: torch.Tensor, encode: Callable[[torch.Tensor], list[torch.Tensor]] | None = None) -> torch.Tensor:
        """``encode`` replaces ``self.encode`` (e.g. an inference engine's compiled copy)."""
        b, _, x, y, z = volume.shape
        sections = volume.permute(0, 4, 1, 2, 3).reshape(b * z, 1, x, y)
        levels = (encode or self.encode)(sections)
        size = levels[0].shape[-2:]
        fused = sum(
            F.interpolate(proj(level), size=size, mode="bilinear", align_corners=False) if level.shape[-2:] != size else proj(level)
            for proj, level in zip(self.projections, levels)
        )
        return fused.view(b, z, -1, *size).permute(0, 2, 3, 4, 1)


class SectionEncoding(nn.Module):
    """``SamSectionFeatures.fpn`` as one graph for an inference engine: (N, 1, X, Y) -> the three FPN maps as a
    tuple (``unflatten`` gives ``encode``'s list).

    Args:
        features: the module whose SAM2 encoder runs; shared, not copied.
        section_size: (X, Y), the in-plane patch size the engine compiles the graph for.
    """

    def __init__(self, features: SamSectionFeatures, section_size: tuple[int, int]):
        super().__init__()
        self.features = features
        self.input_shape = (1, *section_size)

    def forward(self, sections: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.features.fpn(sections))

    @staticmethod
    def unflatten(outputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return list(outputs)


class FineGrainedEncoder(nn.Module):
    """Raw patch at full resolution -> [f0 (B, c0, X, Y, Z), f1 (B, c1, X/2, Y/2, Z), f2 (B, c2, X/4, Y/4, Z)].

    Args:
        channels: (c0, c1, c2), the widths of the stem and of the two in-plane downsampling residual units.
    """

    def __init__(self, channels: tuple[int, int, int]):
        super().__init__()
        c0, c1, c2 = channels
        self.stem = ResidualUnit(3, 1, c0, strides=1)
        self.down1 = ResidualUnit(3, c0, c1, strides=(2, 2, 1))
        self.down2 = ResidualUnit(3, c1, c2, strides=(2, 2, 1))

    def forward(self, volume: torch.Tensor) -> list[torch.Tensor]:
        f0 = self.stem(volume)
        f1 = self.down1(f0)
        return [f0, f1, self.down2(f1)]


class FeatureGuidedAttention(nn.Module):
    """fine (B, C, X, Y, Z) guided by guide (B, G, X, Y, Z) on the same grid -> (B, C, X, Y, Z).

    Multi-head cross-attention inside non-overlapping ``window`` x ``window`` in-plane windows of one section
    (queries: fine features; keys/values: guide features). Windows keep the cost linear in the patch size, and
    staying within a section respects the anisotropy. The gate, from the guide alone, decides where the attended
    context is added: that is how SAM2's features point the fine branch to ambiguous regions.

    Args:
        channels: C, the fine features' channels (queries and output); must be divisible by ``num_heads``.
        guide_channels: G, the guide features' channels (keys, values and the gate).
        num_heads: attention heads.
        window: side in voxels of the square in-plane windows; X and Y must be multiples of it.
    """

    def __init__(self, channels: int, guide_channels: int, num_heads: int, window: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.window = window
        self.norm_fine = nn.LayerNorm(channels)  # per voxel, over channels, as in transformer attention
        self.norm_guide = nn.LayerNorm(guide_channels)
        self.query = nn.Conv3d(channels, channels, 1)
        self.key_value = nn.Conv3d(guide_channels, 2 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)
        self.gate = nn.Sequential(nn.Conv3d(guide_channels, channels, 3, padding=1), nn.Sigmoid())

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B*Z*nx*ny, heads, w*w, C/heads)."""
        b, c, x, y, z = t.shape
        w, h = self.window, self.num_heads
        t = t.reshape(b, h, c // h, x // w, w, y // w, w, z).permute(0, 7, 3, 5, 1, 4, 6, 2)
        return t.reshape(-1, h, w * w, c // h)

    def forward(self, fine: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        b, c, x, y, z = fine.shape
        w = self.window
        if x % w or y % w:
            raise ValueError(f"in-plane size {x}x{y} is not a multiple of the attention window {w}")
        q = self.query(self.norm_fine(fine.movedim(1, -1)).movedim(-1, 1))
        k, v = self.key_value(self.norm_guide(guide.movedim(1, -1)).movedim(-1, 1)).chunk(2, dim=1)
        out = F.scaled_dot_product_attention(self._windows(q), self._windows(k), self._windows(v))
        out = out.reshape(b, z, x // w, y // w, self.num_heads, w, w, c // self.num_heads)
        out = out.permute(0, 4, 7, 2, 5, 3, 6, 1).reshape(b, c, x, y, z)
        return fine + self.gate(guide) * self.proj(out)


class AffinityHead(nn.Sequential):
    """(B, C, ...) -> (B, 3, ...) affinity logits for the (z, y, x) offsets.

    Args:
        in_channels: C, the input features' channels.
        hidden: channels of the 3x3x3 conv (instance norm, PReLU: MONAI ``Convolution``'s defaults) before the 1x1x1 output conv.
    """

    def __init__(self, in_channels: int, hidden: int):
        super().__init__(Convolution(3, in_channels, hidden, kernel_size=3), nn.Conv3d(hidden, 3, 1))


def balanced_affinity_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over labelled edges, each class (connected / boundary) weighted to half the loss per
    channel: boundary edges are a few percent of all edges and would otherwise be ignored."""
    positives = (target * mask).sum(dim=(0, 2, 3, 4), keepdim=True)
    total = mask.sum(dim=(0, 2, 3, 4), keepdim=True).clamp_min(1)
    pos_fraction = (positives / total).clamp(0.01, 0.99)
    weight = mask * torch.where(target > 0.5, 0.5 / pos_fraction, 0.5 / (1 - pos_fraction))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * weight).sum() / total.sum()


class FGNet(nn.Module):
    """forward: (B, 1, X, Y, Z) in [0, 1], X and Y multiples of 32 -> refined affinity logits (B, 3, X, Y, Z);
    in training mode (B, 6, X, Y, Z): refined then coarse, both needed by ``training_loss``.

    Args:
        spec: the SAM2 Hiera variant of the section encoder (``get_hiera_spec``).
        options: widths of the fine branch, FGA heads and window, and the coarse-loss weight (see ``FGNetOptions``).
    """

    #: parameter-name prefixes that train beside the (optional) LoRA weights: everything but the SAM2 encoder
    trainable_prefixes = (
        "sam.projections.",
        "fge.",
        "fga_low.",
        "fga_high.",
        "up_low.",
        "up_high.",
        "merge_low.",
        "merge_high.",
        "coarse_head.",
        "refined_head.",
    )

    def __init__(self, spec: HieraSpec, options: FGNetOptions = FGNetOptions()):
        super().__init__()
        self.spec = spec
        self.options = options
        c0, c1, c2 = options.fine_channels
        heads, window = options.attention_heads, options.attention_window
        self.sam = SamSectionFeatures(spec, c2)
        self.fge = FineGrainedEncoder(options.fine_channels)
        self.fga_low = FeatureGuidedAttention(c2, c2, heads, window)
        self.fga_high = FeatureGuidedAttention(c1, c2, heads, window)
        self.up_low = UpSample(3, c2, c1, scale_factor=(2, 2, 1), mode="deconv")
        self.merge_low = ResidualUnit(3, 2 * c1, c1)
        self.up_high = UpSample(3, c1, c0, scale_factor=(2, 2, 1), mode="deconv")
        self.merge_high = ResidualUnit(3, 2 * c0, c0)
        self.coarse_head = AffinityHead(c2, c2)
        self.refined_head = AffinityHead(c0 + 3, c0)

    def image_encoding(self, section_size: tuple[int, int]) -> SectionEncoding:
        """The image-dependent part (SAM2 on each section) as a module of its own, for an inference engine."""
        return SectionEncoding(self.sam, section_size)

    def forward(self, volume: torch.Tensor, encode: Callable[[torch.Tensor], list[torch.Tensor]] | None = None) -> torch.Tensor:
        """``encode`` replaces the SAM2 section encoder (``SamSectionFeatures.encode``)."""
        x, y, z = volume.shape[-3:]
        if x % IN_PLANE_STRIDE or y % IN_PLANE_STRIDE:
            raise ValueError(f"FGNet needs in-plane patch sides that are multiples of {IN_PLANE_STRIDE}, got {x}x{y}")
        generic = self.sam(volume, encode)  # (B, c2, X/4, Y/4, Z)
        f0, f1, f2 = self.fge(volume)
        coarse = F.interpolate(self.coarse_head(generic), size=(x, y, z), mode="trilinear", align_corners=False)
        low = self.fga_low(f2, generic)
        high = self.merge_low(torch.cat([self.up_low(low), f1], dim=1))
        high = self.fga_high(high, F.interpolate(generic, size=high.shape[-3:], mode="trilinear", align_corners=False))
        full = self.merge_high(torch.cat([self.up_high(high), f0], dim=1))
        refined = self.refined_head(torch.cat([full, coarse], dim=1))
        return torch.cat([refined, coarse], dim=1) if self.training else refined

    def training_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """logits (B, 6, X, Y, Z) from a training forward, label (B, 1, X, Y, Z) instance ids (0 = unlabelled)."""
        target, mask = instance_affinities(label[:, 0])
        refined, coarse = logits[:, :3], logits[:, 3:]
        return balanced_affinity_loss(refined, target, mask) + self.options.coarse_loss_weight * balanced_affinity_loss(
            coarse, target, mask
        )

    def add_lora(self, rank: int) -> None:
        """LoRA (rank > 0) on Hiera's attention qkv; rank 0 keeps SAM2 frozen. Everything else trains."""
        if rank > 0:
            apply_lora(self, rank=rank, target_modules=r"sam\.encoder\.trunk\.blocks\.\d+\.attn\.qkv")
        mark_trainable(self, self.trainable_prefixes)


def build_fgnet(variant: str, lora_rank: int = 0, sam2_state: dict[str, torch.Tensor] | None = None, **options) -> FGNet:
    """FGNet on the SAM2 ``variant`` (its image encoder from an official state, ``sam2_encoder_state``, when given;
    ``lib.weights.load_sam2_encoder_state`` reads one from its file), seeded like the SAM segmenters so every process
    builds the same frozen encoder."""
    spec = get_hiera_spec(variant)
    with seeded_init():
        model = FGNet(spec, FGNetOptions(**options))
        if sam2_state is not None:
            load_sam2_encoder(model.sam.encoder, sam2_state, spec)
        model.add_lora(lora_rank)
    return model


def options_config(options: FGNetOptions) -> dict:
    """JSON-friendly options for an adapter's config."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()}
