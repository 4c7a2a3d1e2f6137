"""CPU inference of the models' image encoders through OpenVINO.

The image encoder (SAM's ViT with its taps, FGNet's SAM2 Hiera) is nearly all of a slice's work and depends only on
the image and the weights. On a CPU, OpenVINO's compiled graph runs it several times faster than eager torch
(docs/benchmarks.md); prompts, decoders and training stay in torch, and CUDA keeps torch throughout.

``EncoderEngine`` keeps one model's compiled encoder for the adapter its resident network serves. A newly served
adapter is converted in a background thread while torch keeps answering; the engine is used only once its graph
was built from exactly that adapter, so no request is served by a stale one. Converted graphs are cached on disk
under a digest of what they compute (weights with the adapter merged, network source, input shape, OpenVINO
version): a restart reads them back instead of converting, and older entries of the model are removed.

Graphs take one slice (or section) per call, batch dimension fixed at 1: the encoders' code may read the batch size
as a Python number (TinyViT's ``len(x)``), which tracing freezes, and one stream on a few cores gains nothing from
larger batches. ``CompiledEncoder`` runs a batch slice by slice.

``engine auto`` is decided by ``EngineChoice``: the model's whole encoder, timed in turns on this host, cached per
host and library versions (a restart and a new adapter keep the decision).

``quantize int8`` (the SAM models) quantises the converted graph with NNCF's post-training quantisation, its
activation ranges calibrated on slices of the volume the request that started the build brought (the series being
annotated); operations it leaves unquantised run in bf16 where the CPU has it natively. The quantised graph is cached like the
others, under its own name: a restart reuses the ranges of the volume that calibrated it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from monai.utils import look_up_option
from torch import nn

from lib.compute import ENGINES, MIN_GAIN, QUANTIZATIONS, autocast, torch_threads
from lib.files import atomic_write
from lib.networks.lora import merge_lora

MISSING = ""  # why OpenVINO cannot be imported here, if it cannot
try:
    import nncf
    import openvino as ov
except ImportError as e:  # a CUDA-only install (scripts/gpu_wheels.sh leaves them behind): torch serves throughout
    nncf = ov = None
    MISSING = f"{type(e).__name__}: {e}"

logger = logging.getLogger(__name__)

# --conf precision -> OpenVINO's INFERENCE_PRECISION_HINT
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
# Slices of the request's volume that calibrate an int8 graph's activation ranges.
CALIBRATION_SLICES = 16
_NOT_CLAIMED = object()


@functools.cache
def core() -> ov.Core:
    return ov.Core()


def native_bf16() -> bool:
    """Whether OpenVINO runs bf16 natively on this CPU (AVX512-BF16 or AMX); elsewhere a bf16 hint runs f32."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_for_cpu(model: ov.Model, precision: str, threads: int) -> ov.CompiledModel:
    """One stream with ``threads`` threads: requests run one at a time (the server's default) on the cores torch
    would use, so the two never oversubscribe them. ``int8``: a quantised graph, whose unquantised operations run
    in bf16 where the CPU has it natively."""
    hint = OPENVINO_PRECISIONS.get(precision) or ("bf16" if native_bf16() else "f32")
    config = {
        "INFERENCE_PRECISION_HINT": hint,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": threads,
    }
    return core().compile_model(model, "CPU", config)


