"""Where and how the networks compute: the device, the inference precision (bf16 only where it measures faster),
and torch's CPU threads."""

from __future__ import annotations

import contextlib
import functools
import logging
import time

import torch

logger = logging.getLogger(__name__)


def torch_device(name: str) -> str:
    """'auto' -> cuda when present, else cpu; 'cuda' on a machine without one is an error, not a silent fallback."""
    if name in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--conf device {name}: no CUDA device is available")
    return name


PRECISIONS = ("auto", "fp32", "bf16")
# What runs the image encoders on a CPU (``--conf engine``; lib.engines), and how OpenVINO's encoder of the SAM models
# may be quantised (``--conf quantize``).
ENGINES = ("auto", "torch", "openvino")
QUANTIZATIONS = ("none", "int8")


# An 'auto' choice takes the less exact or less simple option (bf16 over fp32, OpenVINO over torch, OpenVINO bf16 over
# its fp32) only when it takes less than this share of the other's time.
MIN_GAIN = 0.9


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
    faster = bf16 < MIN_GAIN * fp32
    logger.info(
        f"precision auto: a ViT-B linear layer takes {fp32 * 1e3:.1f} ms in fp32 and {bf16 * 1e3:.1f} ms in bf16 on "
        f"this CPU, so 'auto' resolves to {'bf16' if faster else 'fp32'}"
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


def resolve_precision(name: str, device: str, key: str = "precision") -> str:
    """'auto' -> bf16 where the device runs it faster than fp32, else fp32; an unknown name is an error naming the
    ``--conf`` key it came from (``precision`` for inference, ``train_precision`` for training)."""
    if name not in PRECISIONS:
        raise ValueError(f"--conf {key} {name!r}: valid values are {', '.join(PRECISIONS)}")
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
