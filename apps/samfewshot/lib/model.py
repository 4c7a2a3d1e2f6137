"""What the infer task, the trainer and scoring share about one served segmentation model.

``SegmentationModel`` names the network, its label set, backbone and adapter file. The network is built once
per device and kept resident; when the published adapter changes (a training run finished, possibly in
another process) its tensors are swapped into the resident network, without rebuilding it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from monai.apps import download_url
from torch import nn

from lib.networks.lora import adapter_spec, check_adapter_config, check_adapter_tensors, load_adapter_state, read_adapter
from lib.networks.sam_backbone import OFFICIAL_CHECKPOINTS, CheckpointError, OfficialCheckpoint, get_encoder_spec
from lib.process_local import ProcessLocal

logger = logging.getLogger(__name__)


def file_stamp(path: str) -> tuple[int, int, int] | None:
    """Identity of a file's current content: each atomic publish is a new inode, whatever the clock says."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def parse_labels(labels: dict[str, int]) -> dict[str, int]:
    """Model label set {name: id}: ids 1..N, each once; 0 is background and is not listed."""
    ids = sorted(labels.values())
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(f"labels must use the ids 1..N once each (0 is background), got {labels}")
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


def resolve_checkpoint(value: str | None, official: OfficialCheckpoint | None, model_dir: str, conf_key: str, what: str = "SAM") -> str:
    """Local path of a weights file: ``value`` is a path or URL (default: the ``official`` file's URL). URLs are
    downloaded once into the model dir, verified by sha256 where the official hash is known; every failure names
    the file, where to get it and the ``--conf`` key that points to it."""
    value = value or (official.url if official else None)
    if not value:
        raise CheckpointError(f"no official {what} checkpoint for this backbone; set --conf {conf_key}")
    if not value.startswith(("http://", "https://")):
        if not os.path.isfile(value):
            raise CheckpointError(f"--conf {conf_key} '{value}' does not exist")
        return value
    is_official = official is not None and value == official.url
    filename = official.filename if is_official else os.path.basename(value)
    path = os.path.join(model_dir, filename)
    if not os.path.exists(path):
        try:
            sha = official.sha256 if is_official else None
            download_url(value, path, hash_val=sha, hash_type="sha256", progress=False)
        except Exception as e:
            raise CheckpointError(
                f"{what} weights '{filename}' are not available: download from {value} failed ({e}). Download it on a "
                f"machine with internet access, then copy it to {path} or pass its path with "
                f"--conf {conf_key} /path/to/{filename}; for an offline trial use --conf backbone tiny"
            ) from e
    return path


def resolve_sam_checkpoint(backbone: str, value: str | None, model_dir: str) -> str | None:
    """SAM weights for ``backbone``; None for ``tiny`` without a checkpoint (random weights by design)."""
    if backbone == "tiny" and not value:
        return None
    return resolve_checkpoint(value, OFFICIAL_CHECKPOINTS.get(backbone), model_dir, "sam_checkpoint")


