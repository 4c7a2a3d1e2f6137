"""SDPA attention in the SAM encoder computes what segment_anything's own attention computes."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from lib.networks.sam_attention import SdpaAttention
from lib.networks.sam_backbone import build_image_encoder, get_encoder_spec


def randomise_rel_pos(module: torch.nn.Module) -> None:
    """SAM initialises the relative position tables at zero, which would leave the bias path untested."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("size", [(7, 7), (8, 5)])
def test_sdpa_attention_matches_segment_anything_forward_and_backward(size):
    torch.manual_seed(0)
    reference = Attention(64, num_heads=4, use_rel_pos=True, input_size=size)
    randomise_rel_pos(reference)
    fused = SdpaAttention(64, num_heads=4, use_rel_pos=True, input_size=size)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, *size, 64)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_fused = reference(x_ref), fused(x_fused)
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_fused.backward(grad)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_encoder_uses_sdpa_with_the_official_parameters():
    spec = get_encoder_spec("tiny")
    torch.manual_seed(0)
    ours = build_image_encoder(spec).eval()
    assert all(type(block.attn) is SdpaAttention for block in ours.blocks)
    official = build_image_encoder(spec, fused_attention=False).eval()
    assert all(type(block.attn) is Attention for block in official.blocks)
    randomise_rel_pos(ours)
    official.load_state_dict(ours.state_dict())  # strict: same parameter names and shapes
    x = torch.rand(1, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-4)
