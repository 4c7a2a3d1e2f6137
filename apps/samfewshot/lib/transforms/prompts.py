"""Client prompts (voxel indices of the input volume) -> SAM prompts on the slices the model sees.

Clients send ``foreground``/``background`` points as [[i, j, k], ...] and an ``roi`` box as [i0, j0, i1, j1,
k0, k1] (MONAI Label's SAM convention), in voxel indices of the image as stored. The model sees the volume after
RAS orientation and in-plane resizing, so points go through the stored affine into world coordinates and back
through the affine of the transformed volume; a slice (S, S) taken along the last axis has rows = axis 0 and
columns = axis 1, and SAM wants (x = column, y = row).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from lib.networks.sam_segmenter import Prompts


def _to_model_index(image: MetaTensor, ijk: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices of the stored image -> (N, 3) indices in ``image`` (the transformed volume)."""
    original = np.asarray(image.meta["original_affine"], dtype=np.float64)
    current = np.asarray(image.affine, dtype=np.float64)
    homogeneous = np.c_[ijk.astype(np.float64), np.ones(len(ijk))]
    return (np.linalg.inv(current) @ original @ homogeneous.T).T[:, :3]


def _points(request: dict[str, Any], key: str) -> np.ndarray:
    points = request.get(key) or []
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.zeros((0, 0))
    if len(points) and (array.ndim != 2 or array.shape[1] != 3):
        raise ValueError(f"'{key}' must be a list of [i, j, k] voxel indices, got {points}")
    return array.reshape(-1, 3)


def slice_prompts(image: MetaTensor, request: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """{slice index: {"points": [(x, y, label)], "box": (x0, y0, x1, y1) or None}} for the prompted slices."""
    rows, cols, depth = image.shape[-3:]
    prompted: dict[int, dict[str, Any]] = defaultdict(lambda: {"points": [], "box": None})
    for key, label in (("foreground", 1), ("background", 0)):
        for row, col, z in _to_model_index(image, _points(request, key)):
            k = int(round(z))
            if 0 <= k < depth and 0 <= row <= rows - 1 and 0 <= col <= cols - 1:  # prompts outside are ignored
                prompted[k]["points"].append((col, row, label))
    roi: Sequence[float] | None = request.get("roi")
    if roi:
        if len(roi) != 6:
            raise ValueError(f"'roi' must be [i0, j0, i1, j1, k0, k1], got {roi}")
        corners = _to_model_index(image, np.array([[roi[0], roi[1], roi[4]], [roi[2], roi[3], roi[5]]]))
        (r0, c0, z0), (r1, c1, z1) = corners.min(0), corners.max(0)
        r0, r1 = max(r0, 0.0), min(r1, rows - 1.0)
        c0, c1 = max(c0, 0.0), min(c1, cols - 1.0)
        if r0 <= r1 and c0 <= c1:  # a box wholly outside the plane is ignored, one partly outside is clipped
            for k in range(max(0, int(np.floor(z0))), min(depth - 1, int(np.ceil(z1))) + 1):
                prompted[k]["box"] = (c0, r0, c1, r1)
    return dict(prompted)


def batch_prompts(prompts: dict[str, Any], device: torch.device | str):
    """One slice's prompts -> tensors for ``SamSegmenter.forward`` (batch of one)."""
    points = labels = boxes = None
    if prompts["points"]:
        coords = torch.tensor([[p[0], p[1]] for p in prompts["points"]], dtype=torch.float32, device=device)
        points, labels = coords[None], torch.tensor([[p[2] for p in prompts["points"]]], device=device)
    if prompts["box"] is not None:
        boxes = torch.tensor([prompts["box"]], dtype=torch.float32, device=device)
    return Prompts(points=points, point_labels=labels, boxes=boxes)
