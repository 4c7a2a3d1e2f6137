"""What the infer tasks, the trainer and scoring share about one served model (HF-SAM, MASG-SAM or FGNet).

``ServedModel`` is a handle, not a network: it names the model, its label set (none for FGNet's instances),
backbone and adapter file, and builds the network. The network is built once
per device and kept resident; when the published adapter changes (a training run finished, possibly in
another process) its tensors are swapped into the resident network, without rebuilding it.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from lib.adapters import check_adapter_config, check_adapter_tensors, load_adapter_state, read_adapter
from lib.networks.lora import adapter_spec
from lib.networks.sam_backbone import get_encoder_spec
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


@dataclass
class ServedModel(ProcessLocal):
    """One served model (segmentation or instances): ``build_network()`` gives its network with LoRA and frozen base weights.

    Attributes:
        name: the model's name in MONAI Label; also names its adapter's config and its training files.
        labels: {label name: id} with ids 1..N (``parse_labels``); background 0 is not listed. {} for FGNet's instances.
        backbone: the encoder variant: SAM's ``vit_b``/``vit_l``/``vit_h``/``tiny``, or FGNet's SAM2 ``hiera_*``/``tiny``.
        adapter_path: the published adapter file; absent until a training run publishes one (base weights are served).
        build_network: builds a fresh network (LoRA added, no adapter loaded): each device's resident one, training's.
        modality: ``auto`` or a DICOM modality code: picks the intensity normalisation, and words MASG-SAM's class prompts.
        lora_rank: LoRA rank of the network and its adapter (FGNet: SAM2's, 0 keeps the encoder frozen).
        options: model-specific settings an adapter must agree with to be loaded (``adapter_config``).
        notes: what the model runs without, and why (shown in ``/info/``).
    """

    name: str
    labels: dict[str, int]
    backbone: str
    adapter_path: str
    build_network: Callable[[], nn.Module]
    modality: str = "auto"
    lora_rank: int = 4
    options: dict[str, Any] = field(default_factory=dict)  # model-specific settings an adapter must agree with
    notes: list[str] = field(default_factory=list)
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
    def pretrained(self) -> bool:
        """Whether the base weights are pretrained (every backbone but ``tiny``, random by design)."""
        return self.backbone != "tiny"

    @property
    def img_size(self) -> int:
        return get_encoder_spec(self.backbone).img_size

    @property
    def intensity(self) -> dict[str, Any]:
        """Options of the intensity normalisation that the backbone was pretrained with (``NormalizeIntensityByModalityd``)."""
        spec = get_encoder_spec(self.backbone)
        return {"ct_window": spec.ct_window, "nonzero_percentiles": spec.nonzero_percentiles}

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
