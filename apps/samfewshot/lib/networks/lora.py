"""LoRA through peft: injection, merging for export, and which parameters train (an adapter holds exactly those;
its files are ``lib.adapters``)."""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn


def apply_lora(model: nn.Module, rank: int, target_modules: str, alpha: float | None = None) -> nn.Module:
    """Inject peft LoRA layers (rank ``rank``, scale alpha/rank = 1 by default) into the matching Linear layers."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=target_modules, lora_dropout=0.0, bias="none")
    return inject_adapter_in_model(config, model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every peft LoRA layer of ``model`` into its base layer (W + scale B A, peft's ``merge``) and put the base
    layer in its place, in place: the plain network an inference engine compiles."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.get_base_layer())
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
