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
from skimage.segmentation import flood

from lib.transforms.prompts import batch_prompts

Point = tuple[float, float, int]
# A click speaks for the connected stretch of similar intensity around it (``click_region``): intensities within
# CLICK_TOLERANCE of its own (slices are normalised to [0, 1]), at most CLICK_RADIUS_FRACTION of the slice away.
CLICK_TOLERANCE = 0.08
CLICK_RADIUS_FRACTION = 0.08


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


def click_region(image: np.ndarray, point: Point, radius: float, tolerance: float) -> np.ndarray:
    """The pixels a click speaks for on a slice (S, S) in [0, 1]: those connected to it through intensities within
    ``tolerance`` of its own (scikit-image's flood fill), within ``radius`` of it."""
    x, y, _ = point
    row, col = int(round(y)), int(round(x))
    rows, cols = np.ogrid[: image.shape[0], : image.shape[1]]
    near = (rows - row) ** 2 + (cols - col) ** 2 <= radius**2
    return flood(np.where(near, image, np.inf), (row, col), tolerance=tolerance) & near


def click_cells(
    points: list[Point],
    image: np.ndarray,
    grid: tuple[int, int],
    radius_fraction: float = CLICK_RADIUS_FRACTION,
    tolerance: float = CLICK_TOLERANCE,
) -> list[tuple[torch.Tensor, int]]:
    """Each click's ``click_region`` on ``image`` (the slice, (S, S), in which the clicks are given), at most
    ``radius_fraction`` of the slice around it, as cells (g, g) of the decoder's grid, with the click's label."""
    cells = []
    for point in points:
        region = torch.from_numpy(click_region(image, point, radius_fraction * image.shape[0], tolerance)).float()
        cells.append((F.interpolate(region[None, None], size=grid, mode="area")[0, 0] > 0.5, point[2]))
    return cells


def draw_clicks(logits: torch.Tensor, cells: list[tuple[torch.Tensor, int]], scale: float = 8.0) -> torch.Tensor:
    """Logits (1, g, g) with the clicks' cells (``click_cells``, later clicks over earlier ones) set to +``scale``
    (foreground) or -``scale`` (background).

    Drawn into SAM's mask prompt, a click acts on the stretch of similar tissue it was placed in, since the prompt
    decoder learns to follow its mask prompt (propagation hands on the previous slice's mask through it); drawn
    over the answer, what a click says is kept: the annotator's click is a constraint, the network fills in the
    rest."""
    drawn = logits.clone()
    for region, label in cells:
        drawn[0][region.to(drawn.device)] = scale if label == 1 else -scale
    return drawn


def correct_by_clicks(
    network, embedding: torch.Tensor, features, sessions: list[dict], planes: list[np.ndarray], rounds: int
) -> list[torch.Tensor]:
    """A simulated annotator correcting several slices side by side: the one session both interactive evaluation
    (``lib.infers.interactive.click_session``) and prompt-aware training (``lib.trainers.simulated_prompts``) run.

    Each round decodes every slice (``decode_prompted``, no gradient) with its prompt and mask prompt, draws the clicks
    over the answer (what the annotator sees), adds a click at the centre of that answer's largest error
    (``error_click``) and hands the answer, with every click drawn in, on as the next mask prompt. A slice without
    error is done: it keeps its answer.

    Args:
        network: the ``SamSegmenter`` whose fused ``embedding`` (B, C, h, w) and ``features`` the slices have.
        sessions: per slice {"prompt": SlicePrompt, "mask": (1, g, g) mask prompt, "class": the class corrected,
            "target": (H, W) bool truth}; prompts and masks are updated in place.
        planes: the slices (H, W) the clicks are placed in (``click_cells``).
        rounds: decodings per slice.

    Returns:
        each round's answers (B, 1, g, g) on the CPU, clicks drawn in.
    """
    device = embedding.device
    grid = tuple(sessions[0]["mask"].shape[-2:])
    classes = torch.tensor([s["class"] for s in sessions], device=device)
    done: set[int] = set()
    history: list[torch.Tensor] = []
    with torch.no_grad():
        for _ in range(rounds):
            prompts = batch_prompts([s["prompt"] for s in sessions], device, torch.stack([s["mask"] for s in sessions]).to(device))
            logits = network.object_logit(network.decode_prompted(embedding, features, prompts), classes).float().cpu()
            answers = history[-1].clone() if history else torch.zeros_like(logits)
            for j, session in enumerate(sessions):
                if j in done:
                    continue
                answers[j] = draw_clicks(logits[j], click_cells(session["prompt"]["points"], planes[j], grid))
                seen = F.interpolate(answers[j : j + 1], size=session["target"].shape, mode="bilinear", align_corners=False)[0, 0] > 0
                click = error_click(seen.numpy(), session["target"])
                if click is None:
                    done.add(j)
                    continue
                session["prompt"] = {**session["prompt"], "points": session["prompt"]["points"] + [click]}
                session["mask"] = draw_clicks(answers[j], click_cells(session["prompt"]["points"], planes[j], grid))
            history.append(answers)
    return history
