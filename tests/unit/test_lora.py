"""Adapter files: bit-exact round trip, versions and restore, atomic publish, config checks, resident swap."""

from __future__ import annotations

import copy
import errno
import io
import os
import re
import tempfile
import time

import pytest
import torch

import lib.adapters as lora
from lib.adapters import (
    AdapterError,
    check_adapter_config,
    check_adapter_tensors,
    history_path,
    list_versions,
    load_adapter_state,
    publish_adapter,
    published_version,
    read_adapter,
    restore_adapter,
)
from lib.networks.hf_sam import HFSam
from lib.networks.lora import adapter_spec, adapter_state_dict
from lib.networks.sam_segmenter import build_segmenter
from lib.served_model import ServedModel

LABELS = {"white matter": 1, "grey matter": 2}
S = 256  # tiny backbone input size


@pytest.fixture(scope="module")
def base():
    return build_segmenter(HFSam, "tiny", len(LABELS) + 1).eval()


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 1, S, S, generator=torch.Generator().manual_seed(3))


def _segmentation_model(adapter_path, build_network, labels=LABELS, backbone="tiny") -> ServedModel:
    return ServedModel(name="hf_sam", labels=dict(labels), backbone=backbone, adapter_path=str(adapter_path), build_network=build_network)


def _perturbed(base, seed: int):
    """A copy of ``base`` whose every trainable tensor moved by seeded noise, as after some training."""
    net = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(net.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def _run(net, x):
    with torch.no_grad():
        return net(x)


def _dummy_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 8, generator=g), "b.weight": torch.randn(3, generator=g)}


def _config(**override):
    return dict({"model": "hf_sam", "backbone": "tiny", "labels": LABELS, "lora_rank": 4}, **override)


# ------------------------------------------------------------------------------------------------ round trip


