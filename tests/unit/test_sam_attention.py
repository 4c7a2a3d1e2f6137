"""The SAM encoder's SDPA attention and unpadded window blocks compute what segment_anything's own compute."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block

from lib.networks.sam_attention import SdpaAttention, UnpaddedWindowBlock
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
    assert_same_forward_and_backward(reference, fused, torch.randn(2, *size, 64))


def assert_same_forward_and_backward(reference: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> None:
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_ours = reference(x_ref), ours(x_ours)
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_ours.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for (name, p_ref), p_ours in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize("tokens", [(6, 7), (8, 8), (3, 4)])
def test_unpadded_window_block_matches_segment_anything(tokens):
    """Token maps that need window padding on one or both sides, none, or are smaller than a window; the padding's
    keys and values (the qkv bias) reach the real tokens' attention, and its gradient the bias."""
    torch.manual_seed(0)
    reference = Block(64, num_heads=4, use_rel_pos=True, window_size=4, input_size=(4, 4))
    randomise_rel_pos(reference)
    with torch.no_grad():
        reference.attn.qkv.bias.normal_(0, 1)
    ours = Block(64, num_heads=4, use_rel_pos=True, window_size=4, input_size=(4, 4))
    ours.load_state_dict(reference.state_dict())
    ours.__class__, ours.attn.__class__ = UnpaddedWindowBlock, SdpaAttention
    assert_same_forward_and_backward(reference, ours, torch.randn(2, *tokens, 64))


def test_encoder_uses_sdpa_with_the_official_parameters():
    spec = get_encoder_spec("tiny")
    torch.manual_seed(0)
    ours = build_image_encoder(spec).eval()
    assert all(type(block) is UnpaddedWindowBlock and type(block.attn) is SdpaAttention for block in ours.blocks)
    official = build_image_encoder(spec, fused_attention=False).eval()
    assert all(type(block.attn) is Attention for block in official.blocks)
    randomise_rel_pos(ours)
    official.load_state_dict(ours.state_dict())  # strict: same parameter names and shapes
    x = torch.rand(1, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-4)
