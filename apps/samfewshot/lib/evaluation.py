"""Scores of a predicted label volume against its ground truth, shared by scripts/evaluate.py and the benchmarks.

Two protocols, one per kind of model:

* instances (FGNet, EM neurites): ids are arbitrary, only which voxels share an id matters. Scored as
  connectomics challenges (CREMI, SNEMI3D) do: variation of information split into its split and merge
  parts, and the adapted Rand error. Ground-truth id 0 means "unlabelled": those voxels are left out.
* segmentation (HF-SAM, MASG-SAM, CT/MR classes): per class, Dice and the 95th-percentile symmetric Hausdorff
  distance in mm.

The papers' tables use conventions of their own, reproduced here for scripts/evaluate.py's ``paper`` protocols:
``percase_dice_hd95`` (SAMed / H-SAM / HF-SAM test code: medpy's Dice and HD95 in voxels) and ``cremi_scores``
(the CREMI challenge's reference code, cremi_python).

The interactive protocol of the CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical Image
Segmentation" (its evaluation code: ``CVPR25_iter_eval.py`` and ``get_boxes.py`` of JunMa11/CVPR-MedSegFMCompetition)
for scripts/evaluate.py's ``interactive``: ``challenge_box``, ``challenge_click``, ``challenge_scores`` and
``interaction_auc``. They take volumes in the challenge's axis order (z, y, x): a NIfTI array (i, j, k) transposed.

Pure numpy/SciPy/MONAI/scikit-image, so it runs without a server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from scipy import ndimage
from scipy.integrate import trapezoid


def _check_shapes(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground-truth shape {tuple(gt.shape)}")


def _as_ids(array: np.ndarray, what: str) -> np.ndarray:
    """Integer ids; a float volume is accepted when it holds whole numbers (labels saved as float by some tools)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise ValueError(f"{what} holds non-integer values: expected a label volume")
    if array.size and array.min() < 0:
        raise ValueError(f"{what} holds negative ids")
    return array.astype(np.int64, copy=False)


def instance_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """VOI split/merge (bits) and adapted Rand error of an instance labelling; 0 everywhere is a perfect score.

    Ground-truth voxels with id 0 are unlabelled and ignored (a ground truth without any labelled voxel scores
    nan throughout); in the prediction 0 is an ordinary id, so unsegmented voxels count as one segment (a
    merge). A permutation of the predicted ids scores the same.

    * ``voi_split`` = H(pred | gt): grows when a true cell is spread over several predicted ids (false splits);
      ``voi_merge`` = H(gt | pred): grows when one predicted id covers several true cells (false merges);
      ``voi`` = their sum. scikit-image's ``variation_of_information(gt, pred)`` returns them in this order:
      (H(image1 | image0), H(image0 | image1)).
    * ``arand`` = 1 - the Rand F-score over voxel pairs (SNEMI3D). ``rand_split`` = pairs in one cell in both /
      pairs in one true cell (1 = no false splits); ``rand_merge`` = pairs in one cell in both / pairs in one
      predicted segment (1 = no false merges). scikit-image's ``adapted_rand_error`` returns them as its
      "precision" and "recall", in that order, although its docstring defines the two the other way round
      (scikit-image issue #6485); the names here say what the numbers measure.
    """
    from skimage.metrics import adapted_rand_error, variation_of_information

    _check_shapes(pred, gt)
    pred, gt = _as_ids(pred, "prediction"), _as_ids(gt, "ground truth")
    if not gt.any():  # nothing labelled, nothing to score (a patch of a partial annotation, say)
        return dict.fromkeys(("voi_split", "voi_merge", "voi", "arand", "rand_split", "rand_merge"), math.nan)
    voi_split, voi_merge = variation_of_information(gt, pred, ignore_labels=(0,))
    arand, rand_split, rand_merge = adapted_rand_error(gt, pred, ignore_labels=(0,))
    return {
        "voi_split": float(voi_split),
        "voi_merge": float(voi_merge),
        "voi": float(voi_split + voi_merge),
        "arand": float(arand),
        "rand_split": float(rand_split),
        "rand_merge": float(rand_merge),
    }