def test_adapter_round_trip_is_bit_exact(tmp_path, base, image):
    trained = _perturbed(base, seed=11)
    path = tmp_path / "hf_sam.pt"
    model = _segmentation_model(path, lambda: None)
    assert publish_adapter(str(path), adapter_state_dict(trained), model.adapter_config()) == 1

    fresh = build_segmenter(HFSam, "tiny", len(LABELS) + 1).eval()  # what another process builds
    expected = _run(trained, image)
    assert not torch.allclose(_run(fresh, image), expected, atol=1e-4)  # the adapter does change the outputs

    payload = read_adapter(str(path))
    load_adapter_state(fresh, payload["state_dict"])
    assert torch.equal(_run(fresh, image), expected)

    # the same through ServedModel.load_adapter, into another fresh copy of the base network
    other = copy.deepcopy(base)
    loaded = model.load_adapter(other)
    assert loaded is not None and loaded["version"] == 1
    for (n, a), (_, b) in zip(trained.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n


def test_adapter_file_holds_only_trainable_tensors(tmp_path, base):
    path = tmp_path / "hf_sam.pt"
    state = adapter_state_dict(base)
    publish_adapter(str(path), state, _config())
    stored = read_adapter(str(path))["state_dict"]

    params = dict(base.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert set(stored) == trainable
    assert not any(k.startswith("image_encoder.") and "lora_" not in k for k in stored)
    assert not any("base_layer" in k for k in stored)
    for k, v in stored.items():
        assert torch.equal(v, params[k].detach())

    full = io.BytesIO()
    torch.save(base.state_dict(), full)
    frozen_bytes = sum(p.numel() * p.element_size() for p in params.values() if not p.requires_grad)
    trainable_bytes = sum(params[k].numel() * params[k].element_size() for k in trainable)
    size = os.path.getsize(path)
    assert size < trainable_bytes + 64 * 1024  # tensors plus a little metadata
    assert size < full.getbuffer().nbytes - 0.9 * frozen_bytes  # the frozen backbone is not in the file


# -------------------------------------------------------------------------------------- versions and restore


def test_versions_history_and_restore(tmp_path):
    path = str(tmp_path / "models" / "hf_sam.pt")
    assert published_version(path) == 0 and list_versions(path) == []
    states = {v: _dummy_state(v) for v in (1, 2, 3)}
    for v in (1, 2, 3):
        assert publish_adapter(path, states[v], _config(), info={"run": v}) == v
        assert published_version(path) == v
        assert os.path.isfile(history_path(path, v))
        assert read_adapter(history_path(path, v))["info"] == {"run": v}
    assert list_versions(path) == [1, 2, 3]
    for k, t in read_adapter(path)["state_dict"].items():
        assert torch.equal(t, states[3][k])

    assert restore_adapter(path, 1) == 4
    payload = read_adapter(path)
    assert payload["version"] == 4
    assert payload["info"]["restored_from"] == 1 and payload["info"]["run"] == 1
    assert payload["config"] == _config()
    assert payload["state_dict"].keys() == states[1].keys()
    for k, t in payload["state_dict"].items():
        assert torch.equal(t, states[1][k])
    assert list_versions(path) == [1, 2, 3, 4]
    # history copies are never rewritten by a restore
    for k, t in read_adapter(history_path(path, 2))["state_dict"].items():
        assert torch.equal(t, states[2][k])

    with pytest.raises(AdapterError, match="no adapter version 9") as err:
        restore_adapter(path, 9)
    assert "[1, 2, 3, 4]" in str(err.value)


def test_a_withdrawn_adapter_never_gets_its_numbers_reused(tmp_path):
    """DELETE /model/{model} moves the served file aside; the next publish continues after the history."""
    path = str(tmp_path / "models" / "hf_sam.pt")
    for v in (1, 2):
        publish_adapter(path, _dummy_state(v), _config())
    kept = open(history_path(path, 2), "rb").read()
    os.rename(path, path + ".deleted")
    assert publish_adapter(path, _dummy_state(3), _config()) == 3
    assert open(history_path(path, 2), "rb").read() == kept and list_versions(path) == [1, 2, 3]


# ------------------------------------------------------------------------------------------- atomic publish


@pytest.mark.parametrize("fail_on_call, error", [(1, OSError), (2, KeyboardInterrupt)], ids=["history-write", "served-write-killed"])
def test_failed_publish_leaves_served_adapter_intact(tmp_path, monkeypatch, fail_on_call, error):
    path = tmp_path / "hf_sam.pt"
    assert publish_adapter(str(path), _dummy_state(1), _config()) == 1
    before = path.read_bytes()

    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == fail_on_call:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half a file, then the crash
            raise error("simulated crash while writing the adapter")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(lora.torch, "save", failing_save)
    with pytest.raises(AdapterError if error is OSError else error):
        publish_adapter(str(path), _dummy_state(2), _config())
    monkeypatch.undo()
    assert len(calls) == fail_on_call

    assert path.read_bytes() == before
    assert list_versions(str(path)) == [1]  # no history copy of a version that was never served
    payload = read_adapter(str(path))
    assert payload["version"] == 1
    for k, t in payload["state_dict"].items():
        assert torch.equal(t, _dummy_state(1)[k])
    leftovers = [p.name for d in (tmp_path, tmp_path / "history") for p in d.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []

    # the next publish works normally
    assert publish_adapter(str(path), _dummy_state(3), _config()) == 2
    assert torch.equal(read_adapter(str(path))["state_dict"]["b.weight"], _dummy_state(3)["b.weight"])


@pytest.mark.parametrize(
    "where, code, reason",
    [("mkstemp", errno.EROFS, "the model directory is read-only"), ("fsync", errno.ENOSPC, "the disk is full")],
    ids=["read-only-dir", "disk-full"],
)
def test_publish_on_a_full_or_read_only_disk_names_the_cause_and_keeps_the_served_adapter(tmp_path, monkeypatch, where, code, reason):
    path = tmp_path / "hf_sam.pt"
    publish_adapter(str(path), _dummy_state(1), _config())
    before = path.read_bytes()
    target = tempfile if where == "mkstemp" else os  # as lib.files.atomic_write calls them

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(target, where, fail)
    with pytest.raises(AdapterError, match=f"cannot publish version 2 .*{reason}.*version 1 stays served"):
        publish_adapter(str(path), _dummy_state(2), _config())
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert list_versions(str(path)) == [1]
    assert not [p.name for p in tmp_path.rglob(".tmp*")]


# --------------------------------------------------------------------------------------------- config checks


def test_check_adapter_config_names_the_differing_key(tmp_path):
    path = str(tmp_path / "hf_sam.pt")
    publish_adapter(path, _dummy_state(1), _config())
    payload = read_adapter(path)
    check_adapter_config(payload, _config(), path)  # same configuration: accepted

    with pytest.raises(AdapterError) as err:
        check_adapter_config(payload, _config(labels={"liver": 1, "spleen": 2}), path)
    assert "labels" in str(err.value) and "liver" in str(err.value) and path in str(err.value)
    assert "backbone" not in str(err.value)

    with pytest.raises(AdapterError) as err:
        check_adapter_config(payload, _config(backbone="vit_b"), path)
    assert "backbone" in str(err.value) and "vit_b" in str(err.value)
    assert "labels" not in str(err.value)


@pytest.mark.parametrize("server", [{"labels": {"liver": 1, "spleen": 2}}, {"backbone": "vit_b"}], ids=["labels", "backbone"])
def test_segmentation_model_refuses_foreign_adapter(tmp_path, base, server):
    path = tmp_path / "hf_sam.pt"
    publish_adapter(str(path), adapter_state_dict(_perturbed(base, seed=5)), _config())
    model = _segmentation_model(path, lambda: None, **server)
    net = copy.deepcopy(base)
    with pytest.raises(AdapterError) as err:
        model.load_adapter(net)
    assert next(iter(server)) in str(err.value)
    for (n, a), (_, b) in zip(base.state_dict().items(), net.state_dict().items()):
        assert torch.equal(a, b), n  # nothing was copied into the network


def test_load_adapter_state_refuses_other_tensors(base):
    net = copy.deepcopy(base)
    state = adapter_state_dict(net)
    with pytest.raises(AdapterError, match="missing"):
        load_adapter_state(net, {k: v for k, v in state.items() if not k.startswith("awffm.")})
    with pytest.raises(AdapterError, match="unknown"):
        load_adapter_state(net, dict(state, **{"image_encoder.neck.0.weight": torch.zeros(1)}))
    first = next(iter(state))
    for value, message in (
        (torch.zeros(1), "has shape (1,), model"),
        (state[first].double(), "has dtype torch.float64"),
        (torch.full_like(state[first], float("nan")), "NaN or infinite"),
        ([1.0], "is a list, not a tensor"),
    ):
        with pytest.raises(AdapterError, match=re.escape(message)):
            load_adapter_state(net, dict(state, **{first: value}))
    with pytest.raises(AdapterError, match="not a dict of tensors"):
        check_adapter_tensors([], adapter_spec(net))


@pytest.mark.parametrize("content", ["garbage", "plain-dict", "fused-qkv-format", "other-format-version"])
def test_read_adapter_rejects_non_adapter_files(tmp_path, content):
    path = tmp_path / "adapter.pt"
    if content == "garbage":
        path.write_bytes(b"\x00not a torch file" * 50)
        expected = "cannot read adapter"
    elif content == "plain-dict":
        torch.save({"state_dict": _dummy_state(1)}, path)
        expected = "not a samfewshot adapter"
    elif content == "fused-qkv-format":
        torch.save({"format": lora.ADAPTER_FORMAT, "format_version": 1, "state_dict": {}}, path)
        expected = r"format 1 \(LoRA on the fused qkv projection\).*The file is kept; train again"
    else:
        torch.save({"format": lora.ADAPTER_FORMAT, "format_version": 99, "state_dict": {}}, path)
        expected = "format version 99"
    with pytest.raises(AdapterError, match=expected) as err:
        read_adapter(str(path))
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------------ resident network


def _publish_later(path, state, config) -> int:
    """Publish with a modification time distinct from the previous file's.

    ``ServedModel.resident`` notices a new adapter by its mtime alone; file systems stamp times with a
    coarse clock (a few ms), so two publishes within one tick would look identical to it (see the report).
    """
    previous = os.stat(path).st_mtime_ns if os.path.exists(path) else None
    time.sleep(0.05)
    version = publish_adapter(str(path), state, config)
    assert os.stat(path).st_mtime_ns != previous
    return version


def test_resident_builds_once_swaps_adapters_and_rebuilds_after_removal(tmp_path, base, image):
    path = tmp_path / "hf_sam.pt"
    builds = []

    def build():
        builds.append(1)
        return copy.deepcopy(base)

    model = _segmentation_model(path, build)
    net, version = model.resident("cpu")
    assert version == 0 and len(builds) == 1 and not net.training
    assert model.resident("cpu") == (net, 0) and len(builds) == 1
    assert model.served_version() == 0

    first, second = _perturbed(base, seed=21), _perturbed(base, seed=22)
    assert _publish_later(path, adapter_state_dict(first), model.adapter_config()) == 1
    swapped, version = model.resident("cpu")
    assert swapped is net and version == 1 and len(builds) == 1
    assert torch.equal(_run(net, image), _run(first, image))
    assert model.served_version() == 1

    assert _publish_later(path, adapter_state_dict(second), model.adapter_config()) == 2
    swapped, version = model.resident("cpu")
    assert swapped is net and version == 2 and len(builds) == 1
    assert torch.equal(_run(net, image), _run(second, image))
    assert model.resident("cpu") == (net, 2) and len(builds) == 1

    os.remove(path)
    rebuilt, version = model.resident("cpu")
    assert rebuilt is not net and version == 0 and len(builds) == 2
    assert torch.equal(_run(rebuilt, image), _run(base, image))
    assert model.served_version() == 0


def test_resident_swaps_a_publish_within_the_same_clock_tick(tmp_path, base, image):
    """A publish is a new inode: it is noticed even when the file system gives it the previous mtime."""
    path = tmp_path / "hf_sam.pt"
    model = _segmentation_model(path, lambda: copy.deepcopy(base))
    first, second = _perturbed(base, seed=31), _perturbed(base, seed=32)
    publish_adapter(str(path), adapter_state_dict(first), model.adapter_config())
    net, version = model.resident("cpu")
    tick = os.stat(path).st_mtime_ns
    publish_adapter(str(path), adapter_state_dict(second), model.adapter_config())
    os.utime(path, ns=(tick, tick))
    net, version = model.resident("cpu")
    assert version == 2 and model.served_version() == 2
    assert torch.equal(_run(net, image), _run(second, image))
