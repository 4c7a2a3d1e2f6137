"""The CVPR 2025 interactive challenge's box, click and scores (lib.evaluation) on worked examples, worked out by hand
from its evaluation code (CVPR25_iter_eval.py, get_boxes.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lib.evaluation import BOX_SEED, CLICK_SEED, challenge_box, challenge_click, challenge_scores, interaction_auc


def test_a_click_goes_to_the_centre_of_the_largest_error_and_says_which_kind():
    target = np.zeros((12, 12, 12), bool)
    target[2:7, 2:7, 2:7] = True  # a 5-voxel cube
    assert challenge_click(target, target) is None
    stray = np.zeros_like(target)
    stray[9, 9, 9] = True  # the cube missed (125 voxels) and a one-voxel over-segmentation: the cube is larger
    assert challenge_click(stray, target) == ((4, 4, 4), True)
    over = target.copy()
    over[8:12, 0:12, 0:12] = True  # 576 voxels wrongly segmented, larger than the cube
    (z, y, x), foreground = challenge_click(over, target)
    assert not foreground and 9 <= z <= 10 and over[z, y, x] and not target[z, y, x]


def test_the_volume_edge_counts_as_outside_the_error_and_ties_fall_to_the_official_seed():
    pred = np.zeros((9, 9, 9), bool)
    pred[0:3] = True  # a slab on the volume's edge: 3 voxels thick, 9 x 9 wide
    # Distance to outside the component: 2 on the middle layer z = 1 for every y, x in 1..7 (49 ties in C order).
    ties = [(1, y, x) for y in range(1, 8) for x in range(1, 8)]
    expected = ties[np.random.RandomState(CLICK_SEED).choice(len(ties))]
    assert challenge_click(pred, np.zeros_like(pred)) == (expected, False)
    np.random.seed(CLICK_SEED)  # as the official code draws it: the global generator, seeded before each click
    assert expected == ties[np.random.choice(len(ties))]


def test_the_box_is_on_the_middle_voxels_slice_with_the_z_range_and_a_scaled_jitter():
    mask = np.zeros((8, 512, 512), bool)
    mask[3, 100, 100] = mask[4, 100, 100] = True
    mask[5, 200:210, 300] = True  # 12 voxels: the 7th in C order (index 6) is on z = 5, not on the middle slice 4
    shift = 2 * np.random.RandomState(BOX_SEED).randint(0, 6, 1)[0]  # 0..5 pixels, x 512 / 256
    box = challenge_box(mask, np.random.RandomState(BOX_SEED))
    assert box == {
        "z_min": 3,
        "z_max": 5,
        "z_mid": 5,
        "z_mid_x_min": 300 - shift,
        "z_mid_y_min": 200 - shift,
        "z_mid_x_max": 300 + shift,
        "z_mid_y_max": 209 + shift,
    }


def test_scores_are_the_mean_over_the_target_classes_with_nsd_at_2_mm():
    target = np.zeros((16, 16, 16), np.int64)
    target[2:8, 2:8, 2:8] = 1
    target[9:15, 9:15, 9:15] = 2
    assert challenge_scores(target, target, (1.0, 1.0, 1.0)) == (1.0, 1.0)
    assert challenge_scores(target, np.zeros_like(target), (1.0, 1.0, 1.0)) == (0.0, 0.0)
    only_one = np.where(target == 1, 1, 0)
    assert challenge_scores(target, only_one, (1.0, 1.0, 1.0)) == (0.5, 0.5)  # class 2: Dice 0, NSD 0
    shifted = np.roll(target, 1, axis=0)  # every surface moves 1 voxel along z
    dsc, nsd = challenge_scores(target, shifted, (1.0, 1.0, 1.0))
    assert dsc == pytest.approx(2 * 5 / 12) and nsd == 1.0  # 1 mm is within the tolerance
    _, coarse = challenge_scores(target, shifted, (3.0, 1.0, 1.0))
    assert coarse < 1.0  # 3 mm is not: the z faces miss


def test_dice_at_or_below_0_2_counts_nsd_as_zero():
    target = np.zeros((10, 10, 10), np.int64)
    target[0:10, 0:10, 0:5] = 1
    sliver = np.zeros_like(target)
    sliver[0:10, 0:10, 0:1] = 1  # Dice 2 * 100 / 600 = 0.33: NSD computed; a thinner one would not be
    assert challenge_scores(target, sliver, (1.0, 1.0, 1.0))[1] > 0
    dot = np.zeros_like(target)
    dot[0:5, 0:5, 0:1] = 1  # Dice 2 * 25 / 525 < 0.2
    assert challenge_scores(target, dot, (1.0, 1.0, 1.0))[1] == 0.0


def test_auc_is_the_trapezoid_over_the_five_clicks_only():
    from scipy.integrate import cumulative_trapezoid

    scores = [0.1, 0.5, 0.6, 0.7, 0.8, 0.9]  # the box step's 0.1 is not part of it
    assert interaction_auc(scores) == pytest.approx(0.7 + 0.6 + 0.7 + 0.8)
    assert interaction_auc(scores) == pytest.approx(cumulative_trapezoid(np.array(scores[-5:]), np.arange(5))[-1])
