"""SAM2 Hiera image encoder (trunk + FPN neck) from the ``sam2`` package, and the official-checkpoint loader.

The encoder is built from ``sam2``'s own ``Hiera``, ``FpnNeck`` and ``ImageEncoder`` classes with the
hyper-parameters of the official SAM 2.1 configs, so an official checkpoint's ``image_encoder.*`` tensors load
unchanged (strict). Hiera interpolates its background position embedding to the input size, so any input whose
side is a multiple of 32 works without adapting the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from torch import nn

from .sam_backbone import CheckpointError, OfficialCheckpoint, require_geometry

# SAM2 normalises RGB inputs in [0, 1] with the ImageNet statistics.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HieraSpec:
    """One SAM2 image encoder variant: Hiera trunk geometry and FPN neck width."""

    name: str
    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14)
    d_model: int = 256

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def channel_list(self) -> list[int]:
        """Trunk output widths, coarsest first (as FpnNeck expects)."""
        return [self.embed_dim * 2**i for i in reversed(range(len(self.stages)))]


# The SAM 2.1 configs shipped in sam2/configs/sam2.1 (fields they leave out take Hiera's defaults).
HIERA_VARIANTS: dict[str, HieraSpec] = {
    "hiera_t": HieraSpec("hiera_t", 96, 1, (1, 2, 7, 2), (5, 7, 9), window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_s": HieraSpec("hiera_s", 96, 1, (1, 2, 11, 2), (7, 10, 13), window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_b+": HieraSpec("hiera_b+", 112, 2, (2, 3, 16, 3), (12, 16, 20)),
    "hiera_l": HieraSpec(
        "hiera_l", 144, 2, (2, 6, 36, 4), (23, 33, 43), window_spec=(8, 4, 16, 8), window_pos_embed_bkg_spatial_size=(7, 7)
    ),
    # Small randomly initialised Hiera for offline use and CPU tests: same structure, narrow and shallow.
    "tiny": HieraSpec("tiny", 16, 1, (1, 1, 2, 1), (3,), window_spec=(8, 4, 4, 2), window_pos_embed_bkg_spatial_size=(4, 4), d_model=32),
}

_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
# The official files' sha256 are not published beside them; the loader pins a file's hash on first use instead
# (see ``lib.weights.verify_pinned_sha256``) and ``--conf sam2_checkpoint_sha256`` can pin a known one.
SAM2_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    name: OfficialCheckpoint(f"sam2.1_hiera_{size}.pt", f"{_BASE_URL}/sam2.1_hiera_{size}.pt", None, 0)
    for name, size in (("hiera_t", "tiny"), ("hiera_s", "small"), ("hiera_b+", "base_plus"), ("hiera_l", "large"))
}


def get_hiera_spec(variant: str) -> HieraSpec:
    if variant not in HIERA_VARIANTS:
        raise ValueError(f"unknown SAM2 variant '{variant}'; valid: {', '.join(HIERA_VARIANTS)}")
    return HIERA_VARIANTS[variant]


def build_sam2_image_encoder(spec: HieraSpec) -> ImageEncoder:
    """(B, 3, H, W) ImageNet-normalised, H and W multiples of 32 -> ``backbone_fpn``: d_model-wide maps at
    strides 4, 8 and 16 (the stride-32 level is dropped, ``scalp=1``, as in SAM2)."""
    trunk = Hiera(
        embed_dim=spec.embed_dim,
        num_heads=spec.num_heads,
        stages=spec.stages,
        global_att_blocks=spec.global_att_blocks,
        window_spec=spec.window_spec,
        window_pos_embed_bkg_spatial_size=spec.window_pos_embed_bkg_spatial_size,
    )
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(num_pos_feats=spec.d_model, normalize=True, temperature=10000),
        d_model=spec.d_model,
        backbone_channel_list=spec.channel_list,
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    return ImageEncoder(trunk=trunk, neck=neck, scalp=1)


def _trunk_geometry(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(embed_dim, depth) of the Hiera trunk stored under ``image_encoder.trunk.``."""
    key = "image_encoder.trunk.patch_embed.proj.weight"
    if key not in state:
        raise CheckpointError(f"not a SAM2 checkpoint: '{key}' is missing")
    blocks = [int(k.split(".")[3]) for k in state if k.startswith("image_encoder.trunk.blocks.")]
    return state[key].shape[0], 1 + max(blocks, default=-1)


def sam2_encoder_state(state: dict[str, torch.Tensor], spec: HieraSpec) -> dict[str, torch.Tensor]:
    """The ``image_encoder.*`` tensors of an official SAM2 state dict, keys relative to ``ImageEncoder``; checked
    against ``spec`` with an error naming the variant the state holds."""
    require_geometry(*_trunk_geometry(state), spec, HIERA_VARIANTS, "Hiera", "sam2_variant", "sam2_checkpoint")
    prefix = "image_encoder."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_sam2_encoder(encoder: nn.Module, state: dict[str, torch.Tensor], spec: HieraSpec) -> None:
    """Load ``sam2_encoder_state`` into ``encoder`` (built by ``build_sam2_image_encoder(spec)``), strictly."""
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"it does not fit the {spec.name} image encoder: {e}") from e