def convert(graph: nn.Module, input_shape: tuple[int, ...]) -> ov.Model:
    """Trace ``graph`` (one input of one slice, shape ``(1, *input_shape)``) into an OpenVINO model."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape arithmetic: every shape is fixed
        return ov.convert_model(graph, example_input=torch.zeros(1, *input_shape), input=[ov.PartialShape([1, *input_shape])])


def quantize_int8(model: ov.Model, calibration: torch.Tensor) -> ov.Model:
    """``model`` with int8 weights and activations (NNCF's post-training quantisation, the preset for transformers:
    SmoothQuant, attention products kept), its activation ranges taken on ``calibration`` (N, *input_shape)."""
    items = [item[None].numpy().astype(np.float32) for item in calibration.detach().float().cpu()]
    return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER)


def calibration_slices(volume: torch.Tensor, count: int = CALIBRATION_SLICES) -> torch.Tensor:
    """``count`` slices (count, C, H, W) spread evenly through ``volume`` (C, H, W, D), ends included."""
    depth = volume.shape[-1]
    index = torch.linspace(0, depth - 1, min(count, depth)).round().long()
    return volume[..., index].permute(3, 0, 1, 2)


class CompiledEncoder:
    """A compiled image encoder, called like the torch one: a CPU tensor batch in, ``unflatten(outputs)`` out (fp32)."""

    def __init__(self, compiled: ov.CompiledModel, unflatten: Callable[[tuple[torch.Tensor, ...]], Any], label: str):
        self.compiled = compiled
        self.unflatten = unflatten
        self.label = label

    def __call__(self, image: torch.Tensor):
        request = self.compiled.create_infer_request()  # one per call: requests may come from several threads
        count = len(self.compiled.outputs)
        per_slice = []
        for item in image.detach().float().cpu().contiguous():
            request.infer([item[None].numpy()])
            per_slice.append([torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(count)])
        return self.unflatten(tuple(torch.cat(outputs) for outputs in zip(*per_slice)))


def graph_digest(graph: nn.Module, input_shape: tuple[int, ...], values: bool = True) -> str:
    """What a converted graph computes: its tensors (their names and shapes only when not ``values``: what its speed
    depends on), the source of its modules' classes, its input shape and the OpenVINO version."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([ov.get_version(), [1, *input_shape]]).encode())
    sources = sorted({inspect.getsourcefile(type(m)) or "" for m in graph.modules()})
    for path in sources:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(f.read())
    for name, tensor in graph.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if values:
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def host_key(graph: nn.Module, input_shape: tuple[int, ...], threads: int, candidates: list[str]) -> dict[str, Any]:
    """What an engine choice depends on: the CPU, threads, library versions, the encoder's structure, the candidates."""
    return {
        "cpu": core().get_property("CPU", "FULL_DEVICE_NAME"),
        "capabilities": sorted(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        "threads": threads,
        "torch": torch.__version__,
        "openvino": ov.get_version(),
        "encoder": graph_digest(graph, input_shape, values=False),
        "candidates": candidates,
    }


@dataclass(frozen=True)
class EngineChoice:
    """What ``engine auto`` (or a precision ``auto``) chose on this host, and the figures it chose from.

    Every candidate runs the whole encoder on ``batch`` random slices per call, in turns (so a neighbour's load falls
    on all of them alike), ``repeats`` rounds after one warm-up round; the medians give seconds per slice. OpenVINO
    bf16 must beat its fp32, and OpenVINO torch, by the margin ``MIN_GAIN``; a pair closer than that is a tie, run again
    on ``tie_slices`` slices (a stretch of a volume) and won by the faster, as on a full volume.

    Attributes:
        engine: the winner: ``torch-<precision>`` or ``openvino-<precision>``.
        seconds_per_slice: median seconds per slice of every candidate.
        tie: the pair the longer run settled, with its seconds per slice; empty when no tie.
        source: ``measured`` now, or ``cached`` (read back from an earlier measurement on this host).
        key: what the choice holds for (``host_key``).
    """

    engine: str
    seconds_per_slice: dict[str, float]
    tie: dict[str, float]
    source: str
    key: dict[str, Any]

    @classmethod
    def read(cls, path: str, key: dict[str, Any]) -> EngineChoice | None:
        """The choice stored at ``path`` when it was made for ``key``, else None."""
        try:
            with open(path) as f:
                stored = json.load(f)
            return cls(**{**stored, "source": "cached"}) if stored.get("key") == key else None
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: str) -> None:
        with atomic_write(path) as f:
            json.dump(asdict(self), f, indent=1)

    @classmethod
    def measure(
        cls,
        runners: dict[str, Callable[[torch.Tensor], Any]],
        image: torch.Tensor,
        key: dict[str, Any],
        repeats: int = 5,
        tie_slices: int = 16,
    ) -> EngineChoice:
        """Time ``runners`` (label -> encoder; labels ``torch-*`` and ``openvino-*``) on ``image`` (B, ...) and choose."""
        seconds = {label: s / len(image) for label, s in _seconds_in_turns(runners, image, repeats).items()}
        tie: dict[str, float] = {}

        def better(a: str, b: str) -> str:
            """``a`` unless ``b`` beats it by the margin; a tie goes to the faster on ``tie_slices`` slices."""
            if seconds[b] < MIN_GAIN * seconds[a]:
                return b
            if seconds[a] < MIN_GAIN * seconds[b]:
                return a
            stretch = image[torch.arange(tie_slices) % len(image)]
            longer = {label: s / tie_slices for label, s in _seconds_in_turns({k: runners[k] for k in (a, b)}, stretch, 1).items()}
            tie.update(longer)
            return min(longer, key=longer.get)

        openvino = [label for label in runners if label.startswith("openvino")]
        best = functools.reduce(better, openvino)
        torch_label = next((label for label in runners if label.startswith("torch")), None)
        engine = better(torch_label, best) if torch_label else best
        return cls(engine=engine, seconds_per_slice=seconds, tie=tie, source="measured", key=key)


