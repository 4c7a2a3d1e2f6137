"""Simulated interactions on one slice, the way interactive segmentation is trained and evaluated (RITM, SAM,
DeepEdit): a first click in the object's interior or a jittered box, then clicks at the centre of the largest error
region of the current prediction (positive where the object was missed, negative where too much was taken), and a
previous mask, perturbed, as SAM's mask prompt (what propagation from the neighbouring slice gives).

Masks are (H, W) boolean arrays of one slice in model-input pixels; a point is (x = column, y = row, label) with
SAM's labels (1 foreground, 0 background).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

Point = tuple[float, float, int]


def centre(region: np.ndarray) -> tuple[int, int]:
    """The pixel of ``region`` farthest from its border (the image edge counts as border): (x, y)."""
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(col), int(row)


def interior_click(mask: np.ndarray, rng: np.random.Generator) -> Point:
    """A first click: a random pixel of ``mask`` at least half as deep inside as its deepest pixel."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(distance >= 0.5 * distance.max())
    i = int(rng.integers(len(rows)))
    return int(cols[i]), int(rows[i]), 1


def error_click(prediction: np.ndarray, target: np.ndarray) -> Point | None:
    """The next click: at the centre of the largest connected error region, positive where ``target`` was missed,
    negative where ``prediction`` took too much; None when there is no error."""
    best: tuple[int, np.ndarray, int] | None = None
    for error, label in ((target & ~prediction, 1), (prediction & ~target, 0)):
        regions, count = ndimage.label(error)
        if count:
            sizes = np.bincount(regions.ravel())[1:]
            largest = int(np.argmax(sizes)) + 1
            if best is None or sizes[largest - 1] > best[0]:
                best = (int(sizes[largest - 1]), regions == largest, label)
    if best is None:
        return None
    x, y = centre(best[1])
    return x, y, best[2]


def box_of(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) of the pixels of ``mask``; None when it is empty."""
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    return float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())


def jittered_box(mask: np.ndarray, rng: np.random.Generator, jitter: float = 0.1) -> tuple[float, float, float, float]:
    """The box of ``mask`` with each side moved by up to ``jitter`` of the box's size (an annotator's box)."""
    x0, y0, x1, y1 = box_of(mask)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    dx0, dx1 = rng.uniform(-jitter, jitter, 2) * w
    dy0, dy1 = rng.uniform(-jitter, jitter, 2) * h
    height, width = mask.shape
    x0, x1 = np.clip([x0 + dx0, x1 + dx1], 0, width - 1)
    y0, y1 = np.clip([y0 + dy0, y1 + dy1], 0, height - 1)
    return float(min(x0, x1)), float(min(y0, y1)), float(max(x0, x1)), float(max(y0, y1))


def perturbed_mask(mask: torch.Tensor, rng: np.random.Generator, max_radius: int = 3, max_shift: int = 3) -> torch.Tensor:
    """``mask`` (H, W) grown or shrunk by up to ``max_radius`` pixels and shifted by up to ``max_shift``: what the
    neighbouring slice's mask looks like on this one."""
    m = mask.float()[None, None]
    radius = int(rng.integers(-max_radius, max_radius + 1))
    if radius:
        k = 2 * abs(radius) + 1
        m = F.max_pool2d(m, k, 1, abs(radius)) if radius > 0 else -F.max_pool2d(-m, k, 1, abs(radius))
    dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, 2))
    return torch.roll(m, shifts=(dy, dx), dims=(2, 3))[0, 0] > 0.5


def mask_logits(mask: torch.Tensor, size: tuple[int, int], scale: float = 8.0) -> torch.Tensor:
    """A (H, W) mask as SAM mask-prompt logits (1, h, w) at the decoder's resolution ``size``: +``scale`` inside,
    -``scale`` outside, the order of SAM's own output logits."""
    low = F.interpolate(mask.float()[None, None], size=size, mode="area")[0]
    return (2 * low - 1) * scale


def paint_clicks(logits: torch.Tensor, points: list[Point], size: int, radius: int = 1, scale: float = 8.0) -> torch.Tensor:
    """Mask-prompt logits (1, g, g) with each click drawn in: a disk of ``radius`` cells set to +``scale``
    (foreground) or -``scale`` (background) around it; ``size`` is the model input's, in which clicks are given.

    SAM's prompt decoder learns to follow its mask prompt (propagation hands on the previous slice's mask through
    it), so a click drawn into the mask acts at once where it was placed; the point tokens carry it further."""
    painted = logits.clone()
    height, width = logits.shape[-2:]
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for x, y, label in points:
        cx, cy = (x + 0.5) * width / size - 0.5, (y + 0.5) * height / size - 0.5
        disk = ((rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2).to(painted.device)
        painted[0][disk] = scale if label == 1 else -scale
    return painted
