"""HF-SAM: SAM with adaptively weighted skip-feature fusion and two-step fusion decoding.

Low-level local features are the outputs of the encoder's first two global-attention blocks (blocks 2 and 5
of vit_b), each projected embed_dim -> prompt_dim (768 -> 256 for vit_b) by a 1x1 conv + LayerNorm2d, like
SAM's neck. An AWFFM fuses them into the image embedding twice, as the paper describes: once before SAM's
two-way transformer and once into the transformer's image tokens before upscaling and the hypernetwork
heads. (The released code computes the first fusion and then overwrites it; here both steps are live.)
"""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from .sam_backbone import SamEncoderSpec
from .sam_segmenter import ChannelSpatialAttention, SamSegmenter, SliceFeatures


class AWFFM(nn.Module):
    """Adaptively Weighted Feature Fusion Module.

    high: (B, C, h, w), lows: L x (B, C, h, w) -> (B, C, h, w).

    Sources are scaled by learned weights (softmax over sources, mean 1), concatenated, re-weighted by channel
    attention (shared MLP on average- and max-pooled descriptors) and spatial attention (conv over the
    channel-wise mean and max maps), projected back to C channels and added to ``high`` through a learned
    per-channel gate that starts at zero: at initialisation the pretrained embedding passes unchanged, and
    fusion can only add to it, never suppress it.

    Args:
        channels: C, the channels of ``high`` and of every low-level source.
        num_low: L, how many low-level sources ``forward`` gets.
        reduction: hidden-width divisor of the channel-attention MLP over the (1 + L) * C concatenated channels.
    """

    def __init__(self, channels: int, num_low: int, reduction: int = 4):
        super().__init__()
        self.source_logits = nn.Parameter(torch.zeros(1 + num_low))
        self.attention = ChannelSpatialAttention(channels * (1 + num_low), reduction)
        self.project = nn.Sequential(nn.Conv2d(channels * (1 + num_low), channels, 1, bias=False), LayerNorm2d(channels))
        self.gate = nn.Parameter(torch.zeros(channels))

    def forward(self, high: torch.Tensor, lows: list[torch.Tensor]) -> torch.Tensor:
        weights = torch.softmax(self.source_logits, 0) * self.source_logits.numel()
        x = torch.cat([w * f for w, f in zip(weights, [high, *lows])], dim=1)
        return high + self.gate.view(1, -1, 1, 1) * self.project(self.attention(x))


class HFSam(SamSegmenter):
    """HF-SAM; forward: (B, 1 or 3, S, S) in [0, 1] -> logits (B, num_classes, S, S).

    Args:
        spec: SAM encoder geometry; its first two global-attention blocks are tapped for the low-level features.
        num_classes: classes including the background (>= 2).
    """

    trainable_prefixes = SamSegmenter.trainable_prefixes + ("fusion_before.", "fusion_after.")

    def __init__(self, spec: SamEncoderSpec, num_classes: int):
        taps = spec.global_attn_indexes[:2]
        super().__init__(spec, num_classes, tap_indexes=taps)
        self.fusion_before = AWFFM(spec.prompt_dim, len(taps))
        self.fusion_after = AWFFM(spec.prompt_dim, len(taps))

    def fuse_before(self, embedding: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        return self.fusion_before(embedding, features.taps)

    def fuse_after(self, tokens: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        return self.fusion_after(tokens, features.taps)
