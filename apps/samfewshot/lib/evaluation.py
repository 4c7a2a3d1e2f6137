"""Scores of a predicted label volume against its ground truth, shared by scripts/evaluate.py and the benchmarks.

Two protocols, one per kind of model:

* instances (FGNet, EM neurites): ids are arbitrary, only which voxels share an id matters. Scored as
  connectomics challenges (CREMI, SNEMI3D) do: variation of information split into its split and merge
  parts, and the adapted Rand error. Ground-truth id 0 means "unlabelled": those voxels are left out.
* segmentation (HF-SAM, MASG-SAM, CT/MR classes): per class, Dice and the 95th-percentile symmetric Hausdorff
  distance in mm.

Pure numpy/MONAI/scikit-image, so it runs without a server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


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
