"""The bf16 inference path against fp32 on the tiny models: the bound docs/benchmarks.md states; and the bf16
training iteration against fp32's gradients.

Bound: relative L2 error of the logits <= 5 %, and the arg-max label of >= 98 % of the pixels unchanged.
"""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lib.compute
from lib.compute import autocast, resolve_precision
from lib.networks.hf_sam import HFSam
from lib.networks.masg_sam import MASGSam
from lib.networks.sam_segmenter import build_segmenter
from lib.trainers.adapter_trainer import autocast_iteration

MAX_RELATIVE_ERROR = 0.05
MIN_LABEL_AGREEMENT = 0.98


@pytest.mark.parametrize("model_cls", [HFSam, MASGSam])
def test_bf16_logits_match_fp32_within_the_bound(model_cls, sample_data):
    kwargs = {"class_text": torch.randn(3, 64)} if model_cls is MASGSam else {}
    network = build_segmenter(model_cls, "tiny", 3, 4, None, **kwargs).eval()
    volume = np.asarray(nib.load(str(sample_data / "brain-mri" / "brain_003.nii.gz")).dataobj, dtype=np.float32)
    slices = torch.from_numpy(volume[..., 40:100:15]).permute(2, 0, 1)[:, None]  # 4 axial slices through the brain
    slices = F.interpolate(slices / slices.amax(), size=(256, 256), mode="bilinear")
    with torch.no_grad():
        reference = network(slices)
        with autocast("bf16", "cpu"):
            fast = network(slices)
    assert fast.dtype == torch.bfloat16  # the fast path really ran in bf16
    fast = fast.float()
    relative_error = float((fast - reference).norm() / reference.norm())
    agreement = float((fast.argmax(1) == reference.argmax(1)).float().mean())
    print(f"{model_cls.__name__}: relative error {relative_error:.4f}, label agreement {agreement:.4f}")
    assert relative_error <= MAX_RELATIVE_ERROR and agreement >= MIN_LABEL_AGREEMENT


def test_precision_choice():
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="valid values are auto, fp32, bf16"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize(
    "bf16_instructions, bf16_seconds, expected", [(True, 0.5, "bf16"), (True, 0.95, "fp32"), (True, 2.0, "fp32"), (False, 0.5, "fp32")]
)
def test_auto_precision_follows_the_measured_cpu_speed(monkeypatch, bf16_instructions, bf16_seconds, expected):
    """A CPU with bf16 instructions gets bf16 only where its bf16 products measure clearly faster than fp32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_instructions)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(lib.compute, "linear_seconds", lambda precision: {"fp32": 1.0, "bf16": bf16_seconds}[precision])
    assert resolve_precision("auto", "cpu") == expected


def test_a_bf16_training_iteration_computes_the_fp32_gradients_closely(sample_data):
    """``--conf train_precision bf16``: the iteration runs its products in bf16, the loss and the LoRA gradients
    stay fp32 and point the way fp32's do."""
    torch.manual_seed(0)
    network = build_segmenter(HFSam, "tiny", 3, 4, None).train()
    volume = np.asarray(nib.load(str(sample_data / "brain-mri" / "brain_003.nii.gz")).dataobj, dtype=np.float32)
    truth = np.asarray(nib.load(str(sample_data / "brain-mri-groundtruth" / "brain_003.nii.gz")).dataobj)
    image = F.interpolate(torch.from_numpy(volume[..., 60:62]).permute(2, 0, 1)[:, None] / volume.max(), size=(256, 256))
    label = F.interpolate(torch.from_numpy(truth[..., 60:62].astype(np.float32)).permute(2, 0, 1)[:, None], size=(256, 256)).long()
    lora = {name: p for name, p in network.named_parameters() if p.requires_grad and "lora_" in name}
    seen = {}

    def iteration(engine, batch):
        network.zero_grad()
        logits = network(batch["image"])
        loss = network.training_loss(logits, batch["label"])
        loss.backward()
        seen.update(logits=logits.dtype, loss=loss.dtype)
        return {name: p.grad.clone() for name, p in lora.items()}

    engine = SimpleNamespace(state=SimpleNamespace(device=torch.device("cpu")), _iteration=iteration)
    reference = iteration(engine, {"image": image, "label": label})
    fast = autocast_iteration(engine, {"image": image, "label": label}, precision="bf16")
    assert seen == {"logits": torch.bfloat16, "loss": torch.float32}
    assert all(g.dtype == torch.float32 for g in fast.values())
    flat = [torch.cat([g.flatten() for g in grads.values()]) for grads in (reference, fast)]
    cosine = float(F.cosine_similarity(*flat, dim=0))
    print(f"bf16 against fp32 LoRA gradient: cosine {cosine:.4f}")
    assert cosine > 0.95
