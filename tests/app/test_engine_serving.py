"""The app on OpenVINO: torch answers until the engine is built for the served adapter, then the engine does, with
torch's output, keeping the slices torch encoded; a new or restored adapter is never answered by the engine of
another; a restart reads the converted encoder from the model folder."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.adapters import publish_adapter, restore_adapter

CONF = {
    "models": "hf_sam",
    "backbone": "tiny",
    "engine": "openvino",
    "precision": "fp32",
    "auto_scoring": "false",
    "embedding_cache_mb": "0",
}
REQUEST = {"model": "hf_sam", "image": "brain_002", "device": "cpu"}


def label_of(result) -> np.ndarray:
    return np.asarray(nib.load(result["label"]).dataobj)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def publish_random(model, seed: int) -> int:
    network, _ = model.resident("cpu")
    generator = torch.Generator().manual_seed(seed)
    state = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=generator) for n, p in network.named_parameters() if p.requires_grad}
    return publish_adapter(model.adapter_path, state, model.adapter_config())


def served(app, task="hf_sam"):
    """(label, engine) of REQUEST after the engine finished building for the adapter now published."""
    infer = app._infers[task]
    first = app.infer({**REQUEST, "model": task})
    infer.engine.wait(120)
    second = app.infer({**REQUEST, "model": task})
    return first, second


@pytest.mark.slow
def test_engine_follows_the_served_adapter(app_dir, studies):
    from main import SamFewShotApp

    app = SamFewShotApp(str(app_dir), str(studies), CONF)
    infer, model = app._infers["hf_sam"], app.models["hf_sam"].model
    engines = app_dir / "model" / "engines"

    torch_result, engine_result = served(app)
    assert torch_result["params"]["engine"] == "torch-fp32" and engine_result["params"]["engine"] == "openvino-fp32"
    assert agreement(label_of(engine_result), label_of(torch_result)) > 0.999
    assert app.info()["models"]["hf_sam"]["engine"] == {"engine": "openvino-fp32", "ready": True, "failure": None}
    base = label_of(engine_result)

    # A new adapter: torch answers with it while the engine converts it, then the engine does, with its output.
    assert publish_random(model, seed=1) == 1
    during, after = served(app)
    assert during["params"]["engine"] == "torch-fp32" and during["params"]["adapter_version"] == 1
    assert after["params"]["engine"] == "openvino-fp32" and after["params"]["adapter_version"] == 1
    assert agreement(label_of(after), label_of(during)) > 0.999
    assert agreement(label_of(after), base) < 0.99  # the adapter changed the answer
    first_adapter = label_of(after)
    assert infer.engine.conversions == 2 and len(list(engines.glob("*.xml"))) == 1  # the base entry was removed

    publish_random(model, seed=2)
    served(app)
    # Restoring version 1 serves version 1's answer, through torch first, then the engine.
    assert restore_adapter(model.adapter_path, 1) == 3
    during, after = served(app)
    assert during["params"]["engine"] == "torch-fp32" and after["params"]["engine"] == "openvino-fp32"
    assert agreement(label_of(during), first_adapter) > 0.999 and agreement(label_of(after), first_adapter) > 0.999

    # A restart reads the engine of the served adapter from the model folder.
    restarted = SamFewShotApp(str(app_dir), str(studies), CONF)
    _, again = served(restarted)
    assert again["params"]["engine"] == "openvino-fp32" and restarted._infers["hf_sam"].engine.conversions == 0
    assert agreement(label_of(again), first_adapter) > 0.999


@pytest.mark.slow
def test_clicks_and_em_instances_run_on_the_engine(app_dir, studies, em_studies):
    from main import SamFewShotApp

    # With the embedding cache on: the engine, ready after the first click, leaves what torch encoded in the cache.
    app = SamFewShotApp(str(app_dir), str(studies), {**CONF, "embedding_cache_mb": "256"})
    click = {"model": "hf_sam_interactive", "foreground": [[60, 70, 62]], "label": "white matter"}
    first = app.infer({**REQUEST, **click})
    app._infers["hf_sam_interactive"].engine.wait(120)
    cache = app._infers["hf_sam_interactive"].embeddings
    encoded = cache.misses
    second = app.infer({**REQUEST, **click})
    assert first["params"]["engine"] == "torch-fp32" and second["params"]["engine"] == "openvino-fp32"
    assert cache.misses == encoded and np.array_equal(label_of(second), label_of(first))

    em = SamFewShotApp(str(app_dir), str(em_studies), {**CONF, "models": "fgnet"})
    request = {"model": "fgnet", "image": "em_002", "device": "cpu"}
    first = em.infer(request)
    em._infers["fgnet"].engine.wait(120)
    second = em.infer(request)
    assert first["params"]["engine"] == "torch" and second["params"]["engine"] == "openvino-fp32"
    assert abs(second["params"]["instances"] - first["params"]["instances"]) <= max(1, first["params"]["instances"] // 50)


def test_int8_engine_is_calibrated_on_the_first_volume(app_dir, studies):
    from main import SamFewShotApp

    app = SamFewShotApp(str(app_dir), str(studies), {**CONF, "quantize": "int8", "preload": "true"})
    engine = app._infers["hf_sam"].engine
    engine.wait(120)
    assert not engine.status()["ready"] and engine.failure is None  # preloaded, but no volume to calibrate on yet
    first, second = served(app)
    assert first["params"]["engine"] == "torch-fp32" and second["params"]["engine"] == "openvino-int8"
    assert [p.name.endswith("-int8.xml") for p in (app_dir / "model" / "engines").glob("*.xml")] == [True]


def test_a_failed_conversion_keeps_torch_serving(app_dir, studies, monkeypatch):
    from lib.engines import openvino_engine
    from main import SamFewShotApp

    def broken(graph, input_shape):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(openvino_engine, "convert", broken)
    app = SamFewShotApp(str(app_dir), str(studies), CONF)
    first, second = served(app)
    assert first["params"]["engine"] == second["params"]["engine"] == "torch-fp32"
    assert np.array_equal(label_of(first), label_of(second))
    status = app.info()["models"]["hf_sam"]["engine"]
    assert not status["ready"] and "unsupported operation" in status["failure"]
    assert not list((app_dir / "model").glob("engines/*.xml"))
