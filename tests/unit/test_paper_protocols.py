"""scripts/evaluate.py's paper protocols (Synapse, ACDC, CREMI, AC3/AC4) end to end on tiny files in each layout with
the tiny random models, and the metric conventions they use (lib.evaluation) against hand-computed cases."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lib.adapters import publish_adapter
from lib.configs import MODEL_CONFIGS
from lib.evaluation import cremi_adapted_rand, cremi_scores, hd95_voxels, instance_scores, percase_dice_hd95
from lib.networks.lora import adapter_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import evaluate  # noqa: E402

SYNAPSE_ORGANS = ("spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = evaluate.main(["paper", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_tiny(capsys, dataset: str, data: Path, model: str, out: Path, *extra: str) -> tuple[int, str, str]:
    """A protocol with the tiny random model, writing ``out``; no adapter in --model-dir (out's folder)."""
    args = ["--dataset", dataset, "--data", str(data), "--model", model, "--model-dir", str(out.parent), "--output", str(out)]
    return run(capsys, *args, "--conf", "backbone", "tiny", *extra)


def stripes(depth: int, size: int, classes: int) -> np.ndarray:
    """(depth, size, size) label with one horizontal stripe per class id 1..classes."""
    label = np.zeros((depth, size, size), np.uint8)
    width = size // (classes + 1)
    for k in range(1, classes + 1):
        label[:, k * width : (k + 1) * width - 1, 8:-8] = k
    return label


def write_slices_h5(path: Path, image: np.ndarray, label: np.ndarray, image_key: str = "image") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f[image_key] = image.astype(np.float32)
        f["label"] = label.astype(np.float32)  # the published h5 files store labels as float


# --- metric conventions -------------------------------------------------------------------------------------------


def test_percase_conventions_of_the_papers_test_code():
    gt = np.zeros((4, 16, 16), bool)
    gt[1:3, 4:12, 4:12] = True
    empty = np.zeros_like(gt)
    assert percase_dice_hd95(gt, gt) == (1.0, 0.0)  # perfect
    assert percase_dice_hd95(empty, gt) == (0.0, 0.0)  # missed: Dice 0, no HD95 penalty
    assert percase_dice_hd95(gt, empty) == (1.0, 0.0)  # predicted where the case has none: 1, 0 as the official code
    assert percase_dice_hd95(empty, empty) == (0.0, 0.0)
    half = np.zeros_like(gt)
    half[1:3, 4:12, 8:16] = True
    assert percase_dice_hd95(half, gt)[0] == pytest.approx(0.5)


def test_hd95_pools_both_directions_as_medpy():
    # A 1 x 1 x 40 line: every voxel is surface (its other neighbours lie outside the volume). Prediction voxels
    # 0..19, truth 0..9: prediction -> truth 0 (x10) and 1..10, truth -> prediction 0 (x10). Pooled and sorted: 20
    # zeros, then 1..10; numpy's 95th percentile sits at index 0.95 x 29 = 27.55, between 8 and 9. (MONAI takes each
    # direction's percentile, then the larger: 9.05.)
    pred, truth = np.zeros((1, 1, 40), bool), np.zeros((1, 1, 40), bool)
    pred[..., :20], truth[..., :10] = True, True
    assert hd95_voxels(pred, truth) == pytest.approx(8.55)
    assert hd95_voxels(truth, pred) == pytest.approx(8.55)
    # Two single voxels 3 and 4 voxels apart along two axes: 5 voxels, whatever the volume around them.
    a, b = np.zeros((8, 8, 3), bool), np.zeros((8, 8, 3), bool)
    a[1, 1, 1], b[4, 5, 1] = True, True
    assert hd95_voxels(a, b) == pytest.approx(5.0)
    # A solid cube's surface excludes its interior: a cube against its own centre voxel is 1.5 voxels away at most.
    cube, centre = np.zeros((7, 7, 7), bool), np.zeros((7, 7, 7), bool)
    cube[2:5, 2:5, 2:5], centre[3, 3, 3] = True, True
    assert hd95_voxels(cube, cube) == 0.0 and 1.0 <= hd95_voxels(cube, centre) <= math.sqrt(3)
    with pytest.raises(ValueError, match="non-empty"):
        hd95_voxels(a, np.zeros_like(a))


def test_cremi_scores_of_a_known_merge():
    # Two 2-voxel cells under one predicted id. VOI: split H(pred | gt) = 0, merge H(gt | pred) = 1 bit.
    # CREMI's adapted Rand: true pairs sum 2^2 + 2^2 = 8, predicted 4^2 = 16, shared 8: merge 8/16, split 8/8,
    # F = 2/3, ARAND 1/3; CREMI score sqrt(1 x 1/3).
    gt, pred = np.array([1, 1, 2, 2]), np.array([7, 7, 7, 7])
    scores = cremi_scores(pred, gt)
    assert scores["voi_split"] == pytest.approx(0, abs=1e-12) and scores["voi_merge"] == pytest.approx(1.0)
    assert scores["arand"] == pytest.approx(1 / 3) and scores["rand_split"] == 1.0 and scores["rand_merge"] == 0.5
    assert scores["cremi_score"] == pytest.approx(math.sqrt(1 / 3))
    # scikit-image counts pairs without self-pairs: 4 shared / (4 + 12) / 2 -> ARAND 0.5 on the same case.
    assert instance_scores(pred, gt)["arand"] == pytest.approx(0.5)
    # Ground-truth 0 is ignored, whatever the prediction holds there.
    assert cremi_scores(np.array([5, 6, 7, 7, 7, 7]), np.array([0, 0, 1, 1, 2, 2]))["arand"] == pytest.approx(1 / 3)
    perfect = cremi_scores(np.array([3, 3, 9, 9]), gt)
    assert perfect["voi"] == pytest.approx(0, abs=1e-12) and perfect["arand"] == pytest.approx(0, abs=1e-12)


def test_cremi_unsegmented_voxels_count_as_near_singletons():
    # One 4-voxel cell left at predicted id 0: the reference code adds sum(c) / n = 4 / 4 to the predicted and shared
    # sums: merge 1/1, split 1/16, ARAND 1 - (2/16) / (17/16) = 15/17. VOI sees id 0 as one ordinary segment: 0.
    arand, rand_split, rand_merge = cremi_adapted_rand(np.zeros(4, int), np.ones(4, int))
    assert arand == pytest.approx(15 / 17) and rand_split == pytest.approx(1 / 16) and rand_merge == 1.0
    assert cremi_scores(np.zeros(4, int), np.ones(4, int))["voi"] == pytest.approx(0, abs=1e-12)
    assert math.isnan(cremi_scores(np.ones(4, int), np.zeros(4, int))["cremi_score"])


def test_cremi_ground_truth_ids_and_border_mask():
    ids = np.array([[[0, 5, np.iinfo(np.uint64).max]]], np.uint64)
    assert evaluate.cremi_ground_truth(ids).tolist() == [[[1, 6, 0]]]  # background -> 0 (ignored), neuron 0 kept
    section = np.ones((1, 3, 6), np.int64)
    section[..., 3:] = 2
    # Pixels beside the 1|2 boundary (columns 2 and 3) are border; 1 pixel further extends it to columns 1-4.
    assert evaluate.cremi_border_mask(section, 0)[0, 0].tolist() == [False, False, True, True, False, False]
    assert evaluate.cremi_border_mask(section, 1)[0, 0].tolist() == [False, True, True, True, True, False]


# --- the segmentation protocol ------------------------------------------------------------------------------------


class Threshold(torch.nn.Module):
    """Two-class 'network': class 1 where the input exceeds 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1)


def test_slices_are_resized_to_the_model_and_back_as_the_official_test():
    image = np.zeros((5, 48, 40), np.float32)
    image[:, 12:36, 8:24] = 1.0
    prediction = evaluate.segment_slices(Threshold(), image, 64, "cpu", batch_size=2)
    assert prediction.shape == image.shape and prediction.dtype == np.int64
    assert np.array_equal(prediction, image.astype(np.int64))
    assert np.array_equal(evaluate.segment_slices(Threshold(), image[:, :40], 40, "cpu", batch_size=4), image[:, :40])


def test_synapse_end_to_end(tmp_path, capsys):
    data, rng = tmp_path / "Synapse", np.random.default_rng(0)
    label = stripes(3, 64, 8)
    for case in ("case0001", "case0002", "case0099"):
        write_slices_h5(data / "test_vol_h5" / f"{case}.npy.h5", rng.random((3, 64, 64)), label)
    (data / "lists" / "lists_Synapse").mkdir(parents=True)
    (data / "lists" / "lists_Synapse" / "test_vol.txt").write_text("case0002\ncase0001\n")
    out = tmp_path / "synapse.json"
    # An adapter published as scripts/adapters.py import publishes one: the official class names, the default --conf.
    config = MODEL_CONFIGS["hf_sam"]()
    labels = json.dumps({name: i for i, name in enumerate(SYNAPSE_ORGANS, start=1)})
    config.init("hf_sam", str(tmp_path), {"backbone": "tiny", "engine": "torch", "labels": labels}, None)
    assert publish_adapter(config.model.adapter_path, adapter_state_dict(config.build_network()), config.model.adapter_config()) == 1

    code, stdout, err = run_tiny(capsys, "synapse", data, "hf_sam", out)
    assert code == 0, err
    assert all(organ in stdout for organ in SYNAPSE_ORGANS) and "Dice" in stdout and "HD95" in stdout
    assert "adapter version 1" in stdout and "base weights" not in err
    result = json.loads(out.read_text())
    assert list(result["per_case"]) == ["case0002", "case0001"]  # the test list, in its order
    assert list(result["per_class"]) == list(SYNAPSE_ORGANS)
    assert result["model"] == "hf_sam" and result["adapter_version"] == 1 and result["input_size"] == 256
    for scores in [*result["per_case"].values(), result["per_class"]]:
        assert all(0 <= s["dice"] <= 1 and 0 <= s["hd95"] < 100 for s in scores.values())
    assert result["mean"]["dice"] == pytest.approx(np.mean([s["dice"] for s in result["per_class"].values()]))


def test_acdc_end_to_end_in_the_ssl4mis_layout(tmp_path, capsys):
    data, rng = tmp_path / "ACDC", np.random.default_rng(1)
    for case in ("patient001_frame01", "patient001_frame02"):
        write_slices_h5(data / "data" / f"{case}.h5", rng.random((3, 64, 48)), stripes(3, 64, 3)[..., :48])
    write_slices_h5(data / "data" / "slices" / "patient001_frame01_slice_0.h5", rng.random((64, 48)), np.zeros((64, 48)))
    (data / "test.list").write_text("patient001_frame02\n")
    out = tmp_path / "acdc.json"

    code, stdout, err = run_tiny(capsys, "acdc", data, "masg_sam", out)
    assert code == 0, err
    assert all(name in stdout for name in ("RV", "Myo", "LV")) and "base weights" in err  # no adapter in --model-dir
    result = json.loads(out.read_text())
    assert list(result["per_case"]) == ["patient001_frame02"] and list(result["per_class"]) == ["RV", "Myo", "LV"]
    assert all(0 <= s["dice"] <= 1 and s["hd95"] >= 0 for s in result["per_class"].values())


def test_acdc_wsl4mis_and_flat_layouts_and_case_selection(tmp_path):
    image, label = np.zeros((2, 8, 8)), np.zeros((2, 8, 8))
    write_slices_h5(tmp_path / "wsl" / "ACDC_training_volumes" / "patient002_frame01.h5", image, label)
    write_slices_h5(tmp_path / "flat" / "patient003_frame01.h5", image, label)
    assert list(evaluate.slice_cases("acdc", tmp_path / "wsl", None)) == ["patient002_frame01"]
    assert list(evaluate.slice_cases("acdc", tmp_path / "flat", ["patient003_frame01.h5"])) == ["patient003_frame01"]
    with pytest.raises(evaluate.DataError, match="no volume for case"):
        evaluate.slice_cases("acdc", tmp_path / "flat", ["patient099_frame01"])


# --- the instance protocol ----------------------------------------------------------------------------------------


def test_cremi_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(2)
    ids = np.zeros((8, 32, 32), np.uint64)
    ids[:, 16:] = 7
    ids[:, :, :3] = np.iinfo(np.uint64).max  # background: ignored
    path = tmp_path / "sample_A_20160501.hdf"
    with h5py.File(path, "w") as f:
        f.create_dataset("volumes/raw", data=rng.integers(0, 256, ids.shape, dtype=np.uint8)).attrs["resolution"] = (40.0, 4.0, 4.0)
        f.create_dataset("volumes/labels/neuron_ids", data=ids).attrs["resolution"] = (40.0, 4.0, 4.0)
    out = tmp_path / "cremi.json"

    code, stdout, err = run_tiny(capsys, "cremi", path, "fgnet", out)
    assert code == 0, err
    assert "CREMI score" in stdout and "sample_A_20160501" in stdout
    scores = json.loads(out.read_text())["per_case"]["sample_A_20160501"]
    assert all(scores[k] >= 0 and math.isfinite(scores[k]) for k in ("voi_split", "voi_merge", "arand", "cremi_score"))
    assert scores["cremi_score"] == pytest.approx(math.sqrt(scores["voi"] * scores["arand"]))


def test_ac3_pair_with_a_section_range(tmp_path, capsys):
    rng = np.random.default_rng(3)
    labels = np.ones((12, 32, 32), np.uint16)
    labels[:, :, 16:] = 2
    labels[:, 15:17] = 0  # membrane: unlabelled
    with h5py.File(tmp_path / "AC3_inputs.h5", "w") as f:
        f["main"] = rng.integers(0, 256, labels.shape, dtype=np.uint8)
    with h5py.File(tmp_path / "AC3_labels.h5", "w") as f:
        f["main"] = labels
    out = tmp_path / "ac3.json"

    code, stdout, err = run_tiny(capsys, "ac3", tmp_path, "fgnet", out, "--sections=-8:")
    assert code == 0, err
    assert "(8, 32, 32) voxels" in err
    result = json.loads(out.read_text())
    assert list(result["per_case"]) == ["AC3"] and result["mean"]["arand"] == result["per_case"]["AC3"]["arand"]


# --- bad input ----------------------------------------------------------------------------------------------------


def test_bad_input_exits_with_one_line_naming_the_problem(tmp_path, capsys):
    common = ["--model-dir", str(tmp_path), "--conf", "backbone", "tiny"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["paper", "--dataset", "brats", "--data", str(tmp_path), "--model", "hf_sam"])
    assert exit_info.value.code == 2 and "invalid choice: 'brats'" in capsys.readouterr().err

    def error(*args: str) -> str:
        code, _, err = run(capsys, *args, *common)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        return err

    assert "is not a folder" in error("--dataset", "synapse", "--data", str(tmp_path / "missing"), "--model", "hf_sam")
    assert "expected test_vol_h5/<case>.npy.h5" in error("--dataset", "synapse", "--data", str(tmp_path), "--model", "hf_sam")

    write_slices_h5(tmp_path / "syn" / "test_vol_h5" / "case0001.npy.h5", np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), image_key="img")
    message = error("--dataset", "synapse", "--data", str(tmp_path / "syn"), "--model", "hf_sam")
    assert "case0001.npy.h5 has no dataset 'image'" in message and "'image' and 'label'" in message
    assert "does not segment synapse" in error("--dataset", "synapse", "--data", str(tmp_path / "syn"), "--model", "fgnet")
    write_slices_h5(tmp_path / "syn" / "test_vol_h5" / "case0001.npy.h5", np.zeros((2, 8, 8)), np.full((2, 8, 8), 9))
    code, _, err = run(capsys, "--dataset", "synapse", "--data", str(tmp_path / "syn"), "--model", "hf_sam", *common)
    assert code == 1 and "case0001.npy.h5: label ids [9.0] are not integers in 0..8" in err.strip().splitlines()[-1]  # found while reading
    message = error("--dataset", "synapse", "--data", str(tmp_path / "syn"), "--model", "hf_sam", "--conf", "labels", '{"liver": 1}')
    assert "configured with 1 classes" in message and "synapse has 8" in message

    with h5py.File(tmp_path / "sample_C.hdf", "w") as f:
        f["volumes/raw"] = np.zeros((4, 8, 8), np.uint8)
    message = error("--dataset", "cremi", "--data", str(tmp_path / "sample_C.hdf"), "--model", "fgnet")
    assert "no dataset 'volumes/labels/neuron_ids'" in message
    assert "expected AC4_inputs.h5 and AC4_labels.h5" in error("--dataset", "ac4", "--data", str(tmp_path), "--model", "fgnet")
    assert "--sections 'x'" in error("--dataset", "ac4", "--data", str(tmp_path), "--sections", "x", "--model", "fgnet")
