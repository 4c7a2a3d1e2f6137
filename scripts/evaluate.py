"""Score predicted label volumes against their ground truth, for either kind of model.

    .venv/bin/python scripts/evaluate.py --task segmentation --predictions preds/hf_sam \
        --groundtruth sample-datasets/brain-mri-groundtruth
    .venv/bin/python scripts/evaluate.py --task instances --predictions preds/fgnet \
        --groundtruth sample-datasets/em-neurons-groundtruth --output fgnet_scores.json

Every ground-truth volume (.nii.gz, .nii or .nrrd) needs a prediction of the same name (the extension may differ)
on the same grid; predictions without ground truth are left out. segmentation: Dice and HD95 in mm per class of
--labels (default: labels.json beside the ground truth). instances: VOI split/merge and adapted Rand error, with
ground-truth id 0 (unlabelled) ignored; see apps/samfewshot/lib/evaluation.py. Prints one row per volume and the
mean, and with --output writes JSON {"task", "per_volume", "mean"}. A class absent from both volumes scores nan
and is left out of the mean; one that is missed or hallucinated scores HD95 inf, which the mean keeps (JSON:
NaN / Infinity, as Python's json module writes and reads them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "samfewshot"))

SUFFIXES = (".nii.gz", ".nii", ".nrrd")
# NIfTI xyzt_units, spatial part (code & 7): metre, millimetre, micrometre -> factor to mm.
NIFTI_UNIT_TO_MM = {1: 1000.0, 2: 1.0, 3: 0.001}


def volume_files(folder: Path) -> dict[str, Path]:
    """Label volumes in `folder`, keyed by name without extension."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in SUFFIXES if path.name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        name = path.name[: -len(suffix)]
        if name in found:
            raise ValueError(f"{folder} holds two volumes named {name!r}: {found[name].name} and {path.name}")
        found[name] = path
    return found


def load_label(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(ids, affine, voxel size in mm). Read with MONAI as the app reads volumes; ids keep their stored integer type."""
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True, dtype=None)(str(path))
    # EM volumes store micrometres (NIfTI has no nm unit); NRRD and unit-less NIfTI are taken as mm.
    factor = NIFTI_UNIT_TO_MM.get(int(img.meta.get("xyzt_units", 2)) & 7, 1.0)
    spacing = tuple(float(s) * factor for s in img.pixdim)
    return np.asarray(img), img.affine.numpy(), spacing


def read_labels(value: str | None, groundtruth: Path) -> dict[str, int]:
    """--labels as a JSON file or string; by default the labels.json the sample data writes beside its ground truth."""
    if value is None:
        default = groundtruth / "labels.json"
        if not default.is_file():
            raise ValueError(f"--task segmentation needs --labels: {default} does not exist")
        value = str(default)
    text = Path(value).read_text() if os.path.isfile(value) else value
    try:
        labels = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--labels is neither a JSON file nor a JSON object: {e}") from None
    if not isinstance(labels, dict) or not all(isinstance(i, int) and i > 0 for i in labels.values()):
        raise ValueError(f'--labels must map class names to ids >= 1, like {{"liver": 1}} (got {labels!r})')
    return labels


def evaluate(task: str, predictions: Path, groundtruth: Path, labels: dict[str, int] | None = None) -> dict:
    """Scores of every ground-truth volume and their mean; raises ValueError on missing or mismatched volumes."""
    from lib.evaluation import instance_scores, segmentation_scores

    truths, preds = volume_files(groundtruth), volume_files(predictions)
    if not truths:
        raise ValueError(f"no {'/'.join(SUFFIXES)} volumes in {groundtruth}")
    missing = sorted(set(truths) - set(preds))
    if missing:
        raise ValueError(f"no prediction in {predictions} for {len(missing)} ground-truth volume(s): {', '.join(missing)}")

    per_volume = {}
    for name, truth_path in truths.items():
        gt, gt_affine, spacing = load_label(truth_path)
        pred, pred_affine, _ = load_label(preds[name])
        if pred.shape != gt.shape or not np.allclose(pred_affine, gt_affine, atol=1e-3 * min(spacing)):
            raise ValueError(
                f"{preds[name].name} and {truth_path.name} differ in geometry: shape {pred.shape} vs {gt.shape}, "
                f"affine\n{np.round(pred_affine, 6)}\nvs\n{np.round(gt_affine, 6)}"
            )
        if task == "instances":
            per_volume[name] = instance_scores(pred, gt)
        else:
            per_volume[name] = segmentation_scores(pred, gt, labels, spacing)
    return {"task": task, "per_volume": per_volume, "mean": mean_scores(list(per_volume.values()))}


def mean_scores(scores: list[dict]) -> dict:
    """Mean of each (possibly nested) score over volumes, nan entries left out; inf stays inf."""
    first = scores[0]
    if isinstance(first, dict):
        return {key: mean_scores([s[key] for s in scores]) for key in first}
    kept = [v for v in scores if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def columns(row: dict) -> dict[str, float]:
    """Flat column name -> value: metric for instances, metric[class] for segmentation (all Dice columns first)."""
    if not any(isinstance(v, dict) for v in row.values()):
        return row
    metrics = next(iter(row.values()))
    return {f"{metric}[{name}]": row[name][metric] for metric in metrics for name in row}


def table(result: dict) -> str:
    rows = [(name, columns(scores)) for name, scores in result["per_volume"].items()]
    rows.append(("mean", columns(result["mean"])))
    heads = list(rows[0][1])
    first = max(len(name) for name, _ in rows)
    widths = [max(len(h), 8) for h in heads]
    lines = ["  ".join([f"{'volume':<{first}}", *(f"{h:>{w}}" for h, w in zip(heads, widths))])]
    for name, values in rows:
        lines.append("  ".join([f"{name:<{first}}", *(f"{values[h]:>{w}.4f}" for h, w in zip(heads, widths))]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("segmentation", "instances"), required=True)
    parser.add_argument("--predictions", type=Path, required=True, help="folder of predicted label volumes")
    parser.add_argument("--groundtruth", type=Path, required=True, help="folder of ground-truth label volumes")
    parser.add_argument("--labels", help='segmentation: JSON file or string {"name": id} (default: GROUNDTRUTH/labels.json)')
    parser.add_argument("--output", type=Path, help="write the scores to this JSON file")
    args = parser.parse_args(argv)
    for folder in (args.predictions, args.groundtruth):
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    try:
        labels = read_labels(args.labels, args.groundtruth) if args.task == "segmentation" else None
        result = evaluate(args.task, args.predictions, args.groundtruth, labels)
    except ValueError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 1
    print(table(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
