"""lib/evaluation.py (instance and segmentation scores) and the scripts/evaluate.py command line."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.evaluation import instance_scores, segmentation_scores

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "evaluate.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cells() -> np.ndarray:
    """Four cells, each a quarter of a 16 x 16 x 4 volume."""
    gt = np.ones((16, 16, 4), np.uint16)
    gt[8:, :8] = 2
    gt[:8, 8:] = 3
    gt[8:, 8:] = 4
    return gt


def cube(shape: tuple[int, int, int], start: tuple[int, int, int], size: int = 4, value: int = 1) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(s, s + size) for s in start)] = value
    return mask


def write(path: Path, array: np.ndarray, affine: np.ndarray, units: str = "mm") -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units(units)
    nib.save(img, path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_perfect_instances_score_zero_whatever_the_ids():
    gt = cells()
    pred = np.array([0, 70, 3, 1000, 5], np.uint32)[gt]  # same partition, other ids
    scores = instance_scores(pred, gt)
    assert scores["voi_split"] == pytest.approx(0, abs=1e-9) and scores["voi_merge"] == pytest.approx(0, abs=1e-9)
    assert scores["voi"] == pytest.approx(0, abs=1e-9)
    assert scores["arand"] == pytest.approx(0, abs=1e-9)
    assert scores["rand_split"] == pytest.approx(1) and scores["rand_merge"] == pytest.approx(1)


def test_split_raises_split_scores_only():
    gt = cells()
    pred = gt.copy()
    pred[:4, :8] = 9  # cell 1 cut into two halves
    scores = instance_scores(pred, gt)
    # One of four equal cells split in half: H(pred | gt) = 1/4 * 1 bit.
    assert scores["voi_split"] == pytest.approx(0.25)
    assert scores["voi_merge"] == pytest.approx(0, abs=1e-9)
    assert scores["arand"] > 0 and scores["rand_split"] < 1 and scores["rand_merge"] == pytest.approx(1)


def test_merge_raises_merge_scores_only():
    gt = cells()
    pred = gt.copy()
    pred[pred == 2] = 1  # cells 1 and 2 under one id
    scores = instance_scores(pred, gt)
    assert scores["voi_merge"] == pytest.approx(0.5)  # half the volume is in a 50/50 mixture: 1/2 * 1 bit
    assert scores["voi_split"] == pytest.approx(0, abs=1e-9)
    assert scores["arand"] > 0 and scores["rand_merge"] < 1 and scores["rand_split"] == pytest.approx(1)


def test_unlabelled_ground_truth_is_ignored():
    gt = cells()
    gt[:, :, 2:] = 0  # only the first two sections are annotated
    pred = cells()
    pred[:, :, 2:] = np.random.default_rng(0).integers(1, 50, size=(16, 16, 2))  # noise where nothing is known
    scores = instance_scores(pred, gt)
    assert scores["voi"] == pytest.approx(0, abs=1e-9) and scores["arand"] == pytest.approx(0, abs=1e-9)
    assert all(math.isnan(v) for v in instance_scores(pred, np.zeros_like(gt)).values())


def test_instance_scores_check_inputs():
    with pytest.raises(ValueError, match="shape"):
        instance_scores(np.ones((4, 4, 2), np.uint16), np.ones((4, 4, 3), np.uint16))
    with pytest.raises(ValueError, match="non-integer"):
        instance_scores(np.full((4, 4, 2), 0.5), np.ones((4, 4, 2), np.uint16))
    # Whole numbers stored as float (as some tools save labels) are fine.
    assert instance_scores(cells().astype(np.float32), cells())["voi"] == pytest.approx(0, abs=1e-9)


def test_segmentation_identical_absent_and_missed_classes():
    gt = cube((16, 16, 16), (4, 4, 4)) + cube((16, 16, 16), (10, 10, 10), value=2)
    labels = {"organ": 1, "tumour": 2, "vessel": 3}
    scores = segmentation_scores(gt, gt, labels, (1.0, 1.0, 1.0))
    assert scores["organ"] == {"dice": 1.0, "hd95": 0.0} and scores["tumour"] == {"dice": 1.0, "hd95": 0.0}
    assert math.isnan(scores["vessel"]["dice"]) and math.isnan(scores["vessel"]["hd95"])  # in neither volume

    missed = segmentation_scores(np.where(gt == 2, 0, gt), gt, labels, (1.0, 1.0, 1.0))["tumour"]
    assert missed == {"dice": 0.0, "hd95": math.inf}
    invented = segmentation_scores(gt, np.where(gt == 2, 0, gt), labels, (1.0, 1.0, 1.0))["tumour"]
    assert invented == {"dice": 0.0, "hd95": math.inf}


@pytest.mark.parametrize("axis, expected_mm", [(0, 4.0), (1, 8.0), (2, 12.0)])
def test_shifted_cube_hd95_uses_the_anisotropic_spacing(axis, expected_mm):
    # A 4-voxel cube moved by 4 voxels along one axis: the farthest quarter of either surface is 4 voxels away
    # from the other, so HD95 = 4 x that axis's voxel size.
    start = [4, 4, 4]
    start[axis] += 4
    pred, gt = cube((16, 16, 16), tuple(start)), cube((16, 16, 16), (4, 4, 4))
    scores = segmentation_scores(pred, gt, {"cube": 1}, (1.0, 2.0, 3.0))["cube"]
    assert scores["dice"] == 0.0
    assert scores["hd95"] == pytest.approx(expected_mm)
    # Half-overlapping: Dice 0.5.
    start[axis] -= 2
    half = segmentation_scores(cube((16, 16, 16), tuple(start)), gt, {"cube": 1}, (1.0, 2.0, 3.0))["cube"]
    assert half["dice"] == pytest.approx(0.5)


def test_segmentation_checks_spacing_and_shape():
    with pytest.raises(ValueError, match="spacing"):
        segmentation_scores(cells(), cells(), {"a": 1}, (1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(cells(), cells()[:8], {"a": 1}, (1.0, 1.0, 1.0))


def test_cli_instances_end_to_end(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    affine = np.diag([0.004, 0.004, 0.04, 1.0])  # EM convention: micrometres
    gt = cells()
    split = gt.copy()
    split[:4, :8] = 9
    write(gt_dir / "em_000.nii.gz", gt, affine, "micron")
    write(gt_dir / "em_001.nii.gz", gt, affine, "micron")
    (gt_dir / "manifest.json").write_text("{}")  # non-volume files beside the ground truth are left alone
    write(pred_dir / "em_000.nii", (gt * 10).astype(np.uint16), affine, "micron")  # other extension, other ids
    write(pred_dir / "em_001.nii.gz", split, affine, "micron")

    out = tmp_path / "scores.json"
    result = run_cli("--task", "instances", "--predictions", str(pred_dir), "--groundtruth", str(gt_dir), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "em_000" in result.stdout and "mean" in result.stdout and "voi_split" in result.stdout
    scores = json.loads(out.read_text())
    assert scores["task"] == "instances" and set(scores["per_volume"]) == {"em_000", "em_001"}
    assert scores["per_volume"]["em_000"]["voi"] == pytest.approx(0, abs=1e-9)
    assert scores["per_volume"]["em_001"]["voi_split"] == pytest.approx(0.25)
    assert scores["mean"]["voi_split"] == pytest.approx(0.125)


def test_cli_segmentation_end_to_end_in_mm(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    # 1 x 2 x 3 mm voxels, stored in micrometres: the CLI converts to mm from the NIfTI unit.
    affine = np.diag([1000.0, 2000.0, 3000.0, 1.0])
    write(gt_dir / "ct_000.nii.gz", cube((16, 16, 16), (4, 4, 4)), affine, "micron")
    write(pred_dir / "ct_000.nii.gz", cube((16, 16, 16), (4, 4, 8)), affine, "micron")
    (gt_dir / "labels.json").write_text(json.dumps({"liver": 1, "spleen": 2}))

    out = tmp_path / "scores.json"
    result = run_cli("--task", "segmentation", "--predictions", str(pred_dir), "--groundtruth", str(gt_dir), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "dice[liver]" in result.stdout and "hd95[spleen]" in result.stdout
    scores = json.loads(out.read_text())
    liver = scores["per_volume"]["ct_000"]["liver"]
    assert liver["dice"] == 0.0 and liver["hd95"] == pytest.approx(12.0)
    assert math.isnan(scores["mean"]["spleen"]["dice"])

    # --labels as a JSON string or file overrides labels.json.
    evaluate = _load_script()
    assert evaluate.read_labels('{"organ": 1}', gt_dir) == {"organ": 1}
    assert evaluate.read_labels(str(gt_dir / "labels.json"), tmp_path) == {"liver": 1, "spleen": 2}
    with pytest.raises(ValueError, match="ids >= 1"):
        evaluate.read_labels('{"background": 0}', gt_dir)


def test_cli_reports_missing_predictions_and_geometry_mismatch(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for name in ("em_000", "em_001"):
        write(gt_dir / f"{name}.nii.gz", cells(), np.eye(4))
    write(pred_dir / "em_000.nii.gz", cells(), np.eye(4))

    result = run_cli("--task", "instances", "--predictions", str(pred_dir), "--groundtruth", str(gt_dir))
    assert result.returncode == 1
    assert "no prediction" in result.stderr and "em_001" in result.stderr

    evaluate = _load_script()
    write(pred_dir / "em_001.nii.gz", cells(), np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="geometry"):
        evaluate.evaluate("instances", pred_dir, gt_dir)
    write(pred_dir / "em_001.nii.gz", cells()[:, :, :2], np.eye(4))
    with pytest.raises(ValueError, match="geometry"):
        evaluate.evaluate("instances", pred_dir, gt_dir)
    with pytest.raises(ValueError, match="--labels"):
        evaluate.read_labels(None, gt_dir)
