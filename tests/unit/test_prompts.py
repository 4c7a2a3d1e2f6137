"""Client prompts (voxel indices of the stored image) -> SAM prompts on the slices the model sees, through the
real inference transforms of a non-RAS, anisotropic volume; and prompts reaching both networks' prompted decoding
while the prompt-free one stays as it was."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from lib.class_text import ClassTextEmbedder, class_prompts
from lib.configs import SAM_MODELS
from lib.networks.hf_sam import HFSam
from lib.networks.masg_sam import MASGSam
from lib.networks.sam_backbone import get_encoder_spec
from lib.networks.sam_segmenter import Prompts, SamSegmenter, build_segmenter
from lib.transforms import inference_transforms
from lib.transforms.prompts import batch_prompts, slice_prompts

S = get_encoder_spec("tiny").img_size
SHAPE = (40, 30, 12)  # in-plane size other than the model size, and not square
# LPS storage (world x falls with i, y falls with j), anisotropic spacing, origin off zero
AFFINE = np.array(
    [
        [-1.5, 0.0, 0.0, 31.0],
        [0.0, -1.5, 0.0, -7.0],
        [0.0, 0.0, 2.0, -12.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
POINT = (25, 10, 7)  # a blob is centred here, so the image content says where the point should land


def _blob() -> np.ndarray:
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    blob = np.exp(-((i - POINT[0]) ** 2 + (j - POINT[1]) ** 2) / (2 * 3.0**2)) * (k == POINT[2])
    return (100.0 * blob + 0.5 * k).astype(np.float32)  # MR-like, non-negative


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    assert nib.aff2axcodes(AFFINE) == ("L", "P", "S")
    path = tmp_path_factory.mktemp("prompts") / "image.nii.gz"
    nib.save(nib.Nifti1Image(_blob(), AFFINE), path)
    image = Compose(inference_transforms(S, "MR"))({"image": str(path)})["image"]
    assert image.shape == (1, S, S, SHAPE[2])
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    return image


def _expected(ijk) -> tuple[float, float, int]:
    """(x = column, y = row, slice) in the model's volume, computed from the geometry alone: world position of
    the voxel; RAS volume = same grid with axes 0 and 1 reversed (origin at the far corner); in-plane resize of
    a voxel-centred grid by S / size; the axial axis is kept."""
    world = AFFINE @ np.array([*ijk, 1.0])
    spacing = np.abs(np.diag(AFFINE)[:3])
    ras_origin = AFFINE @ np.array([SHAPE[0] - 1, SHAPE[1] - 1, 0, 1.0])  # the voxel that becomes index 0
    ras_index = (world[:3] - ras_origin[:3]) / spacing
    row = (ras_index[0] + 0.5) * S / SHAPE[0] - 0.5
    col = (ras_index[1] + 0.5) * S / SHAPE[1] - 0.5
    return col, row, int(round(ras_index[2]))


def test_expectation_helper_flips_the_lps_axes():
    col, row, k = _expected((0, 0, 3))
    assert k == 3
    assert row == pytest.approx(S - 1 - (0.5 * S / SHAPE[0] - 0.5))  # the first stored row is the last RAS row
    assert col == pytest.approx(S - 1 - (0.5 * S / SHAPE[1] - 0.5))


def test_foreground_point_lands_on_the_right_slice_and_pixel(volume):
    prompted = slice_prompts(volume, {"foreground": [list(POINT)]})
    col, row, k = _expected(POINT)
    assert k == POINT[2]
    assert list(prompted) == [k]
    assert prompted[k]["box"] is None
    [(x, y, label)] = prompted[k]["points"]
    assert label == 1
    assert abs(x - col) <= 1.0 and abs(y - row) <= 1.0, ((x, y), (col, row))

    # and the image content agrees: the blob's centre of mass on that slice is at the prompt
    plane = volume[0, :, :, k].numpy()
    assert plane.max() > 0.9  # the blob is on this slice
    rows, cols = np.indices(plane.shape)
    w = np.clip(plane - 0.3, 0, None)  # the blob, above the flat background of the slice
    assert abs((w * cols).sum() / w.sum() - x) <= 1.0
    assert abs((w * rows).sum() / w.sum() - y) <= 1.0
    assert volume[0, :, :, k - 1].max() < 0.5  # neighbouring slices do not hold it


def test_several_points_and_background(volume):
    fg = [[5, 3, 2], [33, 26, 2], [20, 15, 9]]
    bg = [[12, 20, 2]]
    prompted = slice_prompts(volume, {"foreground": fg, "background": bg})
    assert sorted(prompted) == [2, 9]
    got = prompted[2]["points"]
    assert [p[2] for p in got] == [1, 1, 0]
    for (x, y, _), ijk in zip(got, [*fg[:2], *bg]):
        col, row, _ = _expected(ijk)
        assert abs(x - col) <= 1.0 and abs(y - row) <= 1.0
    assert len(prompted[9]["points"]) == 1 and prompted[9]["points"][0][2] == 1
    assert all(0 <= v <= S - 1 for x, y, _ in got for v in (x, y))


def slicer_roi(i0, j0, i1, j1, k0, k1) -> list:
    """An roi as 3D Slicer's MONAI Label module sends it (getROIPointsXYZ): minimum and maximum per axis."""
    return [i0, i1, j0, j1, k0, k1]


