"""Client prompts (voxel indices of the volume as stored) -> SAM prompts on the slices the model sees.

Clients send ``foreground``/``background`` points as [[i, j, k], ...] and an ``roi`` box as
[i0, i1, j0, j1, k0, k1], minimum and maximum along each axis, as 3D Slicer's MONAI Label module sends it
(``getROIPointsXYZ``). The model sees the volume after RAS orientation and in-plane resizing, so points go through
the stored affine into world coordinates and back through the affine of the transformed volume; a slice (S, S)
taken along the last axis has rows = axis 0 and columns = axis 1, and SAM wants (x = column, y = row).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from lib.networks.sam_segmenter import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, PADDING, Prompts

SlicePrompt = dict[str, Any]  # {"points": [(x, y, label)], "box": (x0, y0, x1, y1) or None}


def _to_model_index(image: MetaTensor, ijk: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices of the stored image -> (N, 3) indices in ``image`` (the transformed volume)."""
    original = np.asarray(image.meta["original_affine"], dtype=np.float64)
    current = np.asarray(image.affine, dtype=np.float64)
    homogeneous = np.c_[ijk.astype(np.float64), np.ones(len(ijk))]
    return (np.linalg.inv(current) @ original @ homogeneous.T).T[:, :3]


def stored_shape(image: MetaTensor) -> tuple[int, ...]:
    """The (X, Y, Z) of the volume as stored, which client indices refer to."""
    return tuple(int(n) for n in np.asarray(image.meta["spatial_shape"]).ravel()[:3])


def _points(request: dict[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    points = request.get(key) or []
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.zeros((0, 0))
    if len(points) and (array.ndim != 2 or array.shape[1] != 3 or not np.isfinite(array).all()):
        raise ValueError(f"'{key}' must be a list of [i, j, k] voxel indices, got {points}")
    array = array.reshape(-1, 3)
    outside = [p.tolist() for p in array if ((p < -0.5) | (p > np.asarray(shape) - 0.5)).any()]
    if outside:
        raise ValueError(f"'{key}' points {outside[:3]} lie outside the volume (voxel indices 0..{[n - 1 for n in shape]})")
    return array


def slice_prompts(image: MetaTensor, request: dict[str, Any]) -> dict[int, SlicePrompt]:
    """{slice index: {"points": [(x, y, label)], "box": (x0, y0, x1, y1) or None}} for the prompted slices of the
    transformed volume ``image`` (1, S, S, D); an ``roi`` puts its box on every slice of its range. Points outside
    the volume, or an roi that misses it, raise ValueError (the client placed them on something else)."""
    rows, cols, depth = image.shape[-3:]
    shape = stored_shape(image)
    prompted: dict[int, SlicePrompt] = defaultdict(lambda: {"points": [], "box": None})
    for key, label in (("foreground", 1), ("background", 0)):
        for row, col, z in _to_model_index(image, _points(request, key, shape)):
            k = int(np.clip(round(z), 0, depth - 1))
            prompted[k]["points"].append((float(np.clip(col, 0, cols - 1)), float(np.clip(row, 0, rows - 1)), label))
    roi: Sequence[float] | None = request.get("roi")
    if roi:
        if len(roi) != 6 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in roi):
            raise ValueError(f"'roi' must be [i0, i1, j0, j1, k0, k1] voxel indices, got {roi}")
        low = np.maximum(np.minimum(roi[0::2], roi[1::2]), 0)
        high = np.minimum(np.maximum(roi[0::2], roi[1::2]), np.asarray(shape) - 1)
        if (low > high).any():
            raise ValueError(f"'roi' {list(roi)} lies outside the volume (voxel indices 0..{[n - 1 for n in shape]})")
        corners = _to_model_index(image, np.array([low, high]))
        (r0, c0, z0), (r1, c1, z1) = corners.min(0), corners.max(0)
        r0, r1, c0, c1 = max(r0, 0.0), min(r1, rows - 1.0), max(c0, 0.0), min(c1, cols - 1.0)
        for k in range(max(0, int(np.floor(z0 + 0.5))), min(depth - 1, int(np.floor(z1 + 0.5))) + 1):
            prompted[k]["box"] = (c0, r0, c1, r1)
    return dict(prompted)


def batch_prompts(
    slices: Sequence[SlicePrompt],
    device: torch.device | str,
    masks: torch.Tensor | None = None,
    mask_valid: torch.Tensor | None = None,
) -> Prompts:
    """Prompts of several slices -> ``Prompts`` for a batch: points and box corners, padded to the longest; the mask
    prompts (B, 1, 4h, 4w), where given, pass through."""
    items = [
        [(x, y, label) for x, y, label in s["points"]]
        + ([(s["box"][0], s["box"][1], BOX_TOP_LEFT), (s["box"][2], s["box"][3], BOX_BOTTOM_RIGHT)] if s["box"] else [])
        for s in slices
    ]
    n = max(1, max(len(i) for i in items))
    points = torch.zeros(len(items), n, 2)
    labels = torch.full((len(items), n), PADDING, dtype=torch.long)
    for b, item in enumerate(items):
        for j, (x, y, label) in enumerate(item):
            points[b, j] = torch.tensor([x, y])
            labels[b, j] = label
    return Prompts(points=points.to(device), point_labels=labels.to(device), masks=masks, mask_valid=mask_valid)
