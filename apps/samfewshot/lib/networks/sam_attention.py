"""SAM ViT attention through ``torch.nn.functional.scaled_dot_product_attention``, without work on window padding.

segment_anything's ``Attention`` materialises the (HW x HW) attention matrix, adds the decomposed relative
position terms and runs softmax and the value product as separate kernels. Here the relative position terms
become SDPA's additive mask, so the fused kernel (flash attention on CPU and CUDA) does the rest.

Its windowed blocks pad the token map with zeros to whole windows (32 -> 42 tokens a side for vit_b at 512, 72 %
more tokens) and run ``qkv`` and the output projection on every padded token before cropping them away. A zero
token's ``qkv`` is one vector, the layer's value at zero, so ``qkv`` runs on the real tokens only and the padding is
filled with that vector; the projection runs after the crop. The results are those of segment_anything's block
(about 12 % fewer encoder FLOPs for vit_b at 512).

Same module tree and parameters, so official checkpoints, LoRA targets and adapters are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    get_rel_pos,
    window_partition,
    window_unpartition,
)


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """SAM's decomposed relative position terms as an additive attention bias.

    q: (B, heads, h*w, head_dim) unscaled queries -> (B, heads, h*w, h*w), the terms segment_anything's
    ``add_decomposed_rel_pos`` adds to the attention logits.
    """
    h, w = size
    b, heads = q.shape[:2]
    r_q = q.unflatten(2, (h, w))
    # einsum returns its result permuted; the broadcast sum would inherit that layout and the reshape would then
    # copy the (h*w)^2 bias once more (twice the bias build time). Making the small factors contiguous avoids it.
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, rel_pos_h)).contiguous()
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, rel_pos_w)).contiguous()
    return (rel_h[..., :, None] + rel_w[..., None, :]).view(b, heads, h * w, h * w)


class SdpaAttention(Attention):
    """segment_anything's multi-head attention with relative position bias; (B, h, w, C) -> (B, h, w, C)."""

    def attend(self, qkv: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, h, w, 3C) ``qkv`` output of an (h, w) token map -> (B, h, w, C) attention output before ``proj``."""
        h, w = size
        b = qkv.shape[0]
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)).to(q.dtype) if self.use_rel_pos else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return x.transpose(1, 2).reshape(b, h, w, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(x), x.shape[1:3]))


class UnpaddedWindowBlock(Block):
    """segment_anything's encoder block; its windowed attention runs ``qkv`` and ``proj`` on real tokens only.
    (B, h, w, C) -> (B, h, w, C)."""

    attn: SdpaAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window_size == 0:
            return super().forward(x)
        b, h, w, c = x.shape
        size = self.window_size
        qkv = self.attn.qkv(self.norm1(x))
        padded_h, padded_w = -(-h // size) * size, -(-w // size) * size
        if (padded_h, padded_w) != (h, w):
            padding = self.attn.qkv(x.new_zeros(1, 1, 1, c))  # what segment_anything's zero padding tokens give
            qkv = torch.cat([qkv, padding.expand(b, h, padded_w - w, -1)], dim=2)
            qkv = torch.cat([qkv, padding.expand(b, padded_h - h, padded_w, -1)], dim=1)
        windows, _ = window_partition(qkv, size)
        attended = window_unpartition(self.attn.attend(windows, (size, size)), size, (padded_h, padded_w), (h, w))
        x = x + self.attn.proj(attended)
        return x + self.mlp(self.norm2(x))


def use_fused_attention(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Switch every block of ``encoder`` to ``UnpaddedWindowBlock`` with ``SdpaAttention``, in place (parameters and
    their names are kept)."""
    for block in encoder.blocks:
        block.__class__ = UnpaddedWindowBlock
        block.attn.__class__ = SdpaAttention
    return encoder
