"""SAM ViT attention through ``torch.nn.functional.scaled_dot_product_attention``.

segment_anything's ``Attention`` materialises the (HW x HW) attention matrix, adds the decomposed relative
position terms and runs softmax and the value product as separate kernels. Here the relative position terms
become SDPA's additive mask, so the fused kernel (flash attention on CPU and CUDA) does the rest. Same module
tree and parameters, so official checkpoints, LoRA targets and adapters are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """SAM's decomposed relative position terms as an additive attention bias.

    q: (B, heads, h*w, head_dim) unscaled queries -> (B, heads, h*w, h*w), the terms segment_anything's
    ``add_decomposed_rel_pos`` adds to the attention logits.
    """
    h, w = size
    b, heads = q.shape[:2]
    r_q = q.unflatten(2, (h, w))
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, rel_pos_h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, rel_pos_w))
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, h * w, h * w)


class SdpaAttention(Attention):
    """segment_anything's multi-head attention with relative position bias; (B, h, w, C) -> (B, h, w, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)).to(q.dtype) if self.use_rel_pos else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, h, w, -1))


def use_sdpa_attention(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Switch every block of ``encoder`` to ``SdpaAttention`` in place (parameters and their names are kept)."""
    for block in encoder.blocks:
        block.attn.__class__ = SdpaAttention
    return encoder