def segmentation_scores(
    pred: np.ndarray, gt: np.ndarray, labels: Mapping[str, int], spacing: Sequence[float]
) -> dict[str, dict[str, float]]:
    """Per class name: Dice and HD95 (mm) of ``pred == id`` against ``gt == id``; ``spacing`` is the voxel size in mm.

    A class absent from both volumes has nothing to score: dice and hd95 are nan, which nan-aware means skip.
    A class present in only one of them scores dice 0 and hd95 inf (no surface to measure to). MONAI itself
    returns nan for hd95 then (the 95th percentile of infinite distances), which would hide a missed class
    among the absent ones.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    _check_shapes(pred, gt)
    if len(spacing) != gt.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {gt.ndim}-D volume")
    pred, gt = _as_ids(pred, "prediction"), _as_ids(gt, "ground truth")
    scores = {}
    for name, idx in labels.items():
        # (batch, channel, *spatial) one-channel masks: the class alone, no background channel to skip.
        p = torch.from_numpy(pred == idx)[None, None]
        g = torch.from_numpy(gt == idx)[None, None]
        in_pred, in_gt = bool(p.any()), bool(g.any())
        if not (in_pred or in_gt):
            scores[name] = {"dice": math.nan, "hd95": math.nan}
            continue
        dice = compute_dice(p, g, include_background=True, ignore_empty=False)
        hd95 = (
            compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=list(spacing))
            if in_pred and in_gt
            else math.inf
        )
        scores[name] = {"dice": float(dice), "hd95": float(hd95)}
    return scores


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(pred, target).sum()) / total


def clicks_to_reach(dices: Sequence[float], threshold: float) -> int:
    """NoC@threshold of one object: the number of clicks after which Dice first reaches ``threshold``; the
    session's length (the maximum) when it never does, as interactive segmentation benchmarks count it. ``dices``:
    Dice after click 1, 2, ..."""
    for n, value in enumerate(dices, start=1):
        if value >= threshold:
            return n
    return len(dices)


def hd95_voxels(result: np.ndarray, reference: np.ndarray) -> float:
    """HD95 of two non-empty boolean masks in voxels, as ``medpy.metric.binary.hd95(result, reference)`` computes it
    with its defaults (voxelspacing None, connectivity 1), which the SAMed / H-SAM / HF-SAM test code calls.

    medpy's definition: a mask's surface is the mask minus its erosion by the face-connected cross (outside the
    volume counts as background); every surface voxel of either mask gets its Euclidean distance to the nearest
    surface voxel of the other; HD95 is numpy's (linearly interpolated) 95th percentile of both directions'
    distances pooled. MONAI's ``compute_hausdorff_distance(percentile=95)`` differs: it takes the percentile of
    each direction and then the larger one. medpy itself is not a dependency: this agreed with medpy 0.5.2 to 1e-9
    on random 3D masks when written, and tests/unit/test_paper_protocols.py checks hand-computed cases.
    """
    result, reference = np.asarray(result, bool), np.asarray(reference, bool)
    _check_shapes(result, reference)
    if not (result.any() and reference.any()):
        raise ValueError("hd95 needs two non-empty masks (medpy raises RuntimeError on an empty one)")
    # Crop to both masks plus one voxel of background (or the volume edge): distances between surface voxels and
    # each erosion are those of the whole volume, at a fraction of the distance transform's cost.
    nonzero = np.nonzero(result | reference)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in nonzero)
    result, reference = result[box], reference[box]
    cross = ndimage.generate_binary_structure(result.ndim, 1)
    surface = [m ^ ndimage.binary_erosion(m, structure=cross) for m in (result, reference)]
    to_reference = ndimage.distance_transform_edt(~surface[1])[surface[0]]
    to_result = ndimage.distance_transform_edt(~surface[0])[surface[1]]
    return float(np.percentile(np.concatenate([to_reference, to_result]), 95))


def percase_dice_hd95(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(Dice, HD95 in voxels) of one class in one case with the conventions of ``calculate_metric_percase`` in the
    SAMed / H-SAM / HF-SAM test code (utils.py): both masks non-empty: medpy's Dice and ``hd95_voxels``; a
    prediction where the ground truth is empty: (1, 0); an empty prediction, or both empty: (0, 0).

    So a missed organ costs Dice but no HD95, and an organ absent from a case scores Dice 0 when the model (rightly)
    predicts nothing: the papers' convention, kept so their tables can be reproduced. ``segmentation_scores`` is
    the app's own protocol (nan and inf for those cases).
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    _check_shapes(pred, gt)
    if pred.any() and gt.any():
        return dice(pred, gt), hd95_voxels(pred, gt)
    if pred.any():
        return 1.0, 0.0
    return 0.0, 0.0


def cremi_adapted_rand(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """(arand, rand_split, rand_merge) as the CREMI reference code computes the adapted Rand error
    (cremi_python's ``evaluation/rand.py``, SNEMI3D's formula). Ground-truth id 0 is ignored.

    Two conventions differ from scikit-image's ``adapted_rand_error`` (``instance_scores``): voxel pairs are counted
    as squared segment sizes (n^2, each voxel paired with itself too, not n(n-1)), and a voxel the prediction leaves
    at id 0 is nearly a segment of its own (the reference code adds ``sum(c) / n`` for them, c their count per true
    cell and n all voxels), where scikit-image makes predicted 0 one ordinary segment. On volumes of millions of
    voxels without predicted 0 the two agree to about 1e-5; on small cases they differ (a 2-voxel merge below).
    """
    pred, gt = _as_ids(pred, "prediction").ravel(), _as_ids(gt, "ground truth").ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {pred.size} voxels, ground truth {gt.size}")
    n = gt.size
    labelled = gt != 0
    if not labelled.any():
        return math.nan, math.nan, math.nan
    true = np.unique(gt[labelled], return_inverse=True)[1].ravel()
    test = pred[labelled]
    unsegmented = test == 0
    singles = float(unsegmented.sum()) / n
    true_seg, test_seg = true[~unsegmented], np.unique(test[~unsegmented], return_inverse=True)[1].ravel()
    true_sizes = np.bincount(true).astype(np.float64)
    test_sizes = np.bincount(test_seg).astype(np.float64)
    overlaps = np.unique(true_seg * max(len(test_sizes), 1) + test_seg, return_counts=True)[1].astype(np.float64)
    sum_true = true_sizes @ true_sizes
    sum_test = test_sizes @ test_sizes + singles
    sum_both = overlaps @ overlaps + singles
    rand_merge, rand_split = sum_both / sum_test, sum_both / sum_true
    return 1.0 - 2.0 * rand_merge * rand_split / (rand_merge + rand_split), rand_split, rand_merge


def cremi_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """``instance_scores`` with the CREMI challenge's adapted Rand error (``cremi_adapted_rand``) and its CREMI
    score sqrt((VOI split + VOI merge) x ARAND); 0 everywhere is a perfect score.

    Ground-truth id 0 is ignored, as cremi_python ignores its background id 2^64 - 1 after adding 1 to every id (the
    caller maps a CREMI file's ids that way). The VOI is the reference code's ``voi(segmentation, groundtruth,
    ignore_groundtruth=[0])``: bits, predicted id 0 an ordinary segment, which is what ``instance_scores`` computes.
    """
    scores = instance_scores(pred, gt)
    arand, rand_split, rand_merge = cremi_adapted_rand(pred, gt)
    scores.update(arand=arand, rand_split=rand_split, rand_merge=rand_merge)
    scores["cremi_score"] = math.sqrt(scores["voi"] * arand) if not math.isnan(arand) else math.nan
    return scores


# The challenge's constants: clicks after the box, NSD tolerance (mm), the mean Dice at or below which NSD counts 0,
# the seed of the click's tie-breaking (set before every click) and of the boxes' jitter.
CHALLENGE_CLICKS = 5
NSD_TOLERANCE_MM = 2.0
NSD_MIN_DICE = 0.2
CLICK_SEED = 42
BOX_SEED = 2025


def challenge_box(mask: np.ndarray, rng: np.random.RandomState) -> dict[str, int]:
    """The box prompt of one structure (mask (z, y, x), not empty), as ``get_boxes.py`` makes it: the z range, and on
    ``z_mid`` (the z of the structure's middle voxel in C order) the 2D box of the structure, each side moved out by
    the same 0-5 pixels (``rng``) scaled by the slice size / 256, within the slice."""
    z, _, _ = np.nonzero(mask)
    z_mid = int(z[len(z) // 2])
    y, x = np.nonzero(mask[z_mid])
    height, width = mask.shape[1:]
    shift = int(rng.randint(0, 6, 1)[0])
    sx, sy = int(shift * width / 256), int(shift * height / 256)
    return {
        "z_min": int(z.min()),
        "z_max": int(z.max()),
        "z_mid": z_mid,
        "z_mid_x_min": max(0, int(x.min()) - sx),
        "z_mid_y_min": max(0, int(y.min()) - sy),
        "z_mid_x_max": min(width - 1, int(x.max()) + sx),
        "z_mid_y_max": min(height - 1, int(y.max()) + sy),
    }


def challenge_click(pred: np.ndarray, target: np.ndarray) -> tuple[tuple[int, int, int], bool] | None:
    """The next click on one structure (boolean masks (z, y, x)), as ``CVPR25_iter_eval.py`` places it: at the
    maximum of the distance transform of the largest 26-connected error component (computed on the component alone,
    so the volume's edge counts as outside it), ties broken by ``np.random.choice`` seeded with ``CLICK_SEED``; and
    whether it is a foreground click (under-segmentation there). None when the prediction is exact."""
    errors, count = ndimage.label(pred != target, structure=np.ones((3, 3, 3)))
    if count == 0:
        return None
    sizes = np.bincount(errors.ravel())
    sizes[0] = 0
    component = errors == int(np.argmax(sizes))
    box = ndimage.find_objects(component.astype(np.uint8))[0]
    distance = np.zeros(component.shape)
    distance[box] = ndimage.distance_transform_edt(np.pad(component[box], 1))[(slice(1, -1),) * 3]
    peaks = np.argwhere(distance == distance.max())
    click = tuple(int(v) for v in peaks[np.random.RandomState(CLICK_SEED).choice(len(peaks))])
    return click, bool(target[click])


def challenge_scores(target: np.ndarray, seg: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """(DSC, NSD) of a multi-class prediction (z, y, x) against ``target``: each the mean over the classes present in
    ``target``; NSD at ``NSD_TOLERANCE_MM`` with the surface elements of DeepMind's surface-distance (the challenge's
    SurfaceDice.py; MONAI's ``compute_surface_dice`` with ``use_subvoxels``), and 0 when the mean Dice is at most
    ``NSD_MIN_DICE``. ``spacing``: voxel size (z, y, x) in mm."""
    classes = [int(c) for c in np.unique(target) if c != 0]
    dsc = float(np.mean([dice(seg == c, target == c) for c in classes]))
    if dsc <= NSD_MIN_DICE:
        return dsc, 0.0
    one_hot = [torch.from_numpy(np.stack([volume == c for c in classes])[None]) for volume in (seg, target)]
    nsd = compute_surface_dice(
        *one_hot, [NSD_TOLERANCE_MM] * len(classes), include_background=True, spacing=list(spacing), use_subvoxels=True
    )
    return dsc, float(nsd.mean())  # every class is in the target: none is nan


def interaction_auc(values: Sequence[float]) -> float:
    """The challenge's DSC_AUC / NSD_AUC: the trapezoid area under the scores after each of the last
    ``CHALLENGE_CLICKS`` steps (the clicks; the box step is optional there), one unit apart (at most 4)."""
    return float(trapezoid(np.asarray(values[-CHALLENGE_CLICKS:], dtype=float)))
