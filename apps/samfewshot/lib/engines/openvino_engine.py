"""CPU inference of the models' image encoders through OpenVINO.

The image encoder (SAM's ViT with its taps, FGNet's SAM2 Hiera) is nearly all of a slice's work and depends only on
the image and the weights. On a CPU, OpenVINO's compiled graph runs it several times faster than eager torch
(docs/benchmarks.md); prompts, decoders and training stay in torch, and CUDA keeps torch throughout.

``EncoderEngine`` keeps one model's compiled encoder for the adapter its resident network serves. A newly served
adapter is converted in a background thread while torch keeps answering; the engine is used only once its graph
was built from exactly that adapter, so no request is served by a stale one. Converted graphs are cached on disk
under a digest of what they compute (weights with the adapter merged, network source, input shape, precision,
OpenVINO version): a restart reads them back instead of converting, and older entries of the model are removed.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import openvino as ov
import torch
from torch import nn

from lib.networks.lora import merge_lora

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "openvino")
# --conf precision -> OpenVINO's INFERENCE_PRECISION_HINT
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
# 'auto' picks OpenVINO (and, within it, bf16) only when it takes less than this share of the other's time.
MIN_GAIN = 0.9
_NOT_CLAIMED = object()


@functools.cache
def core() -> ov.Core:
    return ov.Core()


def native_bf16() -> bool:
    """Whether OpenVINO runs bf16 natively on this CPU (AVX512-BF16 or AMX); elsewhere a bf16 hint runs f32."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_for_cpu(model: ov.Model, precision: str, threads: int) -> ov.CompiledModel:
    """One stream with ``threads`` threads: requests run one at a time (the server's default) on the cores torch
    would use, so the two never oversubscribe them."""
    config = {
        "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": threads,
    }
    return core().compile_model(model, "CPU", config)


