"""SplitQKV: one matmul for the frozen q, k, v weights plus each LoRA update gives what the three peft layers give
one by one, forward and backward, and what merge_lora's fused Linear gives."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lib.networks.lora import SplitQKV, apply_lora, merge_lora


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = SplitQKV(nn.Linear(16, 48))


def lora_attention() -> Attention:
    torch.manual_seed(0)
    model = Attention().requires_grad_(False)
    apply_lora(model, rank=2, target_modules=r"qkv\.[qv]")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # peft starts B at zero; a trained adapter is not
    return model


def part_by_part(qkv: SplitQKV, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([qkv.q(x), qkv.k(x), qkv.v(x)], dim=-1)


def test_fused_forward_and_gradients_match_the_parts():
    model = lora_attention()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 5, 16)
    out, expected = model.qkv(x), part_by_part(reference.qkv, x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad)


def test_bf16_autocast_and_the_merged_layer_agree():
    model = lora_attention()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = part_by_part(model.qkv, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(model.qkv(x).float(), expected, atol=0.1, rtol=0.05)
        merged = merge_lora(model)
        assert isinstance(merged.qkv, nn.Linear)
        torch.testing.assert_close(merged.qkv(x), expected, atol=1e-5, rtol=1e-5)