@dataclass
class SegmentationModel(ProcessLocal):
    """One served segmentation model: ``build_network()`` gives its network with LoRA and frozen base weights."""

    name: str
    labels: dict[str, int]
    backbone: str
    adapter_path: str
    build_network: Callable[[], nn.Module]
    modality: str = "auto"
    lora_rank: int = 4
    options: dict[str, Any] = field(default_factory=dict)  # model-specific settings an adapter must agree with
    _resident: dict[str, tuple[nn.Module, tuple | None, int]] = field(default_factory=dict, repr=False)
    _version: int = field(default=0, repr=False)
    _version_stamp: tuple | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _adapter_spec: dict[str, tuple] | None = field(default=None, repr=False)
    process_local: ClassVar[dict[str, Callable[[], Any]]] = {"_resident": dict, "_lock": threading.Lock}

    @property
    def num_classes(self) -> int:
        return len(self.labels) + 1

    @property
    def img_size(self) -> int:
        return get_encoder_spec(self.backbone).img_size

    def adapter_config(self) -> dict[str, Any]:
        """What an adapter must agree with to be loaded into this model."""
        return {"model": self.name, "backbone": self.backbone, "labels": self.labels, "lora_rank": self.lora_rank, **self.options}

    def load_adapter(self, network: nn.Module, path: str | None = None) -> dict[str, Any] | None:
        """Load the adapter at ``path`` (default: the published one) into ``network``; returns its payload."""
        path = path or self.adapter_path
        if not os.path.exists(path):
            return None
        payload = read_adapter(path)
        check_adapter_config(payload, self.adapter_config(), path)
        load_adapter_state(network, payload["state_dict"])
        return payload

    def check_adapter_tensors(self, state: Any) -> None:
        """``lora.check_adapter_tensors`` against this model's network's trainable tensors, read from a resident
        network, or from one built for the purpose when none is (once per process)."""
        if self._adapter_spec is None:
            with self._lock:
                built = next(iter(self._resident.values()), None)
            self._adapter_spec = adapter_spec(built[0] if built else self.build_network())
        check_adapter_tensors(state, self._adapter_spec)

    def resident(self, device: str) -> tuple[nn.Module, int]:
        """The network kept on ``device`` with the currently published adapter swapped in, and its version."""
        with self._lock:
            stamp = file_stamp(self.adapter_path)
            network, loaded, version = self._resident.get(device, (None, None, 0))
            if network is None or (loaded and not stamp):  # first use, or the adapter was withdrawn
                network = self.build_network().to(device).eval()
                loaded, version = None, 0
            if loaded != stamp:
                payload = self.load_adapter(network)
                version = int(payload["version"]) if payload else 0
                logger.info(f"{self.name}: serving adapter version {version} on {device}")
            self._resident[device] = (network, stamp, version)
            return network, version

    def loaded_stamp(self, device: str) -> tuple | None:
        """Identity of the adapter loaded into the resident network on ``device`` (None: base weights only)."""
        with self._lock:
            return self._resident.get(device, (None, None, 0))[1]

    def copy_resident(self, device: str, stamp: tuple | None, part: Callable[[nn.Module], nn.Module]) -> nn.Module | None:
        """A deep copy of ``part(network)`` of the resident network on ``device`` while it holds adapter ``stamp``
        (None when it has moved on): copied under the lock, so a hot swap cannot interleave."""
        with self._lock:
            network, loaded, _ = self._resident.get(device, (None, None, 0))
            if network is None or loaded != stamp:
                return None
            return copy.deepcopy(part(network))

    def served_version(self) -> int:
        """Version of the published adapter file (0: base weights only)."""
        with self._lock:
            stamp = file_stamp(self.adapter_path)
            if self._version_stamp != stamp:
                self._version = int(read_adapter(self.adapter_path)["version"]) if stamp else 0
                self._version_stamp = stamp
            return self._version


def torch_device(name: str) -> str:
    """'auto' -> cuda when present, else cpu; 'cuda' on a machine without one is an error, not a silent fallback."""
    if name in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--conf device {name}: no CUDA device is available")
    return name


PRECISIONS = ("auto", "fp32", "bf16")
# On a CPU, 'auto' picks bf16 only when it takes less than this share of fp32's time: it is less exact.
BF16_MIN_GAIN = 0.9


def bf16_faster(device: str) -> bool:
    """Whether bf16 autocast runs this model's kind of work faster than fp32 on ``device``.

    CUDA with bf16 support: yes. A CPU without AVX512-BF16 or AMX: no. A CPU with them is measured on a
    ViT-B-sized linear layer, because the flags do not tell: one AVX512-BF16 host without AMX ran bf16 products
    at half its fp32 speed, another at twice (docs/benchmarks.md).
    """
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return False
    fp32, bf16 = linear_seconds("fp32"), linear_seconds("bf16")
    faster = bf16 < BF16_MIN_GAIN * fp32
    logger.info(
        f"precision auto: a ViT-B linear layer takes {fp32 * 1e3:.1f} ms in fp32 and {bf16 * 1e3:.1f} ms in bf16 on "
        f"this CPU, so inference runs in {'bf16' if faster else 'fp32'}"
    )
    return faster


@functools.cache
def linear_seconds(precision: str, tokens: int = 2048, width: int = 768, repeats: int = 5) -> float:
    """Best time of a (tokens x width) @ (width x 4 width) linear layer on the CPU under ``precision``'s autocast
    (the MLP of a ViT-B block on two 512 x 512 slices' tokens); measured once per process."""
    layer = torch.nn.Linear(width, 4 * width)
    x = torch.randn(tokens, width)
    times = []
    with torch.no_grad(), autocast(precision, "cpu"):
        for _ in range(repeats + 1):
            start = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - start)
    return min(times[1:])


def inference_precision(name: str, device: str) -> str:
    """'auto' -> bf16 where the device runs it faster than fp32, else fp32; an unknown name is an error."""
    if name not in PRECISIONS:
        raise ValueError(f"--conf precision {name!r}: valid values are {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if bf16_faster(device) else "fp32"
    return name


def autocast(precision: str, device: str):
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` CPU threads for torch's operators in this thread (OpenMP's setting is per
    thread, so other requests keep theirs), restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
