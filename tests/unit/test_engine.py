"""The OpenVINO engine: compiled image encoders agree with torch, LoRA merged, cached on disk by what they compute,
a failed conversion leaves torch serving."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lib.engines import openvino_engine
from lib.engines.openvino_engine import EncoderEngine, EngineChoice, engine_from_conf
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


@pytest.mark.parametrize("backbone, precision, bound", [("tiny", "fp32", 1e-4), ("tiny", "bf16", 0.05), ("litemedsam", "fp32", 1e-4)])
def test_sam_encoder_matches_torch_with_lora_merged(tmp_path, backbone, precision, bound):
    network = random_lora(build_segmenter(HFSam, backbone, 3, 4), seed=1).eval()
    engine = EncoderEngine("hf_sam", str(tmp_path), precision)
    compiled = built(engine, "v1", copy.deepcopy(network.image_encoding()))
    size = network.spec.img_size
    # three slices: TinyViT reads its batch size as a number, which a graph traced with a free batch froze at one
    image = torch.rand(3, 3, size, size)
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


def test_int8_graph_is_calibrated_cached_under_its_own_name_and_close_to_torch(tmp_path):
    network = random_lora(build_segmenter(HFSam, "tiny", 3, 4), seed=1).eval()
    size = network.spec.img_size
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(1, size, size, 20, generator=generator)
    calibration = network.model_input(openvino_engine.calibration_slices(volume, count=4))
    assert calibration.shape == (4, 3, size, size)

    engine = EncoderEngine("hf_sam", str(tmp_path), "fp32", quantize="int8")
    assert engine.label == "openvino-int8" and engine.needs_calibration
    assert engine.claim("v1")
    engine.prepare("v1", copy.deepcopy(network.image_encoding()))  # no slices: nothing to calibrate on
    engine.wait(120)
    assert engine.encoder("v1") is None and "calibration" in engine.failure

    engine = EncoderEngine("hf_sam", str(tmp_path), "fp32", quantize="int8")
    assert engine.claim("v1")
    engine.prepare("v1", copy.deepcopy(network.image_encoding()), calibration)
    engine.wait(300)
    compiled = engine.encoder("v1")
    assert compiled is not None and compiled.label == "openvino-int8", engine.failure
    assert [p.name.endswith("-int8.xml") for p in tmp_path.glob("*.xml")] == [True]
    image = network.model_input(volume[..., 5:7].permute(3, 0, 1, 2))
    with torch.no_grad():
        embedding, _ = network.encode(image)
    got, _ = compiled(image)
    assert torch.nn.functional.cosine_similarity(got.flatten(), embedding.flatten(), dim=0) > 0.95

    # a restart reads the quantised graph back, without slices to calibrate on
    again = EncoderEngine("hf_sam", str(tmp_path), "fp32", quantize="int8")
    built(again, "v1", copy.deepcopy(network.image_encoding()))
    assert again.conversions == 0


def test_engine_from_conf(tmp_path):
    def conf(engine, precision="auto"):
        return {"engine": engine, "precision": precision}

    assert engine_from_conf("m", str(tmp_path), conf("torch"), "cpu", "fp32") is None
    assert engine_from_conf("m", str(tmp_path), conf("auto"), "cuda", "bf16") is None
    forced = engine_from_conf("m", str(tmp_path), conf("openvino", "fp32"), "cpu", "fp32")
    assert forced.label == "openvino-fp32" and forced.compare_torch is None
    auto = engine_from_conf("m", str(tmp_path), conf("auto"), "cpu", "bf16")
    assert auto.label == "auto" and auto.compare_torch == "bf16" and auto.precision == "auto"
    with pytest.raises(ValueError, match="valid values are auto, torch, openvino"):
        engine_from_conf("m", str(tmp_path), conf("onnx"), "cpu", "fp32")
    with pytest.raises(ValueError, match="runs on the CPU"):
        engine_from_conf("m", str(tmp_path), conf("openvino"), "cuda", "fp32")
    quantised = engine_from_conf("m", str(tmp_path), conf("auto"), "cpu", "bf16", "int8")
    assert quantised.quantize == "int8" and quantised.compare_torch == "bf16"
    for engine, device in (("torch", "cpu"), ("auto", "cuda")):
        with pytest.raises(ValueError, match="nothing would be quantised"):
            engine_from_conf("m", str(tmp_path), conf(engine), device, "fp32", "int8")


def test_without_openvino_cuda_serves_torch_and_a_cpu_engine_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_engine, "ov", None)
    monkeypatch.setattr(openvino_engine, "MISSING", "ModuleNotFoundError: No module named 'openvino'")
    assert engine_from_conf("m", str(tmp_path), {"engine": "auto", "precision": "auto"}, "cuda", "bf16") is None
    with pytest.raises(ValueError, match="needs OpenVINO and NNCF .*No module named 'openvino'.*engine torch"):
        engine_from_conf("m", str(tmp_path), {"engine": "auto", "precision": "auto"}, "cpu", "bf16")


def choice_from(monkeypatch, *rounds: dict[str, float]) -> EngineChoice:
    """The choice made from these medians (seconds per call of a 2-slice batch; a tie's run after them)."""
    answers = iter(rounds)
    monkeypatch.setattr(openvino_engine, "_seconds_in_turns", lambda runners, image, repeats: next(answers))
    labels = {label: None for r in rounds for label in r}
    return EngineChoice.measure(labels, torch.zeros(2, 1), key={}, tie_slices=4)


def test_choice_needs_a_margin_and_a_tie_goes_to_the_longer_run(monkeypatch):
    clear = choice_from(monkeypatch, {"torch-fp32": 2.0, "openvino-fp32": 1.0})
    assert clear.engine == "openvino-fp32" and clear.seconds_per_slice == {"torch-fp32": 1.0, "openvino-fp32": 0.5}
    assert clear.tie == {} and clear.source == "measured"
    assert choice_from(monkeypatch, {"torch-fp32": 1.0, "openvino-fp32": 2.0}).engine == "torch-fp32"
    # 5 % apart is a tie: the run on 4 slices settles it, whichever way it goes
    tie = choice_from(monkeypatch, {"torch-fp32": 2.0, "openvino-fp32": 1.9}, {"torch-fp32": 3.6, "openvino-fp32": 4.0})
    assert tie.engine == "torch-fp32" and tie.tie == {"torch-fp32": 0.9, "openvino-fp32": 1.0}
    # bf16 must beat OpenVINO's fp32 by the margin too, and the better of the two meets torch
    bf16 = choice_from(monkeypatch, {"torch-bf16": 2.0, "openvino-fp32": 1.0, "openvino-bf16": 0.6})
    assert bf16.engine == "openvino-bf16" and bf16.tie == {}
    close = choice_from(monkeypatch, {"openvino-fp32": 1.0, "openvino-bf16": 0.95}, {"openvino-fp32": 1.6, "openvino-bf16": 2.0})
    assert close.engine == "openvino-fp32"


def test_choice_is_measured_once_per_host_and_shown(tmp_path, monkeypatch):
    network = build_segmenter(HFSam, "tiny", 3, 4).eval()
    engine = EncoderEngine("hf_sam", str(tmp_path), "fp32", compare_torch="fp32")
    engine.claim("v1")
    engine.prepare("v1", copy.deepcopy(network.image_encoding()))
    engine.wait(120)
    assert engine.choice.source == "measured" and set(engine.choice.seconds_per_slice) == {"torch-fp32", "openvino-fp32"}
    status = engine.status()
    assert status["engine"] == engine.choice.engine and status["choice"]["source"] == "measured"
    assert (engine.encoder("v1") is not None) == engine.choice.engine.startswith("openvino")

    # a restart on this host reads the choice back; torch chosen, nothing is converted for a new adapter
    stored = json.loads((tmp_path / "choice-hf_sam.json").read_text())
    (tmp_path / "choice-hf_sam.json").write_text(json.dumps({**stored, "engine": "torch-fp32"}))

    def measured_again(*args, **kwargs):
        raise RuntimeError("measured again")

    monkeypatch.setattr(EngineChoice, "measure", measured_again)
    again = EncoderEngine("hf_sam", str(tmp_path), "fp32", compare_torch="fp32")
    again.claim("v2")
    again.prepare("v2", copy.deepcopy(random_lora(network, seed=4).image_encoding()))
    again.wait(120)
    assert again.choice.source == "cached" and again.status()["engine"] == "torch-fp32"
    assert again.encoder("v2") is None and again.conversions == 0 and again.failure is None

    # another thread count is another host: measured again
    other = EncoderEngine("hf_sam", str(tmp_path), "fp32", compare_torch="fp32", threads=engine.threads + 1)
    other.claim("v2")
    other.prepare("v2", copy.deepcopy(network.image_encoding()))
    other.wait(120)
    assert "measured again" in other.failure
