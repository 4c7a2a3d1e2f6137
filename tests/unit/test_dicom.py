"""DICOM without a PACS: volumes to DICOM series (scripts/upload_dicom.py) and labels to DICOM SEG (lib/dicom_seg.py),
read back the way MONAI Label reads them (SimpleITK/GDCM for series, pydicom-seg for SEG)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom_seg
import pytest
import SimpleITK as sitk

from lib.dicom_seg import segment_names, write_dicom_seg

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from upload_dicom import volume_to_series  # noqa: E402

MODEL_LABELS = {"white matter": 1, "grey matter": 2}


@pytest.fixture
def oblique_volume(tmp_path):
    """A small anisotropic, rotated MR-like volume and a label on its grid (ids 1 and 2)."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 900, size=(20, 16, 6)).astype(np.int16)
    label = np.zeros(data.shape, dtype=np.uint8)
    label[4:12, 3:9, 1:4] = 1
    label[12:18, 8:14, 2:6] = 2
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 3.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    image_path, label_path = tmp_path / "case.nii.gz", tmp_path / "case_label.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(image_path))
    nib.save(nib.Nifti1Image(label, affine), str(label_path))
    return image_path, label_path


def write_series(datasets, folder) -> None:
    folder.mkdir()
    for i, ds in enumerate(datasets):
        ds.save_as(str(folder / f"{i}.dcm"))


def test_volume_to_series_keeps_the_geometry_and_values(oblique_volume, tmp_path):
    image_path, _ = oblique_volume
    datasets = volume_to_series(image_path)
    assert len(datasets) == 6 and len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert [ds.SOPInstanceUID for ds in volume_to_series(image_path)] == [ds.SOPInstanceUID for ds in datasets]  # stable UIDs
    write_series(datasets, tmp_path / "series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    series, original = reader.Execute(), sitk.ReadImage(str(image_path))
    assert series.GetSize() == original.GetSize()
    np.testing.assert_allclose(series.GetSpacing(), original.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(series.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(series.GetDirection(), original.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(series), sitk.GetArrayFromImage(original))


def test_volume_to_series_refuses_what_dicom_cannot_hold(tmp_path):
    path = tmp_path / "float.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), 1e6, dtype=np.float32), np.eye(4)), str(path))
    with pytest.raises(ValueError, match="16-bit"):
        volume_to_series(path)
    nib.save(nib.Nifti1Image(np.zeros((4, 4), dtype=np.int16), np.eye(4)), str(path))
    with pytest.raises(ValueError, match="3D single-channel"):
        volume_to_series(path)


def test_dicom_seg_holds_the_label_on_its_series(oblique_volume, tmp_path):
    image_path, label_path = oblique_volume
    datasets = volume_to_series(image_path)
    random.Random(0).shuffle(datasets)  # instances come from a PACS in any order
    write_series(datasets, tmp_path / "series")

    seg_path = write_dicom_seg(str(tmp_path / "series"), str(label_path), [{"name": "grey matter", "idx": 2}], MODEL_LABELS)
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["white matter", "grey matter"]  # id 1 named by the model

    # MONAI Label's reader (pydicom-seg) gives back the label voxel for voxel, on the image's grid
    result = pydicom_seg.MultiClassReader().read(seg)
    original = sitk.ReadImage(str(label_path))
    np.testing.assert_allclose(result.image.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(result.image.GetDirection(), original.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(result.image), sitk.GetArrayFromImage(original))


def test_dicom_seg_edge_cases(oblique_volume, tmp_path):
    image_path, label_path = oblique_volume
    write_series(volume_to_series(image_path), tmp_path / "series")
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 16, 6), dtype=np.uint8), nib.load(str(label_path)).affine), str(empty))
    assert write_dicom_seg(str(tmp_path / "series"), str(empty), None) == ""
    other = tmp_path / "other_grid.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 16, 6), dtype=np.uint8), np.diag([1, 1, 1, 1.0])), str(other))
    with pytest.raises(ValueError, match="outside the label volume|does not match"):
        write_dicom_seg(str(tmp_path / "series"), str(other), None)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no DICOM instances"):
        write_dicom_seg(str(tmp_path / "nothing"), str(label_path), None)
    assert segment_names([1, 2, 7], [{"name": "a"}, {"name": "b", "idx": 2}], {"x": 1}) == {1: "a", 2: "b", 7: "segment 7"}
