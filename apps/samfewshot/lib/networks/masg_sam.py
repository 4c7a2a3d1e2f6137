"""MASG-SAM: hierarchical attention, boundary enhancement and CLIP-guided semantic fusion on SAM.

The released MASG-SAM code holds only the SAM variant with multi-scale encoder taps (blocks 3, 5, 7, 11 of vit_b,
each a 1x1 conv 768 -> 256); the three modules below follow the paper's description. Design decisions:

* Taps sit at 1/3, 1/2, 2/3 and all of the encoder depth, which gives blocks 3, 5, 7, 11 for vit_b and scales to
  the other backbones (on LiteMedSAM's TinyViT: of its eight attention blocks at the embedding resolution,
  ``layers.2.blocks.2-4`` and ``layers.3.blocks.1``). Each is projected like SAM's neck (1x1 conv + LayerNorm2d) so all levels share one
  normalised space before they are compared, which is what keeps the levels from drifting apart.
* HAE, Hierarchical Attention Enhancement: every level (the four taps and the neck output) gets its own channel
  attention (shared MLP over average- and max-pooled descriptors) and spatial attention (7x7 conv over the
  channel mean and max). A small MLP on the pooled attended levels predicts a softmax weight per level for each
  image, so the mix of global and local detail depends on the input. The weighted sum is added to the image
  embedding through a per-channel gate that starts at zero: the pretrained embedding is kept, never replaced.
* BFE, Boundary Feature Enhancement: a boundary branch reads the Sobel gradient magnitude of the input slice
  (image edges) and the shallowest tap (low-level features) and predicts a boundary map at the decoder's
  upscaled resolution (4x the embedding). It is supervised by the label's class boundaries (morphological
  gradient, 3x3) with Dice + BCE, weighted ``boundary_weight`` beside the segmentation loss, and re-weights the
  upscaled decoder features by (1 + a * boundary), a per-channel, zero-initialised.
* DSF, Dynamic Semantic Fusion: open_clip embeddings of "a {modality} image of the {label}" for every class
  (``text.py``) are projected to the decoder width by an MLP whose last layer starts at zero. They are added to
  the class mask tokens (semantic priors for each class's token) and the image tokens cross-attend to them
  before the two-way transformer. The cross-attention output enters through ramp * sigmoid(g): g is learned, and
  the ramp rises linearly from 0 to 1 over the first ``ramp_steps`` training steps of a run (1 at inference), so
  the text pathway is phased in after the decoder has adapted rather than disturbing it at the start.

Each module is switchable (``use_hae``, ``use_bfe``, ``use_dsf``) for ablation; a switched-off module is not built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from .sam_backbone import EncoderSpec
from .sam_segmenter import ChannelSpatialAttention, SamSegmenter, SliceFeatures


def masg_tap_indexes(depth: int) -> tuple[int, ...]:
    """Blocks at 1/3, 1/2, 2/3 and all of the depth: (3, 5, 7, 11) for vit_b's 12 blocks."""
    return tuple(sorted({max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1.0)}))