def convert(graph: nn.Module, input_shape: tuple[int, ...]) -> ov.Model:
    """Trace ``graph`` (one input, batch dimension dynamic) into an OpenVINO model."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape arithmetic: shapes other than the batch are fixed
        return ov.convert_model(graph, example_input=torch.zeros(1, *input_shape), input=[ov.PartialShape([-1, *input_shape])])


class CompiledEncoder:
    """A compiled image encoder, called like the torch one: a CPU tensor batch in, ``unflatten(outputs)`` out (fp32)."""

    def __init__(self, compiled: ov.CompiledModel, unflatten: Callable[[tuple[torch.Tensor, ...]], Any], label: str):
        self.compiled = compiled
        self.unflatten = unflatten
        self.label = label

    def __call__(self, image: torch.Tensor):
        request = self.compiled.create_infer_request()  # one per call: requests may come from several threads
        request.infer([image.detach().float().cpu().contiguous().numpy()])
        count = len(self.compiled.outputs)
        return self.unflatten(tuple(torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(count)))


def graph_digest(graph: nn.Module, input_shape: tuple[int, ...], precision: str) -> str:
    """What a converted graph computes: its tensors, the source of its modules' classes, its input shape, the
    precision and the OpenVINO version."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([ov.get_version(), precision, list(input_shape)]).encode())
    sources = sorted({inspect.getsourcefile(type(m)) or "" for m in graph.modules()})
    for path in sources:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(f.read())
    for name, tensor in graph.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EncoderEngine:
    """One model's image encoder compiled by OpenVINO, for the adapter the resident network serves.

    ``encoder(stamp)`` gives the compiled encoder only when it was built with adapter ``stamp`` (the adapter file's
    identity, ``ServedModel.loaded_stamp``); otherwise the caller runs torch. ``claim(stamp)`` tells whether a
    build for ``stamp`` is yet to start, ``prepare(stamp, graph)`` starts it in the background from ``graph``, a copy
    of the network's ``image_encoding()`` taken with that adapter loaded. A failed build leaves torch serving, its
    reason logged and kept in ``failure``.

    Args:
        name: the model's name; its cache entries are ``<cache_dir>/<name>-<digest>.xml/.bin/.json``.
        cache_dir: where converted graphs are kept (the model folder's ``engines``).
        precision: ``fp32`` or ``bf16`` (OpenVINO's inference precision hint).
        threads: CPU threads of a request; default torch's.
    """

    def __init__(self, name: str, cache_dir: str, precision: str, threads: int | None = None):
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"OpenVINO precision {precision!r}: valid values are {', '.join(OPENVINO_PRECISIONS)}")
        self.name = name
        self.cache_dir = cache_dir
        self.precision = precision
        self.threads = threads or torch.get_num_threads()
        self.label = f"openvino-{precision}"
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

    def prepare(self, stamp: Hashable, graph: nn.Module) -> Future:
        return self._worker.submit(self._build, stamp, graph)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the builds started so far have finished (benchmarks, tests)."""
        self._worker.submit(lambda: None).result(timeout)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"engine": self.label, "ready": self._ready is not None, "failure": self.failure}

    def _build(self, stamp: Hashable, graph: nn.Module) -> CompiledEncoder | None:
        with self._lock:
            if self._claimed != stamp:
                return None  # a newer adapter was served before this build started
        start = time.perf_counter()
        try:
            graph = merge_lora(graph).eval()
            input_shape = tuple(graph.input_shape)
            digest = graph_digest(graph, input_shape, self.precision)
            xml = os.path.join(self.cache_dir, f"{self.name}-{digest}.xml")
            converted = not os.path.isfile(xml)
            if converted:
                self._save(convert(graph, input_shape), xml, input_shape)
                self.conversions += 1
            compiled = CompiledEncoder(compile_for_cpu(core().read_model(xml), self.precision, self.threads), graph.unflatten, self.label)
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
        logger.info(f"{self.name}: image encoder on OpenVINO {self.precision} ({how} in {self.last_build_s:.1f} s)")
        return compiled

    def _save(self, model: ov.Model, xml: str, input_shape: tuple[int, ...]) -> None:
        """Written under temporary names and renamed, the .xml last, so a reader never sees half an entry."""
        os.makedirs(self.cache_dir, exist_ok=True)
        stem = xml[: -len(".xml")]
        tmp = f"{stem}.{os.getpid()}.{threading.get_ident()}.tmp"
        ov.save_model(model, tmp + ".xml", compress_to_fp16=False)
        with open(tmp + ".json", "w") as f:
            json.dump({"model": self.name, "input_shape": list(input_shape), "precision": self.precision, "openvino": ov.get_version()}, f)
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


# ---- the choice of engine and precision at start-up ---------------------------------------------------------------
def resolve_engine(name: str, device: str, torch_precision: str, precision: str) -> tuple[str, str | None]:
    """``--conf engine`` and ``--conf precision`` -> ("torch", None) or ("openvino", its precision).

    ``auto``: OpenVINO on a CPU when it runs a ViT-B block faster than torch at ``torch_precision`` (measured, as
    every CPU differs), torch on CUDA. ``openvino`` on CUDA is an error: CUDA keeps the torch path."""
    if name not in ENGINES:
        raise ValueError(f"--conf engine {name!r}: valid values are {', '.join(ENGINES)}")
    if name == "torch" or (name == "auto" and device != "cpu"):
        return "torch", None
    if device != "cpu":
        raise ValueError(f"--conf engine openvino runs on the CPU; with --conf device {device} use engine torch or auto")
    ov_precision = openvino_precision(precision)
    if name == "auto":
        torch_s, ov_s = block_seconds_torch(torch_precision), block_seconds_openvino(ov_precision)
        faster = ov_s < MIN_GAIN * torch_s
        logger.info(
            f"engine auto: a ViT-B block takes {torch_s * 1e3:.0f} ms in torch ({torch_precision}) and {ov_s * 1e3:.0f} ms "
            f"in OpenVINO ({ov_precision}) on this CPU, so the image encoders run in {'OpenVINO' if faster else 'torch'}"
        )
        if not faster:
            return "torch", None
    return "openvino", ov_precision


def openvino_precision(precision: str) -> str:
    """``fp32``/``bf16`` as given; ``auto``: bf16 where the CPU has it natively and it measures faster."""
    if precision != "auto":
        return precision
    if not native_bf16():
        return "fp32"
    return "bf16" if block_seconds_openvino("bf16") < MIN_GAIN * block_seconds_openvino("fp32") else "fp32"


def _block() -> tuple[nn.Module, torch.Tensor]:
    """A windowed-attention block of SAM's ViT-B on one 512 x 512 slice's tokens, random weights."""
    from segment_anything.modeling.image_encoder import Block

    generator = torch.Generator().manual_seed(0)
    block = Block(dim=768, num_heads=12, use_rel_pos=True, window_size=14, input_size=(32, 32)).eval()
    return block, torch.randn(1, 32, 32, 768, generator=generator)


def _best_seconds(run: Callable[[], Any], repeats: int = 3) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


@functools.cache
def block_seconds_torch(precision: str) -> float:
    block, x = _block()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return _best_seconds(lambda: block(x))


@functools.cache
def block_seconds_openvino(precision: str) -> float:
    block, x = _block()
    compiled = compile_for_cpu(convert(block, tuple(x.shape[1:])), precision, torch.get_num_threads())
    request = compiled.create_infer_request()
    return _best_seconds(lambda: request.infer([x.numpy()]))


def engine_from_conf(name: str, model_dir: str, conf: dict[str, str], device: str, torch_precision: str) -> EncoderEngine | None:
    """Model ``name``'s engine from ``--conf engine`` / ``precision`` (None: torch), cached under ``model_dir``."""
    engine, precision = resolve_engine(conf["engine"], device, torch_precision, conf["precision"])
    if engine == "torch":
        return None
    return EncoderEngine(name, os.path.join(model_dir, "engines"), precision)
