"""Adapter files: every trainable tensor of a served model (LoRA weights and the modules that train in full) plus the
config it belongs to, never the frozen backbone.

Files are published with write-to-temp + ``os.replace``, so a reader never sees half a file and a run killed
mid-write leaves the served adapter untouched; every publish also keeps a numbered copy under ``history/`` from which
an earlier version can be restored. The tensors of a file are checked by name, shape, dtype and value against the
network before they are loaded.
"""

from __future__ import annotations

import datetime
import errno
import os
from typing import Any

import torch
from torch import nn

from lib.files import atomic_write
from lib.networks.lora import adapter_spec

ADAPTER_FORMAT = "samfewshot-adapter"

# 2: the SAM models' LoRA is on q and v, each with its own A and B (SAMed's); version 1 had one LoRA on the fused
# qkv, whose k part has no place in the new layout, so a version-1 file cannot be converted.
ADAPTER_FORMAT_VERSION = 2


class AdapterError(RuntimeError):
    """An adapter file is unreadable or belongs to another model configuration."""


def check_adapter_tensors(state: Any, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """An adapter's state dict must hold exactly the tensors of ``spec`` (``adapter_spec``): same names, shapes and
    dtypes, finite values."""
    if not isinstance(state, dict):
        raise AdapterError(f"its state_dict is a {type(state).__name__}, not a dict of tensors")
    unknown = sorted(set(state) - set(spec))
    missing = sorted(set(spec) - set(state))
    if unknown or missing:
        raise AdapterError(f"adapter does not fit the model: unknown tensors {unknown[:3]}, missing {missing[:3]}")
    for name, value in state.items():
        shape, dtype = spec[name]
        if not isinstance(value, torch.Tensor):
            raise AdapterError(f"adapter entry '{name}' is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise AdapterError(f"adapter tensor '{name}' has shape {tuple(value.shape)}, model {shape}")
        if value.dtype != dtype:
            raise AdapterError(f"adapter tensor '{name}' has dtype {value.dtype}, model {dtype}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterError(f"adapter tensor '{name}' holds NaN or infinite values")


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy an adapter's tensors into ``model`` after ``check_adapter_tensors``."""
    check_adapter_tensors(state, adapter_spec(model))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def read_adapter_record(path: str) -> dict[str, Any]:
    """An adapter file's payload of any format version: enough to number and list versions, not to load one."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(f"cannot read adapter '{path}': {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"'{path}' is not a samfewshot adapter file")
    return payload


def read_adapter(path: str) -> dict[str, Any]:
    """An adapter file's payload, of the format this version loads."""
    payload = read_adapter_record(path)
    version = payload.get("format_version")
    if version == 1:
        raise AdapterError(
            f"'{path}' is an adapter of format 1 (LoRA on the fused qkv projection), which this version cannot load: "
            "the SAM models now put LoRA on q and v as the official HF-SAM code. The file is kept; train again "
            "(POST /train/<model>) to publish an adapter of format 2"
        )
    if version != ADAPTER_FORMAT_VERSION:
        raise AdapterError(f"'{path}' has adapter format version {version}, expected {ADAPTER_FORMAT_VERSION}")
    return payload


def check_adapter_config(payload: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """The adapter must have been trained for the same model configuration (backbone, classes, rank...)."""
    diff = {k: (payload["config"].get(k), v) for k, v in config.items() if payload["config"].get(k) != v}
    if diff:
        raise AdapterError(
            f"adapter '{path}' was trained for another configuration: "
            + "; ".join(f"{k}: adapter {a!r}, server {b!r}" for k, (a, b) in diff.items())
        )


def history_dir(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), "history")


def history_path(path: str, version: int) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(history_dir(path), f"{stem}.v{version:04d}.pt")


def _atomic_save(obj: Any, path: str) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def adapter_payload(version: int | None, state: dict[str, torch.Tensor], config: dict[str, Any], info: dict[str, Any] | None) -> dict:
    """What an adapter file holds: the tensors, the config they belong to, the run's info, a version (None: a kept
    candidate)."""
    return {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "version": version,
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "config": dict(config),
        "info": dict(info or {}),
        "state_dict": state,
    }


def published_version(path: str) -> int:
    """Version of the adapter served at ``path``; 0 when none was published yet."""
    return int(read_adapter_record(path)["version"]) if os.path.exists(path) else 0


def publish_adapter(path: str, state: dict[str, torch.Tensor], config: dict[str, Any], info: dict[str, Any] | None = None) -> int:
    """Publish ``state`` as the next version of the adapter at ``path``; returns the new version number."""
    # After the next version of both the served file and the history: a withdrawn adapter (DELETE /model/{model})
    # leaves no served file, and its numbers must not be given out again over the kept copies.
    version = max([published_version(path), *list_versions(path)]) + 1
    payload = adapter_payload(version, state, config, info)
    kept = history_path(path, version)
    try:
        _atomic_save(payload, kept)
        try:
            _atomic_save(payload, path)
        except BaseException:
            os.remove(kept)  # never list a version that was not served
            raise
    except OSError as e:
        reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the model directory is read-only"}.get(e.errno, str(e))
        raise AdapterError(
            f"cannot publish version {version} of adapter '{path}': {reason} ({e.strerror or e}); version {version - 1} stays served"
        ) from e
    return version


def candidates_dir(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), "candidates")


def keep_candidate(path: str, state: dict[str, torch.Tensor], config: dict[str, Any], info: dict[str, Any], name: str) -> str:
    """Keep a run's adapter that was not served (``candidates/<stem>.<name>.pt``, the adapter file format without a
    version); ``serve_candidate`` publishes it if a person decides to. Returns its path."""
    stem = os.path.splitext(os.path.basename(path))[0]
    kept = os.path.join(candidates_dir(path), f"{stem}.{name}.pt")
    try:
        _atomic_save({**adapter_payload(None, state, config, info), "candidate": True}, kept)
    except OSError as e:
        raise AdapterError(f"cannot keep the candidate adapter '{kept}': {e.strerror or e}") from e
    return kept


def serve_candidate(path: str, candidate: str) -> int:
    """Publish a kept candidate (``keep_candidate``) as the next version of the adapter at ``path``."""
    payload = read_adapter(candidate)
    if not payload.get("candidate"):
        raise AdapterError(f"'{candidate}' is not a kept candidate adapter")
    info = dict(payload.get("info", {}), served_from_candidate=os.path.basename(candidate))
    return publish_adapter(path, payload["state_dict"], payload["config"], info)


def list_versions(path: str) -> list[int]:
    directory = history_dir(path)
    stem = os.path.splitext(os.path.basename(path))[0] + ".v"
    if not os.path.isdir(directory):
        return []
    return sorted(int(f[len(stem) : -3]) for f in os.listdir(directory) if f.startswith(stem) and f.endswith(".pt"))


def restore_adapter(path: str, version: int) -> int:
    """Serve an earlier version again, published as a new version so every reader notices the change."""
    old = history_path(path, version)
    if not os.path.exists(old):
        raise AdapterError(f"no adapter version {version} for '{path}'; available: {list_versions(path)}")
    payload = read_adapter(old)
    info = dict(payload.get("info", {}), restored_from=version)
    return publish_adapter(path, payload["state_dict"], payload["config"], info)
