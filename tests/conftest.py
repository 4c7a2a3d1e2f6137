"""Shared fixtures: every test works on its own copy of the app and of the sample datastore."""

from __future__ import annotations

import gzip
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# SAMFEWSHOT_APP_DIR: another copy of the app to test (tests/unit/test_adding_a_model.py adds a model to one).
APP_DIR = Path(os.environ.get("SAMFEWSHOT_APP_DIR") or REPO / "apps" / "samfewshot")
SAMPLES = REPO / "sample-datasets"

os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
# MONAI Label drops and re-imports `lib.*` whenever it loads an app; in one test process that would leave two
# copies of every class (isinstance checks across tests fail). The app copies hold the same code.
os.environ.setdefault("MONAI_LABEL_RELOAD_APP_LIB", "false")
# The app's modules import as `lib.*` / `main`, as MONAI Label loads them.
sys.path.insert(0, str(APP_DIR))


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The sample datasets; generated here when scripts/setup.sh has not made them yet."""
    if not all((SAMPLES / d / "manifest.json").exists() for d in ("brain-mri-groundtruth", "em-neurons-groundtruth")):
        sys.path.insert(0, str(REPO / "scripts"))
        from prepare_sample_data import generate, generate_em

        generate(str(SAMPLES), skip_existing=True)
        generate_em(str(SAMPLES), skip_existing=True)
    return SAMPLES


def copy_datastore(sample_data: Path, name: str, tmp_path: Path) -> Path:
    """Copy a sample datastore without the state a server leaves in it (index, lock, originals)."""
    dst = tmp_path / name
    shutil.copytree(sample_data / name, dst, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock", "original"))
    return dst


@pytest.fixture
def studies(tmp_path, sample_data) -> Path:
    """A private copy of the brain-MRI datastore (two volumes with final labels)."""
    return copy_datastore(sample_data, "brain-mri", tmp_path)


@pytest.fixture
def em_studies(tmp_path, sample_data) -> Path:
    """A private copy of the EM datastore (two volumes with final instance labels)."""
    return copy_datastore(sample_data, "em-neurons", tmp_path)


def copy_app(tmp_path: Path) -> Path:
    dst = tmp_path / "app"
    shutil.copytree(APP_DIR, dst, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    return dst


@pytest.fixture
def app_dir(tmp_path) -> Path:
    """A private copy of the app, so adapters and splits written by a test stay in its tmp dir."""
    return copy_app(tmp_path)


def _dicom_slice(path: Path, pixels: np.ndarray) -> Path:
    """A single-frame MR DICOM file (what one slice of a series looks like)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing, ds.ImagePositionPatient, ds.ImageOrientationPatient = [1, 1], [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    pydicom.dcmwrite(str(path), ds, write_like_original=False)
    return path


def _header_claiming(shape: tuple[int, ...]) -> bytes:
    """A NIfTI-1 header declaring ``shape`` (float32) followed by a few voxels."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    header.set_data_offset(352)
    return header.binaryblock + b"\0" * 4 + np.zeros(8, np.float32).tobytes()


@pytest.fixture(scope="session")
def bad_volumes(tmp_path_factory, sample_data) -> dict[str, Path]:
    """Broken and odd volumes next to good references, built from the sample image brain_002 (labels on its grid).

    Images: ``image.nii.gz`` (the sample itself), ``trunc.nii.gz`` (gzip cut in half), ``trunc.nii`` (uncompressed,
    cut), ``corrupt.nii.gz`` (gzip magic + noise), ``wrong_size.nrrd`` (header sizes twice the data), ``bad_header.nrrd``,
    ``slice.dcm`` (one valid DICOM slice: 2D), ``trunc.dcm`` (it cut in half), ``not_dicom.dcm``, ``2d.nii.gz``,
    ``4d.nii.gz``, ``singleton_4d.nii.gz`` (X, Y, Z, 1: fine), ``zeros.nii.gz``, ``constant.nii.gz``, ``nan.nii.gz``,
    ``inf.nii.gz``, ``huge.nii`` / ``huge.nii.gz`` (headers claiming 30000^3 / 2048^3 voxels), ``notes.txt``.
    Labels: ``label.nii.gz`` (ids 0-2, fine), ``label_lps.nrrd`` (the same in an LPS NRRD, fine), ``label_shape``,
    ``label_shift`` (origin +50 mm), ``label_spacing`` (2x voxel size), ``label_7``, ``label_neg`` (-1),
    ``label_half`` (0.5), ``label_nan``, ``label_3`` (id 3), ``label_layers.seg.nrrd`` (3 overlapping layers),
    ``label_segments_5.seg.nrrd`` (Slicer header naming ids 1 and 2, voxels of id 5).
    """
    import nrrd

    out = tmp_path_factory.mktemp("volumes")
    source = sample_data / "brain-mri" / "brain_002.nii.gz"
    ref = nib.load(str(source))
    image = np.asarray(ref.dataobj).astype(np.float32)
    truth = np.asarray(nib.load(str(sample_data / "brain-mri-groundtruth" / "brain_002.nii.gz")).dataobj).astype(np.uint8)
    files: dict[str, Path] = {}

    def nifti(name: str, data: np.ndarray, affine: np.ndarray = ref.affine) -> None:
        files[name] = out / name
        nib.save(nib.Nifti1Image(data, affine), str(files[name]))

    def raw(name: str, content: bytes) -> None:
        files[name] = out / name
        files[name].write_bytes(content)

    shutil.copyfile(source, out / "image.nii.gz")
    files["image.nii.gz"] = out / "image.nii.gz"
    compressed = source.read_bytes()
    raw("trunc.nii.gz", compressed[: len(compressed) // 2])
    uncompressed = gzip.decompress(compressed)
    raw("trunc.nii", uncompressed[: len(uncompressed) // 2])
    raw("corrupt.nii.gz", b"\x1f\x8b" + np.random.default_rng(0).bytes(4096))
    nrrd.write(str(out / "good.nrrd"), truth, {"space": "left-posterior-superior"})
    header, body = (out / "good.nrrd").read_bytes().split(b"\n\n", 1)
    sizes = " ".join(str(2 * n) for n in truth.shape).encode()
    raw("wrong_size.nrrd", header.replace(b"sizes: " + " ".join(map(str, truth.shape)).encode(), b"sizes: " + sizes) + b"\n\n" + body)
    raw("bad_header.nrrd", b"NRRD0004\ntype: bogus\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n" + bytes(64))
    _dicom_slice(out / "slice.dcm", image[:, :, 60])
    files["slice.dcm"] = out / "slice.dcm"
    dicom = files["slice.dcm"].read_bytes()
    raw("trunc.dcm", dicom[: len(dicom) // 2])
    raw("not_dicom.dcm", b"this is not a DICOM file\n" * 40)
    nifti("2d.nii.gz", image[:, :, 60])
    nifti("4d.nii.gz", np.stack([image[:40, :40, :20]] * 3, axis=-1))
    nifti("singleton_4d.nii.gz", image[..., None])
    nifti("zeros.nii.gz", np.zeros_like(image))
    nifti("constant.nii.gz", np.full_like(image, 7.0))
    for name, value in (("nan.nii.gz", np.nan), ("inf.nii.gz", np.inf)):
        broken = image.copy()
        broken[50, 60, 70] = value
        nifti(name, broken)
    raw("huge.nii", _header_claiming((30000, 30000, 30000)))
    raw("huge.nii.gz", gzip.compress(_header_claiming((2048, 2048, 2048))))
    raw("notes.txt", b"not an image\n")

    nifti("label.nii.gz", truth)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    nrrd.write(
        str(out / "label_lps.nrrd"),
        truth,
        {
            "space": "left-posterior-superior",
            "space directions": (ras_to_lps @ ref.affine[:3, :3]).T,
            "space origin": ras_to_lps @ ref.affine[:3, 3],
        },
    )
    files["label_lps.nrrd"] = out / "label_lps.nrrd"
    nifti("label_shape.nii.gz", truth[:-2])
    shifted = ref.affine.copy()
    shifted[:3, 3] += 50
    nifti("label_shift.nii.gz", truth, shifted)
    nifti("label_spacing.nii.gz", truth, ref.affine @ np.diag([2, 2, 2, 1]))
    for name, value, dtype in (
        ("label_7", 7, np.uint8),
        ("label_neg", -1, np.int16),
        ("label_half", 0.5, np.float32),
        ("label_nan", np.nan, np.float32),
        ("label_3", 3, np.uint8),
    ):
        broken = truth.astype(dtype)
        broken[40:44, 40:44, 40:44] = value
        nifti(f"{name}.nii.gz", broken)
    layers = np.stack([truth == 1, truth == 2, truth > 0]).astype(np.uint8)
    nrrd.write(
        str(out / "label_layers.seg.nrrd"),
        layers,
        {
            "kinds": ["list", "domain", "domain", "domain"],
            "space": "right-anterior-superior",
            "space directions": np.vstack([np.full(3, np.nan), ref.affine[:3, :3].T]),  # NaN row: NRRD's "none"
            "space origin": ref.affine[:3, 3],
        },
    )
    files["label_layers.seg.nrrd"] = out / "label_layers.seg.nrrd"
    five = truth.copy()
    five[40:44, 40:44, 40:44] = 5
    segments = {"Segment0_Name": "white matter", "Segment0_LabelValue": "1", "Segment1_Name": "grey matter", "Segment1_LabelValue": "2"}
    nrrd.write(
        str(out / "label_segments_5.seg.nrrd"),
        five,
        {
            "space": "right-anterior-superior",
            "space directions": ref.affine[:3, :3].T,
            "space origin": ref.affine[:3, 3],
            **segments,
        },
    )
    files["label_segments_5.seg.nrrd"] = out / "label_segments_5.seg.nrrd"
    return files


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("module")


@pytest.fixture(scope="module")
def module_app_dir(module_tmp) -> Path:
    """An app copy shared by one test module (for a server the whole module talks to)."""
    return copy_app(module_tmp)


@pytest.fixture(scope="module")
def module_studies(module_tmp, sample_data) -> Path:
    """A brain-MRI datastore copy shared by one test module."""
    return copy_datastore(sample_data, "brain-mri", module_tmp)


@pytest.fixture
def free_port() -> int:
    from lib.trainers.adapter_trainer import free_loopback_port

    return free_loopback_port()