def test_roi_gives_a_box_on_every_slice_of_its_range(volume):
    roi = slicer_roi(10, 5, 30, 20, 3, 6)
    prompted = slice_prompts(volume, {"roi": roi})
    assert sorted(prompted) == [3, 4, 5, 6]  # and nowhere else
    c_a, r_a, _ = _expected((10, 5, 3))
    c_b, r_b, _ = _expected((30, 20, 6))
    expected = (min(c_a, c_b), min(r_a, r_b), max(c_a, c_b), max(r_a, r_b))
    for k in range(3, 7):
        box = prompted[k]["box"]
        assert prompted[k]["points"] == []
        assert box[0] < box[2] and box[1] < box[3]
        assert np.allclose(box, expected, atol=1.0), (box, expected)
    # Slicer's order of corners does not matter
    assert slice_prompts(volume, {"roi": [30, 10, 20, 5, 6, 3]}) == prompted


def test_roi_and_points_together(volume):
    prompted = slice_prompts(volume, {"roi": slicer_roi(10, 5, 30, 20, 4, 4), "foreground": [[20, 10, 4]], "background": [[20, 10, 8]]})
    assert sorted(prompted) == [4, 8]
    assert prompted[4]["box"] is not None and len(prompted[4]["points"]) == 1
    assert prompted[8]["box"] is None and prompted[8]["points"][0][2] == 0


def test_no_prompts(volume):
    assert slice_prompts(volume, {}) == {}
    assert slice_prompts(volume, {"foreground": [], "background": None, "roi": []}) == {}


def test_invalid_prompts(volume):
    with pytest.raises(ValueError, match="foreground"):
        slice_prompts(volume, {"foreground": [[1, 2], [3, 4], [5, 6]]})
    with pytest.raises(ValueError, match="background"):
        slice_prompts(volume, {"background": [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]})
    with pytest.raises(ValueError, match="roi"):
        slice_prompts(volume, {"roi": [1, 2, 3, 4]})
    with pytest.raises(ValueError, match="roi"):
        slice_prompts(volume, {"roi": [1, 2, 3, 4, 5, 6, 7]})


def test_single_point_with_two_coordinates_names_the_key(volume):
    with pytest.raises(ValueError, match="foreground"):
        slice_prompts(volume, {"foreground": [[1, 2]]})


@pytest.mark.parametrize(
    "request_,message",
    [
        ({"foreground": [[5, 5, -3]]}, "outside the volume"),
        ({"background": [[5, 5, SHAPE[2] + 4]]}, "outside the volume"),
        ({"foreground": [[-20, 5, 5]]}, "outside the volume"),
        ({"foreground": [[5, SHAPE[1] + 10, 5]]}, "outside the volume"),
        ({"foreground": [[5, 5, float("nan")]]}, "voxel indices"),
        ({"roi": slicer_roi(1, 1, 5, 5, 20, 30)}, "'roi'.*outside the volume"),
    ],
)
def test_prompts_outside_the_volume_are_refused(volume, request_, message):
    """A point or roi off the volume was placed on something else (another volume, a wrong axis order)."""
    with pytest.raises(ValueError, match=message):
        slice_prompts(volume, request_)


def test_an_roi_overlapping_the_end_is_clipped(volume):
    assert sorted(slice_prompts(volume, {"roi": slicer_roi(1, 1, 5, 5, 9, 30)})) == [9, 10, 11]


# -------------------------------------------------------------------------------------------- batch_prompts


def test_batch_prompts_pads_points_and_box_corners():
    p = batch_prompts([{"points": [(10.0, 20.0, 1), (30.5, 40.0, 0)], "box": (1.0, 2.0, 30.0, 40.0)}, {"points": [], "box": None}], "cpu")
    assert isinstance(p, Prompts)
    assert p.points.shape == (2, 4, 2) and p.points.dtype == torch.float32
    assert p.point_labels.tolist() == [[1, 0, 2, 3], [-1, -1, -1, -1]]  # SAM's box corners, then padding
    assert p.points[0].tolist() == [[10.0, 20.0], [30.5, 40.0], [1.0, 2.0], [30.0, 40.0]]  # (x, y) kept in order
    assert p.masks is None