def _seconds_in_turns(runners: dict[str, Callable[[torch.Tensor], Any]], image: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of each runner on ``image`` over ``repeats`` rounds, the order rotated every round, after one
    warm-up round."""
    labels = list(runners)
    times: dict[str, list[float]] = {label: [] for label in labels}
    with torch.no_grad():
        for round_ in range(repeats + 1):
            for label in labels[round_ % len(labels) :] + labels[: round_ % len(labels)]:
                start = time.perf_counter()
                runners[label](image)
                if round_:
                    times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


class EncoderEngine:
    """One model's image encoder compiled by OpenVINO, for the adapter the resident network serves.

    ``encoder(stamp)`` gives the compiled encoder only when it was built with adapter ``stamp`` (the adapter file's
    identity, ``ServedModel.loaded_stamp``); otherwise the caller runs torch. ``claim(stamp)`` tells whether a
    build for ``stamp`` is yet to start, ``prepare(stamp, graph)`` starts it in the background from ``graph``, a copy
    of the network's ``image_encoding()`` taken with that adapter loaded. A failed build leaves torch serving, its
    reason logged and kept in ``failure``. The first build makes the engine's choice (``EngineChoice``) when there
    is one to make; a choice of torch leaves torch serving every adapter.

    Args:
        name: the model's name; its cache entries are ``<cache_dir>/<name>-<digest>.xml/.bin/.json``, its choice
            ``<cache_dir>/choice-<name>.json``.
        cache_dir: where converted graphs are kept (the model folder's ``engines``).
        precision: OpenVINO's inference precision: ``fp32``, ``bf16``, or ``auto`` (bf16 where the CPU has it
            natively and it measures faster than fp32).
        quantize: ``none``, or ``int8``: the graph is quantised (``quantize_int8``) and OpenVINO runs only that one;
            a build then needs calibration slices (``prepare``).
        compare_torch: torch's precision for ``engine auto``: OpenVINO then serves only where it measures faster
            than torch at that precision; None: OpenVINO serves.
        threads: CPU threads of a request; default torch's.
        batch: slices per call while measuring (the server's CPU batch).
    """

    def __init__(
        self,
        name: str,
        cache_dir: str,
        precision: str,
        compare_torch: str | None = None,
        threads: int | None = None,
        batch: int = 2,
        quantize: str = "none",
    ):
        if precision not in (*OPENVINO_PRECISIONS, "auto"):
            raise ValueError(f"OpenVINO precision {precision!r}: valid values are {', '.join(OPENVINO_PRECISIONS)}, auto")
        self.name = name
        self.cache_dir = cache_dir
        self.precision = precision
        self.quantize = look_up_option(quantize, QUANTIZATIONS)
        self.compare_torch = compare_torch
        self.threads = threads or torch.get_num_threads()
        self.batch = batch
        self.choice: EngineChoice | None = None
        fixed = "int8" if self.quantize == "int8" else precision
        self.label = "auto" if compare_torch or fixed == "auto" else f"openvino-{fixed}"
        self.failure: str | None = None
        self.conversions = 0  # graphs converted by this process (the others were read from the disk cache)
        self.last_build_s: float | None = None  # seconds of the last finished build: conversion or read, and compilation
        self._lock = threading.Lock()
        self._ready: tuple[Hashable, CompiledEncoder] | None = None
        self._claimed: Any = _NOT_CLAIMED
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-openvino")

    def encoder(self, stamp: Hashable) -> CompiledEncoder | None:
        with self._lock:
            return self._ready[1] if self._ready is not None and self._ready[0] == stamp else None

    def claim(self, stamp: Hashable) -> bool:
        """True once per newly served adapter: the caller then owes ``prepare(stamp, graph)``."""
        with self._lock:
            if self._claimed == stamp:
                return False
            self._claimed = stamp
            return True

    def prepare(self, stamp: Hashable, graph: nn.Module, calibration: torch.Tensor | None = None) -> Future:
        """Build for ``stamp`` from ``graph`` in the background; ``calibration`` (N, *input_shape): model inputs that
        calibrate an int8 graph (``needs_calibration``), unused otherwise."""
        return self._worker.submit(self._build, stamp, graph, calibration)

    @property
    def needs_calibration(self) -> bool:
        return self.quantize == "int8"

    def wait(self, timeout: float | None = None) -> None:
        """Block until the builds started so far have finished (benchmarks, tests)."""
        self._worker.submit(lambda: None).result(timeout)

    def status(self) -> dict[str, Any]:
        with self._lock:
            status = {"engine": self.label, "ready": self._ready is not None, "failure": self.failure}
            if self.choice is not None and self.choice.source != "given":
                status["choice"] = {k: v for k, v in asdict(self.choice).items() if k != "key"}
            return status

    def _build(self, stamp: Hashable, graph: nn.Module, calibration: torch.Tensor | None) -> CompiledEncoder | None:
        with self._lock:
            if self._claimed != stamp:
                return None  # a newer adapter was served before this build started
        start = time.perf_counter()
        try:
            graph = merge_lora(graph).eval()
            input_shape = tuple(graph.input_shape)
            choice = self._choose(graph, input_shape, calibration)
            if not choice.engine.startswith("openvino"):
                return None
            xml, converted = self._converted(graph, input_shape, calibration)
            precision = choice.engine.split("-", 1)[1]
            compiled = CompiledEncoder(compile_for_cpu(core().read_model(xml), precision, self.threads), graph.unflatten, choice.engine)
        except Exception as e:  # any failure of a conversion leaves the model on torch
            logger.error(f"{self.name}: OpenVINO could not build the image encoder, torch keeps serving: {type(e).__name__}: {e}")
            with self._lock:
                self.failure = f"{type(e).__name__}: {e}"
            return None
        with self._lock:
            if self._claimed != stamp:
                return None
            self._ready, self.failure = (stamp, compiled), None
        self._remove_stale(keep=xml)
        self.last_build_s = time.perf_counter() - start
        how = "converted" if converted else "read from the cache"
        logger.info(f"{self.name}: image encoder on OpenVINO {precision} ({how} in {self.last_build_s:.1f} s)")
        return compiled

    def _converted(self, graph: nn.Module, input_shape: tuple[int, ...], calibration: torch.Tensor | None) -> tuple[str, bool]:
        """The cache entry of ``graph`` (its .xml), converted (and quantised) now (True) or found."""
        suffix = "-int8" if self.quantize == "int8" else ""
        xml = os.path.join(self.cache_dir, f"{self.name}-{graph_digest(graph, input_shape)}{suffix}.xml")
        if os.path.isfile(xml):
            return xml, False
        model = convert(graph, input_shape)
        if self.quantize == "int8":
            if calibration is None:
                raise ValueError("an int8 graph needs calibration slices, and none came with this build")
            model = quantize_int8(model, calibration)
        self._save(model, xml, input_shape)
        self.conversions += 1
        return xml, True

    def _choose(self, graph: nn.Module, input_shape: tuple[int, ...], calibration: torch.Tensor | None) -> EngineChoice:
        """The engine's choice, made once: given by the configuration, read back for this host, or measured."""
        if self.choice is not None:
            return self.choice
        if self.quantize == "int8":
            precisions = ["int8"]
        else:
            precisions = [self.precision] if self.precision != "auto" else ["fp32", "bf16"] if native_bf16() else ["fp32"]
        labels = [f"torch-{self.compare_torch}"] * bool(self.compare_torch) + [f"openvino-{p}" for p in precisions]
        if len(labels) == 1:
            choice = EngineChoice(engine=labels[0], seconds_per_slice={}, tie={}, source="given", key={})
        else:
            key = host_key(graph, input_shape, self.threads, labels)
            path = os.path.join(self.cache_dir, f"choice-{self.name}.json")
            choice = EngineChoice.read(path, key)
            if choice is None:
                model = core().read_model(self._converted(graph, input_shape, calibration)[0])
                runners = {label: self._runner(label, graph, model) for label in labels}
                image = torch.rand(self.batch, *input_shape, generator=torch.Generator().manual_seed(0))
                choice = EngineChoice.measure(runners, image, key)
                choice.write(path)
            figures = ", ".join(f"{label} {s:.3f}" for label, s in choice.seconds_per_slice.items())
            logger.info(f"{self.name}: the image encoder runs on {choice.engine} ({choice.source}; s per slice: {figures})")
        with self._lock:
            self.choice, self.label = choice, choice.engine
        return choice

    def _runner(self, label: str, graph: nn.Module, model: ov.Model) -> Callable[[torch.Tensor], Any]:
        engine, precision = label.split("-", 1)
        if engine == "openvino":
            return CompiledEncoder(compile_for_cpu(model, precision, self.threads), graph.unflatten, label)

        def run(image: torch.Tensor):
            with torch_threads(self.threads), autocast(precision, "cpu"):
                return graph(image)

        return run

    def _save(self, model: ov.Model, xml: str, input_shape: tuple[int, ...]) -> None:
        """Written under temporary names and renamed, the .xml last, so a reader never sees half an entry."""
        os.makedirs(self.cache_dir, exist_ok=True)
        stem = xml[: -len(".xml")]
        tmp = f"{stem}.{os.getpid()}.{threading.get_ident()}.tmp"
        ov.save_model(model, tmp + ".xml", compress_to_fp16=False)
        with open(tmp + ".json", "w") as f:
            json.dump({"model": self.name, "input_shape": [1, *input_shape], "openvino": ov.get_version()}, f)
        os.replace(tmp + ".bin", stem + ".bin")
        os.replace(tmp + ".json", stem + ".json")
        os.replace(tmp + ".xml", xml)

    def _remove_stale(self, keep: str) -> None:
        """Every other entry of this model: built for adapters no longer served."""
        stem = os.path.basename(keep)[: -len(".xml")]
        for entry in os.listdir(self.cache_dir):
            if entry.startswith(f"{self.name}-") and not entry.startswith(stem + ".") and ".tmp" not in entry:
                try:
                    os.remove(os.path.join(self.cache_dir, entry))
                except FileNotFoundError:
                    pass


def engine_from_conf(
    name: str, model_dir: str, conf: dict[str, str], device: str, torch_precision: str, quantize: str = "none"
) -> EncoderEngine | None:
    """Model ``name``'s engine from ``--conf engine`` / ``precision`` (None: torch), cached under ``model_dir``;
    ``quantize`` (``--conf quantize`` for the models that take it) as ``EncoderEngine``'s.

    ``auto``: on a CPU, an engine that chooses between torch at ``torch_precision`` and OpenVINO (``EngineChoice``);
    torch on CUDA. ``openvino`` on CUDA is an error: CUDA keeps the torch path; so is a quantisation that no
    OpenVINO graph would carry out."""
    engine = conf["engine"]
    if engine not in ENGINES:
        raise ValueError(f"--conf engine {engine!r}: valid values are {', '.join(ENGINES)}")
    if quantize != "none" and (engine == "torch" or device != "cpu"):
        raise ValueError(
            f"--conf quantize {quantize} quantises the image encoder OpenVINO runs on the CPU; with --conf engine {engine} "
            f"and device {device} nothing would be quantised: use engine auto or openvino on the CPU, or quantize none"
        )
    if engine == "torch" or (engine == "auto" and device != "cpu"):
        return None
    if device != "cpu":
        raise ValueError(f"--conf engine openvino runs on the CPU; with --conf device {device} use engine torch or auto")
    if ov is None:
        raise ValueError(f"--conf engine {engine} needs OpenVINO and NNCF ({MISSING}): install requirements.txt, or use engine torch")
    compare_torch = torch_precision if engine == "auto" else None
    return EncoderEngine(name, os.path.join(model_dir, "engines"), conf["precision"], compare_torch, quantize=quantize)
