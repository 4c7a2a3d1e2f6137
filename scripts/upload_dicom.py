#!/usr/bin/env python3
"""Send volumes to a DICOMweb server (e.g. the Orthanc of scripts/orthanc.sh) with STOW-RS.

    .venv/bin/python scripts/upload_dicom.py                                  # the brain-MRI sample volumes
    .venv/bin/python scripts/upload_dicom.py --url http://127.0.0.1:8042/dicom-web sample-datasets/brain-mri/brain_002.nii.gz
    .venv/bin/python scripts/upload_dicom.py /data/exported-study/            # any folder of DICOM files, as they are

A NIfTI/NRRD volume becomes one single-frame DICOM series (MR Image Storage unless --modality says otherwise):
one instance per slice along the volume's third axis, with Image Position/Orientation (Patient), Pixel Spacing
and Slice Thickness taken from the volume's geometry in LPS, so a viewer and MONAI Label see the same grid the
file had. Each volume is its own patient and study; UIDs are derived from the file's content, so sending the
same file twice replaces the series instead of duplicating it. Prints one line per series: its
SeriesInstanceUID and the source.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_URL = "http://127.0.0.1:8042/dicom-web"
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SOP_CLASSES = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
UID_ROOT = "2.25."  # UUID-derived UIDs (PS3.5 B.2): no registered root needed


def derived_uid(*parts: str) -> str:
    """A stable UID from ``parts``: the same input always gets the same UID."""
    return UID_ROOT + str(int(hashlib.sha256("/".join(parts).encode()).hexdigest()[:30], 16))


def volume_to_series(path: Path, modality: str = "MR", patient_id: str | None = None) -> list:
    """One pydicom Dataset per slice of the volume at ``path`` (read with SimpleITK, in LPS)."""
    import pydicom
    import SimpleITK as sitk
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: expected a 3D single-channel volume, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    pixels = sitk.GetArrayFromImage(image)  # (slices, rows, cols)
    if not np.isfinite(pixels).all():
        raise ValueError(f"{path}: the volume holds NaN or infinite values")
    if pixels.min() < -32768 or pixels.max() > 32767:
        raise ValueError(f"{path}: values {pixels.min()}..{pixels.max()} do not fit 16-bit signed DICOM pixels")
    pixels = np.rint(pixels).astype(np.int16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    name = path.name.split(".")[0]
    patient_id = patient_id or name
    study_uid, series_uid, frame_uid = (derived_uid(digest, kind) for kind in ("study", "series", "frame"))
    now = datetime.datetime.now()
    sop_class = SOP_CLASSES.get(modality.upper(), SECONDARY_CAPTURE)
    datasets = []
    for k in range(pixels.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = derived_uid(digest, "instance", str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.dataset.FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)  # a Part 10 file: preamble + DICM
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = f"{name}^", patient_id  # family name only
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyDescription, ds.SeriesDescription = "samfewshot sample", name
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality.upper(), 1, k + 1
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        # Row direction = increasing column index (image axis 0), column direction = increasing row index (axis 1).
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing, column spacing
        ds.SliceThickness = f"{sz:.6f}"
        ds.SpacingBetweenSlices = f"{sz:.6f}"
        ds.Rows, ds.Columns = pixels.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = pixels[k].tobytes()
        datasets.append(ds)
    return datasets


def dicom_files(folder: Path) -> Iterator:
    import pydicom

    for path in sorted(folder.rglob("*")):
        if path.is_file():
            try:
                yield pydicom.dcmread(str(path))
            except pydicom.errors.InvalidDicomError:
                continue


def inputs(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir() and not any(p.name.endswith(VOLUME_SUFFIXES) for p in path.iterdir()):
            yield path  # a DICOM folder, sent as it is
        elif path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.name.endswith(VOLUME_SUFFIXES))
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path} does not exist")


def upload(paths: Sequence[Path], url: str, modality: str = "MR") -> list[tuple[str, str]]:
    """STOW-RS every input; returns [(SeriesInstanceUID, source)]."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url)
    sent = []
    for path in inputs(paths):
        datasets = list(dicom_files(path)) if path.is_dir() else volume_to_series(path, modality)
        if not datasets:
            raise ValueError(f"{path}: no DICOM files found")
        for start in range(0, len(datasets), 64):  # bounded request size for long series
            client.store_instances(datasets[start : start + 64])
        for series in sorted({str(ds.SeriesInstanceUID) for ds in datasets}):
            sent.append((series, str(path)))
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths", nargs="*", type=Path, help="volumes, folders of volumes or DICOM folders (default: sample-datasets/brain-mri)"
    )
    parser.add_argument("--url", default=os.environ.get("DICOMWEB_URL", DEFAULT_URL), help="DICOMweb root")
    parser.add_argument("--modality", default="MR", help="modality of converted volumes (MR, CT, ...)")
    args = parser.parse_args(argv)
    paths = args.paths or [REPO / "sample-datasets" / "brain-mri"]
    try:
        for series, source in upload(paths, args.url, args.modality):
            print(series, source)
    except Exception as e:  # a clear one-line reason instead of a traceback
        print(f"upload_dicom: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
