"""The OpenVINO engine: compiled image encoders agree with torch, LoRA merged, cached on disk by what they compute,
a failed conversion leaves torch serving."""

from __future__ import annotations

import copy

import pytest
import torch

from lib.engines import openvino_engine
from lib.engines.openvino_engine import EncoderEngine, resolve_engine
from lib.networks.fgnet import build_fgnet
from lib.networks.hf_sam import HFSam
from lib.networks.sam_segmenter import build_segmenter


def random_lora(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for name, p in network.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.05
    return network


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def built(engine: EncoderEngine, stamp, graph) -> openvino_engine.CompiledEncoder:
    assert engine.claim(stamp)
    engine.prepare(stamp, graph)
    engine.wait(120)
    compiled = engine.encoder(stamp)
    assert compiled is not None, engine.failure
    return compiled


@pytest.mark.parametrize("precision, bound", [("fp32", 1e-4), ("bf16", 0.05)])
def test_sam_encoder_matches_torch_with_lora_merged(tmp_path, precision, bound):
    network = random_lora(build_segmenter(HFSam, "tiny", 3, 4), seed=1).eval()
    engine = EncoderEngine("hf_sam", str(tmp_path), precision)
    compiled = built(engine, "v1", copy.deepcopy(network.image_encoding()))
    image = torch.rand(3, 3, 256, 256)  # another batch size than the traced one
    with torch.no_grad():
        embedding, taps = network.encode(image)
        base_embedding, _ = network.image_encoding().network.encode(image)
    got_embedding, got_taps = compiled(image)
    assert got_embedding.shape == embedding.shape and len(got_taps) == len(taps) == len(network.tap_indexes)
    assert relative_error(got_embedding, embedding) < bound
    assert all(relative_error(g, t) < bound for g, t in zip(got_taps, taps))
    # the network keeps its LoRA layers: only the copy was merged
    assert any("lora_A" in n for n, _ in network.named_parameters())


def test_fgnet_section_encoder_matches_torch(tmp_path):
    network = build_fgnet("tiny", lora_rank=2).eval()
    random_lora(network, seed=2)
    engine = EncoderEngine("fgnet", str(tmp_path), "fp32")
    compiled = built(engine, None, copy.deepcopy(network.image_encoding((64, 64))))
    volume = torch.rand(2, 1, 64, 64, 12)  # 24 sections: more than one torch chunk of 16
    with torch.no_grad():
        expected = network(volume)
        got = network(volume, encode=compiled)
    assert relative_error(got, expected) < 1e-4


def test_disk_cache_is_keyed_by_content_and_pruned(tmp_path):
    network = build_segmenter(HFSam, "tiny", 3, 4).eval()
    first = EncoderEngine("hf_sam", str(tmp_path), "fp32")
    built(first, "a", copy.deepcopy(network.image_encoding()))
    assert first.conversions == 1
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert [p.split(".")[-1] for p in entries] == ["bin", "json", "xml"]

    # a restart: the same weights are read back, not converted
    again = EncoderEngine("hf_sam", str(tmp_path), "fp32")
    built(again, "a", copy.deepcopy(network.image_encoding()))
    assert again.conversions == 0 and sorted(p.name for p in tmp_path.iterdir()) == entries

    # another adapter: converted, and the entry of the one no longer served is removed
    random_lora(network, seed=3)
    built(again, "b", copy.deepcopy(network.image_encoding()))
    assert again.conversions == 1
    now = sorted(p.name for p in tmp_path.iterdir())
    assert len(now) == 3 and not set(now) & set(entries)


def test_superseded_build_is_never_served(tmp_path):
    network = build_segmenter(HFSam, "tiny", 3, 4).eval()
    engine = EncoderEngine("hf_sam", str(tmp_path), "fp32")
    assert engine.claim("old")
    assert engine.claim("new")  # a newer adapter was served before the old build started
    assert not engine.claim("new")
    engine.prepare("old", copy.deepcopy(network.image_encoding()))
    engine.wait(120)
    assert engine.encoder("old") is None and engine.encoder("new") is None


def test_failed_conversion_leaves_torch_serving(tmp_path, monkeypatch, caplog):
    def broken(graph, input_shape):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(openvino_engine, "convert", broken)
    network = build_segmenter(HFSam, "tiny", 3, 4).eval()
    engine = EncoderEngine("hf_sam", str(tmp_path), "fp32")
    assert engine.claim("v1")
    engine.prepare("v1", copy.deepcopy(network.image_encoding()))
    engine.wait(120)
    assert engine.encoder("v1") is None
    assert "unsupported operation" in engine.failure and "torch keeps serving" in caplog.text
    assert engine.status() == {"engine": "openvino-fp32", "ready": False, "failure": engine.failure}


def test_engine_choice():
    assert resolve_engine("torch", "cpu", "fp32", "auto") == ("torch", None)
    assert resolve_engine("auto", "cuda", "bf16", "auto") == ("torch", None)
    assert resolve_engine("openvino", "cpu", "fp32", "fp32") == ("openvino", "fp32")
    with pytest.raises(ValueError, match="valid values are auto, torch, openvino"):
        resolve_engine("onnx", "cpu", "fp32", "auto")
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_engine("openvino", "cuda", "fp32", "auto")


def test_auto_follows_the_measurement(monkeypatch):
    monkeypatch.setattr(openvino_engine, "block_seconds_torch", lambda precision: 1.0)
    monkeypatch.setattr(openvino_engine, "block_seconds_openvino", lambda precision: 0.5)
    assert resolve_engine("auto", "cpu", "fp32", "fp32") == ("openvino", "fp32")
    monkeypatch.setattr(openvino_engine, "block_seconds_openvino", lambda precision: 0.95)
    assert resolve_engine("auto", "cpu", "fp32", "fp32") == ("torch", None)
