"""lib/validation.py on its own: names, JSON fields, train options, and every broken or odd volume of the
`bad_volumes` fixture (tests/conftest.py) refused with a message that names the problem; good volumes accepted."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from lib import validation as v


@pytest.mark.parametrize("name", ["brain_002", "1.2.840.113619.2.55", "case 7", "CT-01_a"])
def test_plain_names_pass(name):
    assert v.check_name(name, "image id") == name


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", ".hidden", "..", "", "  ", "x\x00y", None, 7])
def test_path_like_names_are_refused(name):
    with pytest.raises(v.InvalidInput, match="image id"):
        v.check_name(name, "image id")


def test_unknown_choice_lists_the_valid_names():
    with pytest.raises(v.NotFound, match=r"unknown model 'nosuch'; valid: fgnet, hf_sam") as e:
        v.check_choice("nosuch", ["hf_sam", "fgnet"], "model")
    assert e.value.status_code == 404
    assert v.check_choice("hf_sam", ["hf_sam"], "model") == "hf_sam"


@pytest.mark.parametrize("text,message", [("{bad", "not valid JSON"), ("[1, 2]", "must be a JSON object"), ("null", "got NoneType")])
def test_json_fields_must_be_objects(text, message):
    with pytest.raises(v.InvalidInput, match=message):
        v.parse_json_object(text, "params")


def test_json_object_and_empty_field_parse():
    assert v.parse_json_object('{"label_info": []}', "params") == {"label_info": []}
    assert v.parse_json_object("", "params") == {}


@pytest.mark.parametrize(
    "label_info,message",
    [("grey", "must be a list"), ([{"idx": 1}], "need a 'name'"), ([{"name": "a", "idx": "one"}], "non-negative integer"),
     ([{"name": "a", "idx": -1}], "non-negative integer"), ([{"name": "a", "idx": True}], "non-negative integer")],
)
def test_malformed_label_info_is_refused(label_info, message):
    with pytest.raises(v.InvalidInput, match=message):
        v.check_label_info(label_info)


def test_label_info_ids_may_be_numeric_strings():
    # the trainer's remapping reads idx with int()
    assert v.check_label_info([{"name": "white matter", "idx": "1"}, {"name": "grey matter", "idx": 2}]) == {1: "white matter", 2: "grey matter"}


@pytest.mark.parametrize(
    "options,message",
    [({"max_epochs": "many"}, "max_epochs must be a positive integer"), ({"max_epochs": 0}, "max_epochs"),
     ({"max_epochs": True}, "max_epochs"), ({"lr": -1}, "lr must be a positive number"), ({"lr": "nan"}, "lr"),
     ({"val_split": 1.5}, r"val_split must be a number in \[0, 1\)"), ({"multi_gpu": "maybe"}, "multi_gpu")],
)
def test_bad_train_options_are_refused(options, message):
    with pytest.raises(v.InvalidInput, match=message):
        v.check_train_options(options)


def test_sensible_train_options_pass():
    v.check_train_options({"max_epochs": 3, "lr": "0.0005", "val_split": 0.2, "multi_gpu": "false", "device": "cpu"})


def test_good_image_and_trailing_singleton(bad_volumes):
    grid = v.check_image(str(bad_volumes["image.nii.gz"]))
    reference = nib.load(str(bad_volumes["image.nii.gz"]))
    assert grid.shape == reference.shape
    np.testing.assert_allclose(grid.affine, reference.affine, atol=1e-5)
    assert v.check_image(str(bad_volumes["singleton_4d.nii.gz"])).shape == reference.shape


BAD_IMAGES = {
    "trunc.nii.gz": r"cannot read image 'trunc.nii.gz' \(NIFTI; truncated or corrupt\?\): Compressed file ended",
    "trunc.nii": r"'trunc.nii' is truncated: its header promises \d+ bytes, the file holds \d+",
    "corrupt.nii.gz": "cannot read the header of 'corrupt.nii.gz' as NIFTI",
    "wrong_size.nrrd": "cannot read image 'wrong_size.nrrd' .*Size of the data does not equal the product",
    "bad_header.nrrd": "cannot read image 'bad_header.nrrd' .*bogus",
    "slice.dcm": r"'slice.dcm' is a single slice \(142, 118, 1\): a 2D image",
    "trunc.dcm": r"cannot read image 'trunc.dcm' \(DICOM; truncated or corrupt\?\)",
    "not_dicom.dcm": "cannot read the header of 'not_dicom.dcm' as DICOM",
    "2d.nii.gz": r"'2d.nii.gz' is 2D \(118, 142\)",
    "4d.nii.gz": r"'4d.nii.gz' has 4 dimensions \(40, 40, 20, 3\)",
    "zeros.nii.gz": "'zeros.nii.gz' is empty: every voxel is 0.0",
    "constant.nii.gz": "'constant.nii.gz' is empty: every voxel is 7.0",
    "nan.nii.gz": "'nan.nii.gz' has 1 NaN voxel value",
    "inf.nii.gz": "'inf.nii.gz' has 1 infinite voxel value",
    "huge.nii": "declares 30000x30000x30000 = 27000000000000 voxels",
    "huge.nii.gz": "declares 2048x2048x2048 = 8589934592 voxels",
    "notes.txt": "'notes.txt' is not a volume format this server reads",
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_refused_with_the_reason(name, bad_volumes):
    with pytest.raises(v.InvalidInput, match=BAD_IMAGES[name]) as e:
        v.check_image(str(bad_volumes[name]))
    assert e.value.status_code == 422
    assert str(bad_volumes[name].parent) not in str(e.value)  # the server's paths stay private


def test_good_labels_pass(bad_volumes):
    image = v.check_image(str(bad_volumes["image.nii.gz"]))
    v.check_label(str(bad_volumes["label.nii.gz"]), image, {1, 2})
    v.check_label(str(bad_volumes["label_lps.nrrd"]), image, {1, 2})  # LPS NRRD on the RAS NIfTI's grid
    v.check_label(str(bad_volumes["label_7.nii.gz"]), image, None)  # instance labels: any id
    v.check_label(str(bad_volumes["label_3.nii.gz"]), image, {1, 2}, [{"name": "csf", "idx": 3}, {"name": "wm", "idx": 1}, {"name": "gm", "idx": 2}])
    v.check_label(str(bad_volumes["label_half.nii.gz"]), image, {1, 2}, ids=False)  # a per-voxel map, not ids


BAD_LABELS = {
    "label_shape.nii.gz": r"does not match its image's grid: shape \(116, 142, 125\) differs from the image's \(118, 142, 125\)",
    "label_shift.nii.gz": "does not match its image's grid: affine .* differs",
    "label_spacing.nii.gz": "does not match its image's grid: affine .* differs",
    "label_7.nii.gz": r"holds ids \[7\] that are not in the model's labels \(ids \[1, 2\]",
    "label_neg.nii.gz": r"holds negative ids \[-1\]",
    "label_half.nii.gz": r"holds non-integer values \[0.5\]",
    "label_nan.nii.gz": "holds NaN or infinite values",
    "label_layers.seg.nrrd": r"has 4 dimensions \(3, 118, 142, 125\).*several layers",
    "label_segments_5.seg.nrrd": r"holds ids \[5\] that are not in its segment names \(ids \[1, 2\]",
    "trunc.nii.gz": "cannot read label 'trunc.nii.gz'",
}


@pytest.mark.parametrize("name", sorted(BAD_LABELS))
def test_bad_labels_are_refused_with_the_reason(name, bad_volumes):
    image = v.check_image(str(bad_volumes["image.nii.gz"]))
    with pytest.raises(v.InvalidInput, match=BAD_LABELS[name]):
        v.check_label(str(bad_volumes[name]), image, {1, 2})


def test_label_ids_must_be_named_by_its_label_info(bad_volumes):
    image = v.check_image(str(bad_volumes["image.nii.gz"]))
    with pytest.raises(v.InvalidInput, match=r"holds ids \[3\] that are not in its label_info \(ids \[1, 2\]"):
        v.check_label(str(bad_volumes["label_3.nii.gz"]), image, {1, 2, 3}, [{"name": "wm", "idx": 1}, {"name": "gm", "idx": 2}])


def test_grid_tolerance_is_a_fraction_of_a_voxel():
    affine = np.diag([0.004, 0.004, 0.04, 1.0])  # EM in microns: the tolerance scales with the voxel
    image = v.Grid((10, 10, 10), affine)
    nudged = affine.copy()
    nudged[:3, 3] += 0.001 * np.diag(affine)[:3]
    assert v.same_grid(v.Grid((10, 10, 10), nudged), image) is None
    moved = affine.copy()
    moved[0, 3] += 0.5 * affine[0, 0]
    assert "affine" in v.same_grid(v.Grid((10, 10, 10), moved), image)


def test_a_stored_image_is_checked_again_once_it_changes(bad_volumes, tmp_path):
    path = tmp_path / "volume.nii.gz"
    shutil.copyfile(bad_volumes["image.nii.gz"], path)
    assert v.stored_image_grid(str(path)).shape == (118, 142, 125)
    shutil.copyfile(bad_volumes["nan.nii.gz"], path)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file-system clocks
    with pytest.raises(v.InvalidInput, match="NaN"):
        v.stored_image_grid(str(path))
