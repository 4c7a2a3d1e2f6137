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
    """A fused ``qkv`` Linear (C -> 3D) as three Linears ``q``, ``k``, ``v`` (C -> D) that LoRA can target one by
    one; (..., C) -> (..., 3D), the fused layer's output.

    SAM's ViT lays the fused output out as three contiguous thirds [q | k | v]; TinyViT (LiteMedSAM) per head,
    [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]. ``heads`` selects the second layout: splitting it by thirds would put "q"
    and "v" LoRA on rows of mixed roles.

    Args:
        fused: the ``qkv`` Linear whose weights (and bias) are split; it is not kept.
        heads: None for the layout by thirds; else the number of heads of the per-head layout.
    """

    def __init__(self, fused: nn.Linear, heads: int | None = None):
        super().__init__()
        dim = fused.out_features // 3
        if heads is not None and dim % heads:
            raise ValueError(f"a per-head qkv of {fused.out_features} outputs cannot hold {heads} heads of equal q, k and v")
        self.heads = heads
        bias = fused.bias is not None
        self.q, self.k, self.v = (nn.Linear(fused.in_features, dim, bias=bias) for _ in range(3))
        with torch.no_grad():
            for part, weight in zip((self.q, self.k, self.v), self.unfuse(fused.weight)):
                part.weight.copy_(weight)
            if bias:
                for part, value in zip((self.q, self.k, self.v), self.unfuse(fused.bias)):
                    part.bias.copy_(value)
        self.requires_grad_(fused.weight.requires_grad)

    def unfuse(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A fused weight (3D, C) or bias (3D,) -> its q, k and v parts (D, ...)."""
        if self.heads is None:
            return fused.chunk(3)
        return tuple(part.flatten(0, 1) for part in fused.unflatten(0, (self.heads, 3, -1)).unbind(1))

    def fuse(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """q, k and v weights (D, C) or biases (D,) -> the fused layer's (3D, ...), in its layout."""
        if self.heads is None:
            return torch.cat(parts)
        return torch.stack([p.unflatten(0, (self.heads, -1)) for p in parts], dim=1).flatten(0, 2)

    def output_part(self, out: torch.Tensor, i: int) -> torch.Tensor:
        """The view of the fused output (..., 3D) that part ``i`` (0 q, 1 k, 2 v) wrote, (..., D) or (..., heads, D/heads)."""
        if self.heads is None:
            dim = out.shape[-1] // 3
            return out.narrow(-1, i * dim, dim)
        return out.unflatten(-1, (self.heads, 3, -1)).select(-2, i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The three frozen projections in one matmul, then each part's LoRA update added to its rows: the same
        result as the fused layer with the updates in its weight; three products ran up to a third slower under bf16
        autocast."""
        bases = [part.get_base_layer() if isinstance(part, LoraLayer) else part for part in (self.q, self.k, self.v)]
        bias = self.fuse([b.bias for b in bases]) if bases[0].bias is not None else None
        out = F.linear(x, self.fuse([b.weight for b in bases]), bias)
        for i, part in enumerate((self.q, self.k, self.v)):
            update = lora_update(part, x)
            if update is not None:
                view = self.output_part(out, i)
                view.add_(update.to(out.dtype).reshape(view.shape))  # in place: linear's backward never reads out
        return out

    def fused(self) -> nn.Linear:
        """The three projections as one Linear again (after ``merge_lora``, for an inference engine)."""
        q, k, v = self.q, self.k, self.v
        layer = nn.Linear(q.in_features, 3 * q.out_features, bias=q.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.fuse([q.weight, k.weight, v.weight]))
            if layer.bias is not None:
                layer.bias.copy_(self.fuse([q.bias, k.bias, v.bias]))
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


def split_qkv(model: nn.Module, pattern: str, per_head: bool = False) -> None:
    """Replace every Linear whose qualified name matches ``pattern`` (a regular expression) by ``SplitQKV``; with
    ``per_head``, of the per-head layout, the head count read from the parent attention's ``num_heads``."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.Linear) and re.fullmatch(pattern, name):
            parent, _, attr = name.rpartition(".")
            attention = model.get_submodule(parent)
            setattr(attention, attr, SplitQKV(layer, attention.num_heads if per_head else None))


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
