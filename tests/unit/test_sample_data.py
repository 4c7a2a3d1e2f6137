"""Tests for scripts/prepare_sample_data.py on a small, coarse configuration (2 volumes at 3 mm)."""

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_sample_data.py"
SMALL = {"count": 2, "labelled": 1, "spacing": 3.0}


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_sample_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


psd = _load_script()


def _arrays(root: Path) -> dict:
    """Voxel arrays (as stored, no scaling) of every NIfTI under root, keyed by relative path."""
    return {str(p.relative_to(root)): np.asarray(nib.load(p).dataobj) for p in sorted(root.rglob("*.nii.gz"))}


def _mtimes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    manifest = psd.generate(out, seed=0, **SMALL)
    return out, manifest


def test_layout(generated):
    out, manifest = generated
    ds, gt = out / "brain-mri", out / "brain-mri-groundtruth"
    assert sorted(p.name for p in ds.glob("*.nii.gz")) == ["brain_000.nii.gz", "brain_001.nii.gz"]
    # Only the first `labelled` volumes have a final label inside the datastore ...
    assert sorted(p.name for p in (ds / "labels" / "final").iterdir()) == ["brain_000.nii.gz"]
    # ... while the ground truth for all of them lives beside it.
    assert sorted(p.name for p in gt.iterdir()) == [
        "brain_000.nii.gz",
        "brain_001.nii.gz",
        "labels.json",
        "manifest.json",
    ]
    assert not list(ds.rglob("*.json")), "nothing but images and final labels belongs in the datastore"
    assert not list(out.rglob(".*partial*")), "temporary files must be renamed into place"

    assert json.loads((gt / "labels.json").read_text()) == {"white matter": 1, "grey matter": 2}
    on_disk = json.loads((gt / "manifest.json").read_text())
    assert on_disk == manifest
    assert (on_disk["seed"], on_disk["count"], on_disk["labelled"], on_disk["spacing_mm"]) == (0, 2, 1, 3.0)
    assert "generator_version" in on_disk
    assert [v["id"] for v in on_disk["volumes"]] == ["brain_000", "brain_001"]


def test_images_and_labels(generated):
    out, manifest = generated
    ds, gt = out / "brain-mri", out / "brain-mri-groundtruth"
    for name in ("brain_000.nii.gz", "brain_001.nii.gz"):
        image, label = nib.load(ds / name), nib.load(gt / name)
        assert image.get_data_dtype() == np.int16
        assert label.get_data_dtype() == np.uint8
        assert image.shape == label.shape == tuple(manifest["shape"])
        np.testing.assert_array_equal(image.affine, label.affine)
        np.testing.assert_allclose(np.diag(image.affine)[:3], [3.0, 3.0, 3.0])
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")

        img, lab = np.asarray(image.dataobj), np.asarray(label.dataobj)
        assert set(np.unique(lab).tolist()) <= {0, 1, 2}
        wm, gm = np.mean(lab == 1), np.mean(lab == 2)
        assert wm > 0.03 and gm > 0.05, (wm, gm)
        # MR-like intensities: non-negative, white matter brighter than grey matter (T1 contrast).
        assert img.min() >= 0 and 300 < img.max() < 2000
        assert np.median(img[lab == 1]) > np.median(img[lab == 2]) > np.median(img[lab == 0])

    final = np.asarray(nib.load(ds / "labels" / "final" / "brain_000.nii.gz").dataobj)
    np.testing.assert_array_equal(final, np.asarray(nib.load(gt / "brain_000.nii.gz").dataobj))


def test_volumes_differ(generated):
    out, _ = generated
    arrays = _arrays(out)
    assert not np.array_equal(arrays["brain-mri/brain_000.nii.gz"], arrays["brain-mri/brain_001.nii.gz"])
    lab0, lab1 = arrays["brain-mri-groundtruth/brain_000.nii.gz"], arrays["brain-mri-groundtruth/brain_001.nii.gz"]
    assert np.mean(lab0 != lab1) > 0.01, "the deformation should change the anatomy, not just the noise"


def test_deterministic_and_seed_dependent(generated, tmp_path):
    out, manifest = generated
    again = psd.generate(tmp_path, seed=0, **SMALL)
    assert again == manifest
    first, second = _arrays(out), _arrays(tmp_path)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)

    # A different seed (with --skip-existing: the manifest no longer matches) regenerates, cleanly.
    (tmp_path / "brain-mri" / ".datastore.json").write_text("{}")
    other = psd.generate(tmp_path, seed=1, skip_existing=True, **SMALL)
    assert other["seed"] == 1
    assert not (tmp_path / "brain-mri" / ".datastore.json").exists(), "stale datastore index must go"
    third = _arrays(tmp_path)
    assert third.keys() == first.keys()
    for key in first:
        assert not np.array_equal(first[key], third[key]), key


def test_skip_existing_keeps_files(generated, capsys):
    out, manifest = generated
    # State a MONAI Label session would add: its index and a label saved by a user.
    (out / "brain-mri" / ".datastore.json").write_text("{}")
    extra = out / "brain-mri" / "labels" / "final" / "brain_001.nii.gz"
    extra.write_bytes((out / "brain-mri-groundtruth" / "brain_001.nii.gz").read_bytes())
    try:
        before = _mtimes(out)
        capsys.readouterr()
        assert psd.generate(out, seed=0, skip_existing=True, **SMALL) == manifest
        assert _mtimes(out) == before
        assert "skipping" in capsys.readouterr().out
        # The CLI takes the same fast path and succeeds.
        argv = ["--dataset", "brain", "--output-dir", str(out), "--count", "2", "--labelled", "1", "--spacing", "3", "--skip-existing"]
        assert psd.main(argv) == 0
        assert _mtimes(out) == before
    finally:
        extra.unlink()
        (out / "brain-mri" / ".datastore.json").unlink()


def test_interrupted_run_is_not_complete(tmp_path, monkeypatch):
    psd.generate(tmp_path, seed=0, **SMALL)
    (tmp_path / "brain-mri-groundtruth" / "brain_001.nii.gz").unlink()
    # A missing file means "incomplete": --skip-existing must regenerate it.
    psd.generate(tmp_path, seed=0, skip_existing=True, **SMALL)
    assert (tmp_path / "brain-mri-groundtruth" / "brain_001.nii.gz").is_file()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(psd, "deform_subject", fail)
    with pytest.raises(KeyboardInterrupt):
        psd.generate(tmp_path, seed=0, **SMALL)
    assert not (tmp_path / "brain-mri-groundtruth" / "manifest.json").exists()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        psd.generate("/nonexistent", count=2, labelled=3)
    with pytest.raises(SystemExit):
        psd.main(["--count", "0"])
