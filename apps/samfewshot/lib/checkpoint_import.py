"""Checkpoints of the official SAMed-family training code (SAMed, H-SAM, HF-SAM) as HF-SAM adapters.

Their ``LoRA_Sam.save_lora_parameters`` writes one ``torch.save`` dict:

* ``w_a_000`` ... and ``w_b_000`` ...: LoRA's A (r, C) and B (C, r), two per encoder block in block order, the
  query's then the value's (``_LoRA_qkv``), unscaled (B A x is added), as peft's with alpha = r;
* every ``prompt_encoder.*`` and ``mask_decoder.*`` tensor of the model's state dict (and H-SAM's second stage,
  ``prompt_encoder2.*`` / ``mask_decoder2.*``, which HF-SAM also builds but never runs).

``samed_adapter`` maps them onto HF-SAM's trainable tensors and says what it could not map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from lib.adapters import AdapterError, check_adapter_tensors

# official name prefix -> this network's; SAM's own modules keep their names.
RENAMES = {
    "mask_decoder.Att.conv.": "awffm.mix.",
    "mask_decoder.Att.spa.conv1.": "awffm.spatial.",
    "mask_decoder.Att.cha.fc1.": "awffm.channel_mlp.0.",
    "mask_decoder.Att.cha.fc2.": "awffm.channel_mlp.2.",
    "mask_decoder.compress_vit_feat.0.": "tap_projections.0.",
    "mask_decoder.hf_token.": "hf_token.",
}
# Built by the official code but not read by HF-SAM's forward pass, or not part of this model (no IoU head).
UNUSED = {
    "mask_decoder.iou_prediction_head.": "the IoU head (this model predicts no mask quality)",
    "mask_decoder.hf_mlp.": "the hf_token's MLP (the official forward never reads the token's output)",
    "mask_decoder.embedding_encoder.": "HQ-SAM's feature upscaler (built, never called)",
    "mask_decoder.embedding_maskfeature.": "HQ-SAM's mask-feature convs (built, never called)",
    "mask_decoder2.": "H-SAM's second decoder stage (built, never called by HF-SAM)",
    "prompt_encoder2.": "H-SAM's second prompt encoder (built, never called by HF-SAM)",
}
LORA_KEY = re.compile(r"w_([ab])_(\d{3})")


@dataclass
class ImportReport:
    """What ``samed_adapter`` did: the LoRA rank and class count it read, the tensors left out (name -> why) and
    the model tensors the file did not have (kept at their initial values)."""

    rank: int
    num_classes: int
    unused: dict[str, str] = field(default_factory=dict)
    not_in_file: list[str] = field(default_factory=list)


def samed_layout(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(LoRA rank, classes with the background) of a SAMed-family checkpoint; AdapterError when it is not one."""
    if not isinstance(state, dict) or "w_a_000" not in state or "mask_decoder.mask_tokens.weight" not in state:
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise AdapterError(
            f"not a checkpoint of the SAMed/H-SAM/HF-SAM training code (no w_a_000 or mask_decoder.mask_tokens.weight): {keys}"
        )
    return int(state["w_a_000"].shape[0]), int(state["mask_decoder.mask_tokens.weight"].shape[0])


def samed_adapter(
    state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], depth: int
) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """A SAMed-family checkpoint -> an adapter state dict for an HF-SAM network whose trainable tensors are
    ``initial`` (``lora.adapter_state_dict`` of a freshly built one, with the checkpoint's rank and class count) and
    whose encoder has ``depth`` blocks. Tensors the file lacks keep their ``initial`` values and are reported."""
    rank, num_classes = samed_layout(state)
    report = ImportReport(rank=rank, num_classes=num_classes)
    adapter: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        lora = LORA_KEY.fullmatch(key)
        if lora:
            index = int(lora.group(2))
            if index >= 2 * depth:
                raise AdapterError(f"'{key}' is LoRA of block {index // 2}, but the encoder has {depth} blocks: another backbone?")
            projection = "qv"[index % 2]
            adapter[f"image_encoder.blocks.{index // 2}.attn.qkv.{projection}.lora_{lora.group(1).upper()}.default.weight"] = value
            continue
        reason = next((why for prefix, why in UNUSED.items() if key.startswith(prefix)), None)
        if reason:
            report.unused[key] = reason
            continue
        name = next((new + key[len(old) :] for old, new in RENAMES.items() if key.startswith(old)), key)
        if name in initial:
            adapter[name] = value
        else:
            report.unused[key] = "not an adapter tensor of HF-SAM (a frozen buffer comes from the SAM checkpoint)"
    report.not_in_file = sorted(set(initial) - set(adapter))
    adapter = {name: adapter.get(name, initial[name]).to(initial[name].dtype) for name in initial}
    try:
        check_adapter_tensors(adapter, {name: (tuple(v.shape), v.dtype) for name, v in initial.items()})
    except AdapterError as e:
        raise AdapterError(f"the checkpoint does not fit HF-SAM with backbone and rank {rank}: {e}") from e
    return adapter, report
