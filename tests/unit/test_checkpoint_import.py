"""Checkpoints of the official SAMed / H-SAM / HF-SAM training code imported as HF-SAM adapters: a state dict in
``LoRA_Sam.save_lora_parameters``'s layout (random weights, tiny geometry) becomes a published version that the
server's model loads and that computes what the official model computes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import adapters  # noqa: E402

from lib.adapters import AdapterError, read_adapter  # noqa: E402
from lib.checkpoint_import import samed_adapter  # noqa: E402
from lib.configs.hf_sam import HFSamConfig  # noqa: E402
from lib.networks.hf_sam import HFSam  # noqa: E402
from lib.networks.lora import adapter_state_dict  # noqa: E402
from lib.networks.sam_backbone import get_encoder_spec  # noqa: E402
from lib.networks.sam_segmenter import build_segmenter  # noqa: E402

SPEC = get_encoder_spec("tiny")
C, D, DEPTH = SPEC.prompt_dim, SPEC.embed_dim, SPEC.depth
RANK = 3
ACDC = {"RV": 1, "Myo": 2, "LV": 3}


def official_checkpoint(num_classes: int = 4) -> dict[str, torch.Tensor]:
    """What the official ``save_lora_parameters`` writes for a model of ``num_classes`` (background included): LoRA
    A/B per block (q then v), the prompt encoder and the whole mask decoder (CIF_block ``Att``, ``compress_vit_feat``,
    ``hf_token``, the unused HQ modules and IoU head), and H-SAM's second stage."""
    g = torch.Generator().manual_seed(0)
    reference = build_segmenter(HFSam, "tiny", num_classes, RANK)
    state: dict[str, torch.Tensor] = {}
    for i in range(2 * DEPTH):
        state[f"w_a_{i:03d}"] = torch.randn(RANK, D, generator=g)
    for i in range(2 * DEPTH):
        state[f"w_b_{i:03d}"] = torch.randn(D, RANK, generator=g)
    for key, value in reference.state_dict().items():
        if key.startswith(("prompt_encoder.", "mask_decoder.")):
            state[key] = torch.randn(value.shape, generator=g)
    official = {
        "mask_decoder.Att.conv.weight": (C, 2 * C, 1, 1),
        "mask_decoder.Att.conv.bias": (C,),
        "mask_decoder.Att.spa.conv1.weight": (1, 2, 3, 3),
        "mask_decoder.Att.cha.fc1.weight": (C // 8, C, 1, 1),
        "mask_decoder.Att.cha.fc2.weight": (C, C // 8, 1, 1),
        "mask_decoder.compress_vit_feat.0.weight": (C, D, 1, 1),
        "mask_decoder.compress_vit_feat.0.bias": (C,),
        "mask_decoder.hf_token.weight": (1, C),
        "mask_decoder.hf_mlp.layers.0.weight": (C, C),
        "mask_decoder.embedding_encoder.0.weight": (C, C // 4, 2, 2),
        "mask_decoder.iou_prediction_head.layers.0.weight": (256, C),
        "mask_decoder2.mask_tokens.weight": (num_classes, C),
        "prompt_encoder2.no_mask_embed.weight": (1, C),
    }
    state.update({key: torch.randn(shape, generator=g) for key, shape in official.items()})
    return state


def test_tensors_land_where_the_official_model_uses_them():
    state = official_checkpoint()
    network = build_segmenter(HFSam, "tiny", 4, RANK)
    adapter, report = samed_adapter(state, adapter_state_dict(network), DEPTH)
    assert (report.rank, report.num_classes) == (RANK, 4) and report.not_in_file == []
    assert set(report.unused) == {
        "mask_decoder.hf_mlp.layers.0.weight",
        "mask_decoder.embedding_encoder.0.weight",
        "mask_decoder.iou_prediction_head.layers.0.weight",
        "mask_decoder2.mask_tokens.weight",
        "prompt_encoder2.no_mask_embed.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",  # a buffer: SAM's, frozen
    }
    assert torch.equal(adapter["awffm.mix.weight"], state["mask_decoder.Att.conv.weight"])
    assert torch.equal(adapter["awffm.channel_mlp.2.weight"], state["mask_decoder.Att.cha.fc2.weight"])
    assert torch.equal(adapter["tap_projections.0.bias"], state["mask_decoder.compress_vit_feat.0.bias"])
    assert torch.equal(adapter["hf_token.weight"], state["mask_decoder.hf_token.weight"])
    assert torch.equal(adapter["mask_decoder.mask_tokens.weight"], state["mask_decoder.mask_tokens.weight"])

    # LoRA: the official _LoRA_qkv adds B_q A_q x to the query and B_v A_v x to the value, nothing to the key.
    network.eval()
    with torch.no_grad():
        for name, value in adapter.items():
            network.get_parameter(name).copy_(value)
        x = torch.randn(2, 5, D)
        for block in (0, DEPTH - 1):
            qkv = network.image_encoder.blocks[block].attn.qkv
            base = torch.cat([qkv.q.base_layer(x), qkv.k(x), qkv.v.base_layer(x)], dim=-1)
            a_q, b_q = state[f"w_a_{2 * block:03d}"], state[f"w_b_{2 * block:03d}"]
            a_v, b_v = state[f"w_a_{2 * block + 1:03d}"], state[f"w_b_{2 * block + 1:03d}"]
            expected = base + torch.cat([x @ a_q.T @ b_q.T, torch.zeros_like(x), x @ a_v.T @ b_v.T], dim=-1)
            assert torch.allclose(qkv(x), expected, atol=1e-4)


def test_import_publishes_a_version_the_server_loads(tmp_path, capsys):
    checkpoint = tmp_path / "epoch_159.pth"
    torch.save(official_checkpoint(), checkpoint)
    model_dir = tmp_path / "model"
    assert (
        adapters.main(
            ["import", "--format", "samed", "--model", "hf_sam", "--backbone", "tiny", "--model-dir", str(model_dir), str(checkpoint)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "not imported: mask_decoder2.mask_tokens.weight" in out and "published as version 1" in out
    assert f"--conf lora_rank {RANK}" in out and '"RV": 1' in out  # 4 mask tokens: ACDC's classes by default
    payload = read_adapter(str(model_dir / "hf_sam.pt"))
    assert payload["info"]["imported_from"] == str(checkpoint) and payload["config"]["lora_rank"] == RANK

    config = HFSamConfig()
    conf = {"backbone": "tiny", "labels": json.dumps(ACDC), "lora_rank": str(RANK), "engine": "torch"}
    config.init("hf_sam", str(model_dir), conf, None)
    network = config.model.build_network()
    assert config.model.load_adapter(network)["version"] == 1
    assert torch.equal(network.awffm.mix.bias, official_checkpoint()["mask_decoder.Att.conv.bias"])


def test_bad_checkpoints_are_named(tmp_path, capsys):
    model_dir = str(tmp_path / "model")
    nine = tmp_path / "nine.pth"
    torch.save(official_checkpoint(num_classes=6), nine)
    assert (
        adapters.main(["import", "--format", "samed", "--model", "hf_sam", "--backbone", "tiny", "--model-dir", model_dir, str(nine)]) == 1
    )
    assert "has 5 classes; name them with --labels" in capsys.readouterr().err
    args = [
        "import",
        "--format",
        "samed",
        "--model",
        "hf_sam",
        "--backbone",
        "tiny",
        "--model-dir",
        model_dir,
        "--labels",
        json.dumps(ACDC),
        str(nine),
    ]
    assert adapters.main(args) == 1
    assert "--labels names 3 classes, the checkpoint has 5" in capsys.readouterr().err
    other = tmp_path / "other.pth"
    torch.save({"model": torch.zeros(1)}, other)
    assert (
        adapters.main(["import", "--format", "samed", "--model", "hf_sam", "--backbone", "tiny", "--model-dir", model_dir, str(other)]) == 1
    )
    assert "not a checkpoint of the SAMed/H-SAM/HF-SAM training code" in capsys.readouterr().err
    lite = ["import", "--format", "samed", "--model", "hf_sam", "--backbone", "litemedsam", "--model-dir", model_dir, str(nine)]
    assert adapters.main(lite) == 1
    assert "hold LoRA for SAM's ViT; --backbone litemedsam is not one of vit_b" in capsys.readouterr().err
    vit_b = official_checkpoint()
    vit_b["w_a_000"] = torch.zeros(RANK, 768)
    with pytest.raises(AdapterError, match="does not fit HF-SAM"):
        samed_adapter(vit_b, adapter_state_dict(build_segmenter(HFSam, "tiny", 4, RANK)), DEPTH)
    assert not (tmp_path / "model" / "hf_sam.pt").exists()
