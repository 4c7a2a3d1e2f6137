"""HF-SAM: SAM with a skip-feature fusion of an early encoder feature into the mask decoder, as the official code
(github.com/1683194873xrn/HF-SAM, commit a3c23b3, built on SAMed and H-SAM) runs it.

* The low-level feature is the output of the encoder's first global-attention block (block 2 of vit_b), projected
  embed_dim -> prompt_dim (768 -> 256) by a 1x1 conv with bias (``compress_vit_feat`` there). On LiteMedSAM's TinyViT,
  which has no global attention, it is the first attention block at the embedding resolution (``layers.2.blocks.0``,
  160 ch; the spec's ``hf_tap``, docs/models.md).
* One ``AWFFM`` (``CIF_block`` there) fuses it into the image tokens after SAM's two-way transformer, before the
  output upscaling. The official decoder also fuses it into the image embedding before the transformer, but then
  overwrites that result (``src = image_embeddings + dense_prompt_embeddings``), so that step has no effect and is not
  built here.
* An extra output token (``hf_token``, as HQ-SAM's) joins the iou and mask tokens in the transformer; no head reads
  its output.
"""

from __future__ import annotations

import torch
from torch import nn

from .sam_backbone import EncoderSpec
from .sam_segmenter import SamSegmenter, SliceFeatures


class AWFFM(nn.Module):
    """HF-SAM's Adaptively Weighted Feature Fusion Module, the official ``CIF_block``;
    (B, C, h, w) image tokens and (B, C, h, w) low-level feature -> (B, C, h, w).

    A spatial map S = sigmoid(conv3x3([mean_c, max_c](conv1x1([tokens, low])))) weights the tokens, t' = tokens * S;
    channel attention on t' (a bias-free MLP on its average- and max-pooled descriptors) weights the low-level
    feature; the output is t' + low * A(t').

    Args:
        channels: C, the channels of both inputs.
        reduction: the channel MLP's hidden width is ``channels // reduction`` (8 in the official code).
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.mix = nn.Conv2d(2 * channels, channels, 1)
        self.spatial = nn.Conv2d(2, 1, 3, padding=1, bias=False)
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=False), nn.ReLU(), nn.Conv2d(channels // reduction, channels, 1, bias=False)
        )

    def forward(self, tokens: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        mixed = self.mix(torch.cat([tokens, low], dim=1))
        tokens = tokens * torch.sigmoid(self.spatial(torch.cat([mixed.mean(1, keepdim=True), mixed.amax(1, keepdim=True)], dim=1)))
        channel = self.channel_mlp(tokens.mean((2, 3), keepdim=True)) + self.channel_mlp(tokens.amax((2, 3), keepdim=True))
        return tokens + low * torch.sigmoid(channel)


class HFSam(SamSegmenter):
    """HF-SAM; forward: (B, 1 or 3, S, S) in [0, 1] -> logits (B, num_classes, S, S).

    Args:
        spec: encoder geometry; its block ``spec.hf_tap`` is tapped for the low-level feature.
        num_classes: classes including the background (>= 2).
    """

    #: the official code's LoRA rank (its ``--rank`` default)
    default_lora_rank = 5
    trainable_prefixes = SamSegmenter.trainable_prefixes + ("awffm.", "hf_token.")

    def __init__(self, spec: EncoderSpec, num_classes: int):
        super().__init__(spec, num_classes, tap_indexes=(spec.hf_tap,))
        self.awffm = AWFFM(spec.prompt_dim)
        self.hf_token = nn.Embedding(1, spec.prompt_dim)

    def tap_projection(self, channels: int) -> nn.Module:
        return nn.Conv2d(channels, self.spec.prompt_dim, 1)

    def extra_tokens(self) -> torch.Tensor:
        return self.hf_token.weight

    def fuse_after(self, tokens: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        return self.awffm(tokens, features.taps[0])
