"""lib/checks (requests.py, volumes.py) and lib/errors.py on their own: names, JSON fields, train options, and every
broken or odd volume of the `bad_volumes` fixture (tests/conftest.py) refused with a message that names the problem;
good volumes accepted."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from lib import errors
from lib.checks import requests as requests_
from lib.checks import volumes


@pytest.mark.parametrize("name", ["brain_002", "1.2.840.113619.2.55", "case 7", "CT-01_a"])
def test_plain_names_pass(name):
    assert requests_.check_name(name, "image id") == name


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", ".hidden", "..", "", "  ", "x\x00y", None, 7])
def test_path_like_names_are_refused(name):
    with pytest.raises(errors.InvalidInput, match="image id"):
        requests_.check_name(name, "image id")


def test_unknown_choice_lists_the_valid_names():
    with pytest.raises(errors.NotFound, match=r"unknown model 'nosuch'; valid: fgnet, hf_sam") as e:
        requests_.check_choice("nosuch", ["hf_sam", "fgnet"], "model")
    assert e.value.status_code == 404
    assert requests_.check_choice("hf_sam", ["hf_sam"], "model") == "hf_sam"


@pytest.mark.parametrize("text,message", [("{bad", "not valid JSON"), ("[1, 2]", "must be a JSON object"), ("null", "got NoneType")])
def test_json_fields_must_be_objects(text, message):
    with pytest.raises(errors.InvalidInput, match=message):
        requests_.parse_json_object(text, "params")


def test_json_object_and_empty_field_parse():
    assert requests_.parse_json_object('{"label_info": []}', "params") == {"label_info": []}
    assert requests_.parse_json_object("", "params") == {}


@pytest.mark.parametrize(
    "label_info,message",
    [
        ("grey", "must be a list"),
        ([{"idx": 1}], "need a 'name'"),
        ([{"name": "a", "idx": "one"}], "non-negative integer"),
        ([{"name": "a", "idx": -1}], "non-negative integer"),
        ([{"name": "a", "idx": True}], "non-negative integer"),
    ],
)
def test_malformed_label_info_is_refused(label_info, message):
    with pytest.raises(errors.InvalidInput, match=message):
        requests_.check_label_info(label_info)


def test_label_info_ids_may_be_numeric_strings():
    # the trainer's remapping reads idx with int()
    assert requests_.check_label_info([{"name": "white matter", "idx": "1"}, {"name": "grey matter", "idx": 2}]) == {
        1: "white matter",
        2: "grey matter",
    }


@pytest.mark.parametrize(
    "options,message",
    [
        ({"max_epochs": "many"}, "max_epochs must be a positive integer"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"max_epochs": True}, "max_epochs"),
        ({"lr": -1}, "lr must be a positive number"),
        ({"lr": "nan"}, "lr"),
        ({"val_split": 1.5}, r"val_split must be a number in \[0, 1\)"),
        ({"multi_gpu": "maybe"}, "multi_gpu"),
    ],
)
def test_bad_train_options_are_refused(options, message):
    with pytest.raises(errors.InvalidInput, match=message):
        requests_.check_train_options(options)


def test_sensible_train_options_pass():
    requests_.check_train_options({"max_epochs": 3, "lr": "0.0005", "val_split": 0.2, "multi_gpu": "false", "device": "cpu"})


def test_good_image_and_trailing_singleton(bad_volumes):
    grid = volumes.check_image(str(bad_volumes["image.nii.gz"]))
    reference = nib.load(str(bad_volumes["image.nii.gz"]))
    assert grid.shape == reference.shape
    np.testing.assert_allclose(grid.affine, reference.affine, atol=1e-5)
    assert volumes.check_image(str(bad_volumes["singleton_4d.nii.gz"])).shape == reference.shape


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
    with pytest.raises(errors.InvalidInput, match=BAD_IMAGES[name]) as e:
        volumes.check_image(str(bad_volumes[name]))
    assert e.value.status_code == 422
    assert str(bad_volumes[name].parent) not in str(e.value)  # the server's paths stay private


def test_good_labels_pass(bad_volumes):
    image = volumes.check_image(str(bad_volumes["image.nii.gz"]))
    volumes.check_label(str(bad_volumes["label.nii.gz"]), image, {1, 2})
    volumes.check_label(str(bad_volumes["label_lps.nrrd"]), image, {1, 2})  # LPS NRRD on the RAS NIfTI's grid
    volumes.check_label(str(bad_volumes["label_7.nii.gz"]), image, None)  # instance labels: any id
    volumes.check_label(
        str(bad_volumes["label_3.nii.gz"]), image, {1, 2}, [{"name": "csf", "idx": 3}, {"name": "wm", "idx": 1}, {"name": "gm", "idx": 2}]
    )
    volumes.check_label(str(bad_volumes["label_half.nii.gz"]), image, {1, 2}, ids=False)  # a per-voxel map, not ids


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
    image = volumes.check_image(str(bad_volumes["image.nii.gz"]))
    with pytest.raises(errors.InvalidInput, match=BAD_LABELS[name]):
        volumes.check_label(str(bad_volumes[name]), image, {1, 2})


def test_label_ids_must_be_named_by_its_label_info(bad_volumes):
    image = volumes.check_image(str(bad_volumes["image.nii.gz"]))
    with pytest.raises(errors.InvalidInput, match=r"holds ids \[3\] that are not in its label_info \(ids \[1, 2\]"):
        volumes.check_label(str(bad_volumes["label_3.nii.gz"]), image, {1, 2, 3}, [{"name": "wm", "idx": 1}, {"name": "gm", "idx": 2}])


def test_grid_tolerance_is_a_fraction_of_a_voxel():
    affine = np.diag([0.004, 0.004, 0.04, 1.0])  # EM in microns: the tolerance scales with the voxel
    image = volumes.Grid((10, 10, 10), affine)
    nudged = affine.copy()
    nudged[:3, 3] += 0.001 * np.diag(affine)[:3]
    assert volumes.same_grid(volumes.Grid((10, 10, 10), nudged), image) is None
    moved = affine.copy()
    moved[0, 3] += 0.5 * affine[0, 0]
    assert "affine" in volumes.same_grid(volumes.Grid((10, 10, 10), moved), image)


def test_volumes_keep_their_geometry_while_a_training_run_in_this_process_tracks_no_meta(bad_volumes):
    """A run_sync training inside the server turns MONAI's process-wide meta tracking off; a request read meanwhile
    once failed with 500 ('Tensor' object has no attribute 'affine')."""
    from monai.data import get_track_meta, set_track_meta

    path = str(bad_volumes["image.nii.gz"])
    tracked = volumes.read_volume(path, "image")[1]
    set_track_meta(False)
    try:
        untracked = volumes.read_volume(path, "image")[1]
    finally:
        set_track_meta(True)
    assert get_track_meta() and untracked.shape == tracked.shape and np.array_equal(untracked.affine, tracked.affine)


def test_a_stored_image_is_checked_again_once_it_changes(bad_volumes, tmp_path):
    path = tmp_path / "volume.nii.gz"
    shutil.copyfile(bad_volumes["image.nii.gz"], path)
    assert volumes.stored_image_grid(str(path)).shape == (118, 142, 125)
    shutil.copyfile(bad_volumes["nan.nii.gz"], path)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file-system clocks
    with pytest.raises(errors.InvalidInput, match="NaN"):
        volumes.stored_image_grid(str(path))


# ---- limits on what a client names and sends ------------------------------------------------------------------
@pytest.mark.parametrize("name,message", [("a" * 129, "129 bytes long; at most 128"), ("é" * 65, "130 bytes long")])
def test_names_are_bounded_in_bytes(name, message):
    with pytest.raises(errors.InvalidInput, match=message):
        requests_.check_name(name, "image id")
    assert requests_.check_name("a" * 128, "image id")


@pytest.mark.parametrize(
    "filename,message",
    [
        ("a\x00b.nii.gz", "control characters"),
        ("x" * 256, "longer than 255 bytes"),
        ("a." + "x" * 20, "at most 16 characters"),
        (7, "must be a string"),
    ],
)
def test_upload_file_names_are_checked(filename, message):
    with pytest.raises(errors.InvalidInput, match=message):
        requests_.check_filename(filename, "image")
    assert requests_.check_filename("brain 002.seg.nrrd", "label") == "brain 002.seg.nrrd"
    assert requests_.check_filename(None, "image") == ""


@pytest.mark.parametrize(
    "text,message",
    [
        ("[" * 10_000 + "]" * 10_000, "nested deeper than 32 levels"),
        ('{"a": ' + "[" * 40 + "]" * 40 + "}", "nested deeper"),
        ('{"a": "' + "x" * (1 << 20) + '"}', "bytes of JSON; at most 1048576"),
    ],
)
def test_json_fields_are_bounded_in_depth_and_size(text, message):
    with pytest.raises(errors.InvalidInput, match=message):
        requests_.parse_json_object(text, "params")


def test_task_options_are_bounded_and_repeat_the_url():
    assert requests_.check_options(None, "train options") == {}
    with pytest.raises(errors.InvalidInput, match="16393 bytes of JSON; at most 16384"):
        requests_.check_options({"a": "x" * 16384}, "train options")
    with pytest.raises(errors.InvalidInput, match="must be a JSON object, got list"):
        requests_.check_options([1], "train options")
    requests_.check_same({"model": "hf_sam"}, "model", "hf_sam", "train options")
    with pytest.raises(errors.InvalidInput, match="model '../x' in the train options differs from the model 'hf_sam' the URL names"):
        requests_.check_same({"model": "../x"}, "model", "hf_sam", "train options")


@pytest.mark.parametrize(
    "options,message",
    [
        ({"name": "../run"}, "name must be a plain name"),
        ({"tracking_uri": "file:///tmp/x"}, "tracking_uri must be empty"),
        ({"train_ds": "/etc/passwd"}, "may not set train_ds"),
        ({"distributed_url": "file:///tmp/x"}, "may not set distributed_url"),
        ({"gpus": "0;ls"}, "gpus must be"),
        ({"device": ["cpu", "tpu"]}, "device must be"),
        ({"dataset": "EvilDataset"}, "dataset must be one of"),
    ],
)
def test_train_options_naming_server_paths_are_refused(options, message):
    with pytest.raises(errors.InvalidInput, match=message):
        requests_.check_train_options(options)


def test_the_trainer_config_clients_echo_passes():
    """3D Slicer sends the first value of each option of the trainer's config (MONAI Label's defaults)."""
    requests_.check_train_options(
        {
            "name": "train_01",
            "pretrained": True,
            "device": ["cpu"],
            "max_epochs": 50,
            "early_stop_patience": -1,
            "val_split": 0.2,
            "train_batch_size": 1,
            "val_batch_size": 1,
            "multi_gpu": True,
            "gpus": "all",
            "dataset": "SmartCacheDataset",
            "dataloader": "ThreadDataLoader",
            "tracking": "None",
            "tracking_uri": "",
            "tracking_experiment_name": "",
        }
    )


@pytest.mark.parametrize(
    "params,message",
    [
        ({"image": "/etc/hostname"}, "differs from the image 'brain_002'"),
        ({"model": "fgnet"}, "differs from the model 'hf_sam'"),
        ({"image_path": "/etc/hostname"}, "may not set image_path"),
        ({"save_label": True}, "may not set save_label"),
        ({"result_extension": ".exe"}, "result_extension must be one of"),
        ({"result_dtype": "complex64"}, "result_dtype must be"),
        ({"foreground": [[1, 2, float("inf")]]}, "foreground must be"),
        ({"roi": [0, 0, 1, 1, 0]}, "roi must be"),
        ({"batch_size": 0}, "batch_size must be an integer in 1..256"),
        ({"label_info": "white"}, "label_info must be a list"),
    ],
)
def test_infer_params_keep_the_image_and_server_keys(params, message):
    with pytest.raises(errors.InvalidInput, match=message):
        requests_.check_infer_params(params, "brain_002", "hf_sam", TASK_OPTIONS)


TASK_OPTIONS = ("device", "batch_size", "modality")  # what hf_sam's tasks show as their config


def test_what_slicer_and_ohif_send_passes_typed_and_the_rest_is_listed_as_ignored():
    sent = {
        "image": "brain_002",
        "device": "cpu",
        "batch_size": "2",
        "modality": "auto",
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
        "result_compress": "false",
        "restore_label_idx": False,
        "label": "white matter",
        "foreground": [[10, 20, 30.5]],
        "background": [],
        "roi": [],
        "slice": 3,
        "client_id": "user-xyz",
        "white matter": [[1, 2, 3]],
        "max_epoch": 3,
    }
    params, ignored = requests_.check_infer_params(sent, "brain_002", "hf_sam", TASK_OPTIONS)
    assert ignored == ["max_epoch", "restore_label_idx", "white matter"]
    assert params == {
        **{k: x for k, x in sent.items() if k not in ignored},
        "batch_size": 2,
        "result_compress": False,
    }
    # monailabel.client.MONAILabelClient adds its client id to every request, None unless one was given
    assert requests_.check_infer_params({"client_id": None}, "brain_002", "hf_sam", TASK_OPTIONS) == ({"client_id": None}, [])
    requests_.check_train_options({"client_id": None, "max_epochs": 1})


def test_unknown_train_options_are_refused_with_the_nearest_name():
    with pytest.raises(errors.InvalidInput, match=r"'max_epoch' is not one of the train options: .*did you mean 'max_epochs'"):
        requests_.check_train_options({"max_epoch": 1, "lr": 0.001})


@pytest.mark.parametrize(
    "value,message",
    [("CRC32:ab", "algorithm 'CRC32' is not supported"), ("SHA256:xyz", "not a SHA256 hex digest"), ("MD5:" + "a" * 64, "32 hex digits")],
)
def test_checksums_name_a_supported_algorithm(value, message):
    with pytest.raises(errors.InvalidInput, match=message):
        requests_.check_checksum(value)
    requests_.check_checksum("a" * 64)
    requests_.check_checksum("MD5:" + "b" * 32)


@pytest.mark.parametrize("data_file", ["../../../etc/hostname", "/etc/hostname"])
def test_detached_nrrd_headers_are_refused_unread(tmp_path, data_file):
    path = tmp_path / "volume.nrrd"
    path.write_text(f"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: {data_file}\n\n")
    with pytest.raises(errors.InvalidInput, match="voxels lie in another file"):
        volumes.check_image(str(path))


@pytest.mark.parametrize("fill,message", [(np.nan, "affine that is not finite"), (0.0, "affine that is not invertible")])
def test_broken_affines_are_refused(tmp_path, bad_volumes, fill, message):
    ref = nib.load(bad_volumes["image.nii.gz"])
    header = ref.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(ref.affine, code=1)
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row][:3] = fill
    nib.save(nib.Nifti1Image(np.asarray(ref.dataobj), None, header), str(tmp_path / "broken.nii.gz"))
    with pytest.raises(errors.InvalidInput, match=message):
        volumes.check_image(str(tmp_path / "broken.nii.gz"))
