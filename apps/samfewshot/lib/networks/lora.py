"""LoRA through peft: injection, merging for export, and which parameters train (an adapter holds exactly those;
its files are ``lib.adapters``).

SAM's attention computes queries, keys and values with one fused ``qkv`` Linear. SAMed, H-SAM and HF-SAM put LoRA
on the query and the value projections only, each with its own A and B; peft targets modules by name, so
``split_qkv`` first turns the fused layer into three (``SplitQKV``), and ``merge_lora`` fuses them back for export.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn


class SplitQKV(nn.Module):
    """A fused ``qkv`` Linear (C -> 3C) as three Linears ``q``, ``k``, ``v`` (C -> C) that LoRA can target one by
    one; (..., C) -> (..., 3C), the fused layer's output.

    Args:
        fused: the ``qkv`` Linear whose weights (and bias) are split; it is not kept.
    """

    def __init__(self, fused: nn.Linear):
        super().__init__()
        dim = fused.out_features // 3
        bias = fused.bias is not None
        self.q, self.k, self.v = (nn.Linear(fused.in_features, dim, bias=bias) for _ in range(3))
        with torch.no_grad():
            for i, part in enumerate((self.q, self.k, self.v)):
                part.weight.copy_(fused.weight[i * dim : (i + 1) * dim])
                if bias:
                    part.bias.copy_(fused.bias[i * dim : (i + 1) * dim])
        self.requires_grad_(fused.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The three frozen projections in one matmul, then each part's LoRA update added to its slice: the same
        result as ``cat([q(x), k(x), v(x)])``, which ran up to a third slower under bf16 autocast."""
        bases = [part.get_base_layer() if isinstance(part, LoraLayer) else part for part in (self.q, self.k, self.v)]
        bias = torch.cat([b.bias for b in bases]) if bases[0].bias is not None else None
        out = F.linear(x, torch.cat([b.weight for b in bases]), bias)
        dim = bases[0].out_features
        for i, part in enumerate((self.q, self.k, self.v)):
            update = lora_update(part, x)
            if update is not None:
                out.narrow(-1, i * dim, dim).add_(update.to(out.dtype))  # in place: linear's backward never reads out
        return out

    def fused(self) -> nn.Linear:
        """The three projections as one Linear again (after ``merge_lora``, for an inference engine)."""
        q, k, v = self.q, self.k, self.v
        layer = nn.Linear(q.in_features, 3 * q.out_features, bias=q.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if layer.bias is not None:
                layer.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        return layer.requires_grad_(False)


def lora_update(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """What a peft LoRA layer adds to its base layer's output for ``x`` (its active adapters, plain LoRA as
    ``apply_lora`` configures it); None for a plain layer, a merged one or one with its adapters disabled."""
    if not isinstance(layer, LoraLayer) or layer.disable_adapters or layer.merged:
        return None
    update = None
    for name in layer.active_adapters:
        if name in layer.lora_A:
            part = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))) * layer.scaling[name]
            update = part if update is None else update + part
    return update


def split_qkv(model: nn.Module, pattern: str) -> None:
    """Replace every Linear whose qualified name matches ``pattern`` (a regular expression) by ``SplitQKV``."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.Linear) and re.fullmatch(pattern, name):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, SplitQKV(layer))


def apply_lora(model: nn.Module, rank: int, target_modules: str, alpha: float | None = None) -> nn.Module:
    """Inject peft LoRA layers (rank ``rank``, scale alpha/rank = 1 by default) into the matching Linear layers."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=target_modules, lora_dropout=0.0, bias="none")
    return inject_adapter_in_model(config, model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every peft LoRA layer of ``model`` into its base layer (W + scale B A, peft's ``merge``) and put the base
    layer in its place, and fuse every ``SplitQKV`` back into one Linear, in place: the plain network an inference
    engine compiles."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.get_base_layer())
    for name, layer in list(model.named_modules()):
        if isinstance(layer, SplitQKV):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.fused())
    return model


def mark_trainable(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Only LoRA weights and parameters under ``prefixes`` train; everything else is frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or name.startswith(prefixes))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def adapter_spec(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor an adapter of ``model`` holds (its trainable parameters)."""
    return {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters() if p.requires_grad}