class HierarchicalAttentionEnhancement(nn.Module):
    """embedding (B, C, h, w), taps L x (B, C, h, w) -> (B, C, h, w); see the module docstring.

    Args:
        channels: C, the channels of the embedding and of every tap.
        num_levels: levels attended and weighted: the L taps plus the embedding itself (L + 1).
    """

    def __init__(self, channels: int, num_levels: int):
        super().__init__()
        self.attention = nn.ModuleList(ChannelSpatialAttention(channels) for _ in range(num_levels))
        self.level_weights = nn.Sequential(
            nn.Linear(num_levels * channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, num_levels)
        )
        self.gate = nn.Parameter(torch.zeros(channels))

    def forward(self, embedding: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        levels = [attend(x) for attend, x in zip(self.attention, [*taps, embedding])]
        weights = torch.softmax(self.level_weights(torch.cat([x.mean((2, 3)) for x in levels], dim=1)), dim=1)
        fused = torch.einsum("bl,blchw->bchw", weights, torch.stack(levels, dim=1))
        return embedding + self.gate.view(1, -1, 1, 1) * fused


class BoundaryFeatureEnhancement(nn.Module):
    """Boundary logits from image edges + the shallowest tap, and the re-weighting of decoder features.

    Args:
        tap_channels: channels of the tap ``boundary_logits`` reads.
        feature_channels: channels of the upscaled decoder features ``forward`` re-weights (one emphasis each).
        hidden: width of the boundary head's convs (the tap is first reduced to it by a 1x1 conv).
    """

    def __init__(self, tap_channels: int, feature_channels: int, hidden: int = 32):
        super().__init__()
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("sobel", torch.stack([sobel, sobel.T])[:, None], persistent=False)  # (2, 1, 3, 3)
        self.tap_reduce = nn.Conv2d(tap_channels, hidden, 1)
        self.head = nn.Sequential(
            nn.Conv2d(hidden + 1, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )
        self.emphasis = nn.Parameter(torch.zeros(feature_channels))

    def boundary_logits(self, image: torch.Tensor, tap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """image (B, 3, S, S), tap (B, C, h, w) -> (B, 1, *size)."""
        gradient = F.conv2d(image.mean(1, keepdim=True), self.sobel, padding=1)
        edges = F.adaptive_avg_pool2d(gradient.square().sum(1, keepdim=True).add(1e-6).sqrt(), size)
        local = F.interpolate(self.tap_reduce(tap), size=size, mode="bilinear", align_corners=False)
        return self.head(torch.cat([local, edges], dim=1))

    def forward(self, features: torch.Tensor, boundary_logits: torch.Tensor) -> torch.Tensor:
        return features * (1 + self.emphasis.view(1, -1, 1, 1) * torch.sigmoid(boundary_logits))


def boundary_target(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class boundaries of a label (B, 1, H, W) of ids: 1 where a 3x3 neighbourhood holds two classes, pooled
    (max) to ``size``."""
    label = label.float()
    edges = (F.max_pool2d(label, 3, 1, 1) != -F.max_pool2d(-label, 3, 1, 1)).float()
    return F.adaptive_max_pool2d(edges, size)


class DynamicSemanticFusion(nn.Module):
    """Class text embeddings -> mask-token priors (K, C) and a gated image-to-text cross-attention.

    Args:
        text_dim: D, the width of the class text embeddings.
        channels: C, the decoder width the text is projected to and the image embedding has.
        num_heads: heads of the cross-attention; must divide ``channels``.
        ramp_steps: training steps of a run (forwards in training mode) over which the gate's ramp rises linearly from 0 to 1.
    """

    def __init__(self, text_dim: int, channels: int, num_heads: int, ramp_steps: int = 200):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(text_dim, channels), nn.GELU(), nn.Linear(channels, channels))
        nn.init.zeros_(self.project[-1].weight)
        nn.init.zeros_(self.project[-1].bias)
        self.norm = nn.LayerNorm(channels)
        self.cross_attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.gate_logit = nn.Parameter(torch.zeros(1))
        self.ramp_steps = ramp_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long), persistent=False)

    def gate(self) -> torch.Tensor:
        ramp = min(1.0, float(self.steps) / self.ramp_steps) if self.training else 1.0
        return ramp * torch.sigmoid(self.gate_logit)

    def text_tokens(self, text: torch.Tensor) -> torch.Tensor:
        return self.project(text)

    def forward(self, embedding: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """embedding (B, C, h, w), text_tokens (K, C) -> (B, C, h, w)."""
        if self.training:
            self.steps += 1
        b, c, h, w = embedding.shape
        query = self.norm(embedding.flatten(2).transpose(1, 2))
        text = text_tokens[None].expand(b, -1, -1)
        attended, _ = self.cross_attention(query, text, text, need_weights=False)
        return embedding + self.gate() * attended.transpose(1, 2).reshape(b, c, h, w)


class MASGSam(SamSegmenter):
    """MASG-SAM; forward: (B, 1 or 3, H, W) in [0, 1] -> logits (B, num_classes, H, W).

    ``class_text`` (num_classes, D) holds the class prompt embeddings (background first); needed with ``use_dsf``.

    Args:
        spec: SAM encoder geometry; taps sit at 1/3, 1/2, 2/3 and all of its depth (``masg_tap_indexes``).
        num_classes: classes including the background (>= 2).
        class_text: (num_classes, D) text embeddings of the class prompts (``text.py``); ignored without ``use_dsf``.
        use_hae: build Hierarchical Attention Enhancement (fuses the taps into the image embedding).
        use_bfe: build Boundary Feature Enhancement (boundary branch, its loss and the feature re-weighting).
        use_dsf: build Dynamic Semantic Fusion (text priors on the class tokens and the image-to-text attention).
        boundary_weight: weight of the boundary Dice + BCE loss beside the segmentation loss (with ``use_bfe``).
    """

    trainable_prefixes = SamSegmenter.trainable_prefixes + ("hae.", "bfe.", "dsf.")

    def __init__(
        self,
        spec: EncoderSpec,
        num_classes: int,
        class_text: torch.Tensor | None = None,
        use_hae: bool = True,
        use_bfe: bool = True,
        use_dsf: bool = True,
        boundary_weight: float = 0.5,
    ):
        taps = masg_tap_indexes(spec.depth)
        super().__init__(spec, num_classes, tap_indexes=taps)
        channels = spec.prompt_dim
        self.hae = HierarchicalAttentionEnhancement(channels, len(taps) + 1) if use_hae else None
        self.bfe = BoundaryFeatureEnhancement(channels, channels // 8) if use_bfe else None
        self.dsf = None
        if use_dsf:
            if class_text is None or class_text.shape[0] != num_classes:
                raise ValueError(
                    f"DSF needs class_text of shape ({num_classes}, D), got {None if class_text is None else tuple(class_text.shape)}"
                )
            self.register_buffer("class_text", class_text.float(), persistent=False)
            self.dsf = DynamicSemanticFusion(class_text.shape[1], channels, spec.decoder_heads)
        self.boundary_weight = boundary_weight
        self.boundary_loss = DiceCELoss(sigmoid=True)
        self._boundary_logits: torch.Tensor | None = None

    def fuse_before(self, embedding: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        if self.hae is not None:
            embedding = self.hae(embedding, features.taps)
        if self.dsf is not None:
            embedding = self.dsf(embedding, self.dsf.text_tokens(self.class_text))
        return embedding

    def class_tokens(self) -> torch.Tensor:
        tokens = super().class_tokens()
        return tokens if self.dsf is None else tokens + self.dsf.text_tokens(self.class_text)

    def refine_upscaled(self, upscaled: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        if self.bfe is None:
            return upscaled
        logits = self.bfe.boundary_logits(features.image, features.taps[0], upscaled.shape[-2:])
        self._boundary_logits = logits if self.training else None
        return self.bfe(upscaled, logits)

    def training_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        loss = super().training_loss(logits, label)
        if self._boundary_logits is not None:
            target = boundary_target(label[:, :1], self._boundary_logits.shape[-2:])
            loss = loss + self.boundary_weight * self.boundary_loss(self._boundary_logits, target)
            self._boundary_logits = None
        return loss
