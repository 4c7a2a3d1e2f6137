"""Tests for the EM part of scripts/prepare_sample_data.py on small volumes (2 volumes of 96 x 96 x 10 voxels)."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_dilation
from skimage.measure import label as connected_components
from skimage.segmentation import find_boundaries
from test_sample_data import _arrays, _mtimes, psd

SMALL = {"count": 2, "labelled": 1, "shape": (96, 96, 10)}
NAMES = ["em_000.nii.gz", "em_001.nii.gz"]


def _in_plane_boundaries(labels: np.ndarray) -> np.ndarray:
    return np.stack([find_boundaries(labels[..., k], mode="thick") for k in range(labels.shape[2])], axis=-1)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("em")
    return out, psd.generate_em(out, seed=0, **SMALL)


def test_layout_and_manifest(generated):
    out, manifest = generated
    ds, gt = out / "em-neurons", out / "em-neurons-groundtruth"
    assert sorted(p.name for p in ds.glob("*.nii.gz")) == NAMES
    # Only the first `labelled` volumes are annotated inside the datastore; the ground truth covers all.
    assert sorted(p.name for p in (ds / "labels" / "final").iterdir()) == ["em_000.nii.gz"]
    assert sorted(p.name for p in gt.iterdir()) == [*NAMES, "manifest.json"]
    assert not list(ds.rglob("*.json"))
    assert not list(out.rglob(".*partial*")), "temporary files must be renamed into place"
    assert not (out / "brain-mri").exists(), "the EM generator writes only its own dataset"

    on_disk = json.loads((gt / "manifest.json").read_text())
    assert on_disk == manifest
    assert (on_disk["seed"], on_disk["count"], on_disk["labelled"]) == (0, 2, 1)
    assert on_disk["shape"] == [96, 96, 10] and on_disk["spacing_nm"] == [4.0, 4.0, 40.0]
    assert "generator_version" in on_disk
    assert [v["id"] for v in on_disk["volumes"]] == ["em_000", "em_001"]
    assert [v["labelled_in_datastore"] for v in on_disk["volumes"]] == [True, False]
    for volume, name in zip(on_disk["volumes"], NAMES):
        assert volume["cells"] == int(np.asarray(nib.load(gt / name).dataobj).max())

    # Written last: no volume is newer than the manifest.
    newest = max(t for k, t in _mtimes(out).items() if not k.endswith("manifest.json"))
    assert (gt / "manifest.json").stat().st_mtime_ns >= newest


def test_geometry(generated):
    out, _ = generated
    ds, gt = out / "em-neurons", out / "em-neurons-groundtruth"
    for name in NAMES:
        image, label = nib.load(ds / name), nib.load(gt / name)
        assert image.get_data_dtype() == np.uint8
        assert label.get_data_dtype() in (np.uint16, np.uint32)
        assert image.shape == label.shape == (96, 96, 10)
        np.testing.assert_array_equal(image.affine, label.affine)
        np.testing.assert_allclose(image.affine, np.diag([0.004, 0.004, 0.04, 1.0]))
        np.testing.assert_allclose(image.header.get_zooms(), (0.004, 0.004, 0.04), rtol=1e-6)
        assert image.header.get_xyzt_units()[0] == label.header.get_xyzt_units()[0] == "micron"

    final = np.asarray(nib.load(ds / "labels" / "final" / "em_000.nii.gz").dataobj)
    np.testing.assert_array_equal(final, np.asarray(nib.load(gt / "em_000.nii.gz").dataobj))


def test_labels_are_space_filling_consecutive_single_pieces(generated):
    out, _ = generated
    for name in NAMES:
        labels = np.asarray(nib.load(out / "em-neurons-groundtruth" / name).dataobj)
        # 0 means "unlabelled" and never occurs in the ground truth: membranes and the border belong to cells.
        assert labels.min() == 1
        n = int(labels.max())
        assert n >= 3
        np.testing.assert_array_equal(np.unique(labels), np.arange(1, n + 1))
        stray = 0
        for cell in range(1, n + 1):
            sizes = np.bincount(connected_components(labels == cell, connectivity=1).ravel())[1:]
            stray += sizes.sum() - sizes.max()
        assert stray / labels.size < 1e-3, "each cell should be one 6-connected piece"


def test_membranes_are_darker_than_cell_interiors(generated):
    out, _ = generated
    for name in NAMES:
        image = np.asarray(nib.load(out / "em-neurons" / name).dataobj).astype(float)
        labels = np.asarray(nib.load(out / "em-neurons-groundtruth" / name).dataobj)
        boundary = _in_plane_boundaries(labels)
        interior = ~binary_dilation(boundary, np.ones((7, 7, 1), bool))
        assert boundary.any() and interior.any()
        assert image[boundary].mean() < image[interior].mean() - 30, name
        # Cells differ in tone: the per-cell means spread beyond what noise alone would give.
        means = [image[interior & (labels == c)].mean() for c in np.unique(labels[interior])]
        assert np.std(means) > 2


def test_single_cell_volume_has_no_membrane():
    # A cell that fills the field meets no other cell: the volume's border is not drawn as a membrane.
    image = psd.render_em(np.ones((32, 32, 4), np.uint16), np.random.default_rng(0))
    assert image.dtype == np.uint8 and image.shape == (32, 32, 4)
    assert image.mean() > 100 and np.percentile(image, 1) > 60


def test_deterministic_and_seed_dependent(generated, tmp_path):
    out, manifest = generated
    assert psd.generate_em(tmp_path, seed=0, **SMALL) == manifest
    first, second = _arrays(out), _arrays(tmp_path)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)

    other = psd.generate_em(tmp_path, seed=1, skip_existing=True, **SMALL)
    assert other["seed"] == 1
    third = _arrays(tmp_path)
    for key in first:
        assert not np.array_equal(first[key], third[key]), key


def test_skip_existing_keeps_files(generated, capsys):
    out, manifest = generated
    (out / "em-neurons" / ".datastore.json").write_text("{}")
    try:
        before = _mtimes(out)
        capsys.readouterr()
        assert psd.generate_em(out, seed=0, skip_existing=True, **SMALL) == manifest
        assert _mtimes(out) == before
        assert "skipping" in capsys.readouterr().out
        argv = ["--dataset", "em", "--output-dir", str(out), "--count", "2", "--labelled", "1"]
        assert psd.main([*argv, "--em-shape", "96", "96", "10", "--skip-existing"]) == 0
        assert _mtimes(out) == before
        assert not (out / "brain-mri").exists()
    finally:
        (out / "em-neurons" / ".datastore.json").unlink()


def test_interrupted_run_is_not_complete(tmp_path, monkeypatch):
    psd.generate_em(tmp_path, seed=0, **SMALL)
    (tmp_path / "em-neurons" / "labels" / "final" / "em_000.nii.gz").unlink()
    psd.generate_em(tmp_path, seed=0, skip_existing=True, **SMALL)
    assert (tmp_path / "em-neurons" / "labels" / "final" / "em_000.nii.gz").is_file()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(psd, "em_volume", fail)
    with pytest.raises(KeyboardInterrupt):
        psd.generate_em(tmp_path, seed=0, **SMALL)
    assert not (tmp_path / "em-neurons-groundtruth" / "manifest.json").exists()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        psd.generate_em("/nonexistent", count=2, labelled=3)
    with pytest.raises(ValueError):
        psd.generate_em("/nonexistent", shape=(1, 64, 8))
    with pytest.raises(SystemExit):
        psd.main(["--dataset", "em", "--em-shape", "64", "64", "1"])