# ------------------------------------------------------------------------------------- prompts reach models


@pytest.fixture(scope="module", params=SAM_MODELS)
def network(request):
    if request.param == "hf_sam":
        return build_segmenter(HFSam, "tiny", 3).eval()
    text = ClassTextEmbedder(tiny=True).embed(class_prompts(["white matter", "grey matter"], "MR"))
    return build_segmenter(MASGSam, "tiny", 3, class_text=text).eval()


def test_prompts_change_the_prompted_decoding_only(network, volume):
    k = POINT[2]
    image = volume.as_tensor()[None, ..., k]  # (1, 1, S, S), as the infer task slices it
    prompted = slice_prompts(volume, {"foreground": [list(POINT)], "background": [[5, 5, k]]})
    box = slice_prompts(volume, {"roi": slicer_roi(15, 2, 35, 18, k, k)})[k]
    with torch.no_grad():
        plain = network(image)
        with_points = network(image, batch_prompts([prompted[k]], "cpu"))
        with_box = network(image, batch_prompts([box], "cpu"))
        moved = network(image, batch_prompts([{"points": [(p[0] + 60.0, p[1], p[2]) for p in prompted[k]["points"]], "box": None}], "cpu"))
    assert plain.shape == (1, 3, S, S) and with_points.shape == with_box.shape == (1, 6, S, S)
    for prompted_run in (with_points, with_box, moved):
        torch.testing.assert_close(prompted_run[:, :3], plain)  # the automatic segmentation is what it was
    assert not torch.allclose(with_points[:, 3:], plain, atol=1e-4)
    assert not torch.allclose(with_box[:, 3:], with_points[:, 3:], atol=1e-4)
    assert not torch.allclose(moved[:, 3:], with_points[:, 3:], atol=1e-4)  # where the point is matters


def test_mask_prompt_counts_only_where_valid(network, volume):
    image = volume.as_tensor()[None, ..., POINT[2]].expand(2, -1, -1, -1)
    grid = network.prompt_encoder.mask_input_size
    masks = torch.randn(2, 1, *grid) * 8
    points = {"points": [(20.0, 30.0, 1)], "box": None}
    with torch.no_grad():
        embedding, features = network.prepare(image)
        none = network.decode_prompted(embedding, features, batch_prompts([points] * 2, "cpu"))
        half = network.decode_prompted(embedding, features, batch_prompts([points] * 2, "cpu", masks, torch.tensor([True, False])))
    assert not torch.allclose(half[0], none[0], atol=1e-4)
    torch.testing.assert_close(half[1], none[1])


def test_object_logit_is_the_class_against_the_rest():
    logits = torch.randn(2, 3, 4, 4)
    z = SamSegmenter.object_logit(logits, torch.tensor([1, 2]))
    assert z.shape == (2, 1, 4, 4)
    softmax = torch.softmax(logits, dim=1)
    torch.testing.assert_close(torch.sigmoid(z[0, 0]), softmax[0, 1])
    torch.testing.assert_close(torch.sigmoid(z[1, 0]), softmax[1, 2])


def test_an_roi_partly_outside_the_plane_is_clipped(volume):
    size = volume.shape[1]
    boxes = {p["box"] for p in slice_prompts(volume, {"roi": slicer_roi(-10, -10, 5, 5, 3, 4)}).values()}
    assert len(boxes) == 1
    (box,) = boxes
    assert all(0 <= v <= size - 1 for v in box)


def test_prompted_components_keeps_what_the_prompts_touch():
    from lib.infers.interactive import prompted_components

    mask = np.zeros((20, 20, 6), dtype=bool)
    mask[2:5, 2:5, 1:4] = True  # lesion A, slices 1-3
    mask[10:14, 10:14, 2:5] = True  # lesion B, slices 2-4
    mask[5, 5, 4] = True  # touches A only through a corner (26-connected)
    point_a = {"points": [(3.0, 3.0, 1)], "box": None}  # (x, y, label)
    only_a = mask.copy()
    only_a[10:14, 10:14] = False
    assert (prompted_components(mask, {2: point_a}) == only_a).all()
    both = prompted_components(mask, {1: point_a, 4: {"points": [(11.0, 12.0, 1)], "box": None}})
    assert (both == mask).all()  # two clicks, two lesions
    background_only = {"points": [(11.0, 12.0, 0)], "box": None}
    assert not prompted_components(mask, {3: background_only}).any()
    boxed = prompted_components(mask, {3: {"points": [], "box": (9.0, 9.0, 15.0, 15.0)}})
    assert boxed[10:14, 10:14, 2:5].all() and not boxed[:6, :6].any()
