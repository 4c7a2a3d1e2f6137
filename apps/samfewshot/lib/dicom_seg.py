"""DICOM SEG from a label volume with highdicom, offline.

monailabel 0.8.5 writes SEG through dcmqi's ``itkimage2segimage`` (a binary it downloads) or pydicom-seg; this
app replaces its ``nifti_to_dicom_seg`` with this highdicom writer (``lib.monailabel_compat.install``), so
``output=dicom_seg`` and saving a final label into a DICOMweb datastore work without either.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

logger = logging.getLogger(__name__)

# SNOMED CT 123037004, the category MONAI Label gives its segments; property type Tissue (85756007) below.
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
ALGORITHM = hd.AlgorithmIdentificationSequence(name="samfewshot", family=codes.cid7162.ArtificialIntelligence, version="1")


def read_series(series_dir: str) -> list[pydicom.Dataset]:
    """Every DICOM instance in ``series_dir`` (headers only), in any order."""
    datasets = []
    for name in sorted(os.listdir(series_dir)):
        path = os.path.join(series_dir, name)
        if os.path.isfile(path):
            try:
                datasets.append(pydicom.dcmread(path, stop_before_pixels=True))
            except pydicom.errors.InvalidDicomError:
                continue
    if not datasets:
        raise ValueError(f"no DICOM instances in '{series_dir}'")
    return datasets


def frames_for(label: sitk.Image, sources: Sequence[pydicom.Dataset]) -> np.ndarray:
    """(len(sources), rows, cols) label frames, frame i lying on source image i: each source's position is
    mapped into the label's grid, whatever order the instances came in."""
    array = sitk.GetArrayFromImage(label)  # (slices, rows, cols) in the label's own slice order
    frames = []
    for ds in sources:
        index = label.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])
        if not 0 <= index[2] < array.shape[0]:
            raise ValueError(f"source image {ds.SOPInstanceUID} lies outside the label volume (slice {index[2]})")
        frame = array[index[2]]
        if frame.shape != (ds.Rows, ds.Columns):
            raise ValueError(f"label slice {frame.shape} does not match the source image {(ds.Rows, ds.Columns)}")
        frames.append(frame)
    return np.stack(frames)


def segment_names(
    present: Sequence[int], label_info: Sequence[Mapping[str, Any]] | None, default_labels: Mapping[str, int] | None = None
) -> dict[int, str]:
    """{label id: name} for every id in the label: from ``label_info`` ([{name, idx}], or MONAI Label's list order
    when entries carry no idx), else from ``default_labels`` (the served models' {name: id}), else ``segment <id>``."""
    names: dict[int, str] = {idx: name for name, idx in (default_labels or {}).items()}
    for position, entry in enumerate(label_info or []):
        idx = int(entry.get("idx", entry.get("id", present[position] if position < len(present) else -1)))
        if entry.get("name"):
            names[idx] = str(entry["name"])
    return {int(i): names.get(int(i), f"segment {int(i)}") for i in present}


def write_dicom_seg(
    series_dir: str,
    label_path: str,
    label_info: Sequence[Mapping[str, Any]] | None,
    default_labels: Mapping[str, int] | None = None,
    series_description: str = "samfewshot",
) -> str:
    """A labelled volume on the grid of the DICOM series in ``series_dir`` -> a DICOM SEG file (one segment per
    label id present, named from ``label_info``) referencing that series; returns its path ('' for an empty label,
    as monailabel's writer does)."""
    sources = read_series(series_dir)
    label = sitk.ReadImage(label_path)
    if label.GetNumberOfComponentsPerPixel() != 1 or label.GetDimension() != 3:
        raise ValueError(f"'{label_path}' is not a single-component 3D label volume")
    pixels = frames_for(label, sources).astype(np.int64)
    present = [int(v) for v in np.unique(pixels) if v != 0]
    if not present:
        logger.warning(f"empty label '{label_path}': no DICOM SEG written")
        return ""
    if min(present) < 0 or max(present) > 65535:
        raise ValueError(f"label ids must be 1..65535 for DICOM SEG, got {present[0]}..{present[-1]}")
    names = segment_names(present, label_info, default_labels)
    # highdicom numbers segments 1..N and reads an integer array as those numbers.
    numbering = {idx: number for number, idx in enumerate(present, start=1)}
    lookup = np.zeros(max(present) + 1, dtype=np.uint16)
    for idx, number in numbering.items():
        lookup[idx] = number
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=numbering[idx],
            segment_label=names[idx],
            segmented_property_category=ANATOMICAL_STRUCTURE,
            segmented_property_type=hd.sr.CodedConcept("85756007", "SCT", names[idx]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=ALGORITHM,
        )
        for idx in present
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=lookup[pixels],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="samfewshot",
        manufacturer_model_name="samfewshot",
        software_versions="1",
        device_serial_number="0",
        series_description=series_description,
        omit_empty_frames=False,
    )
    fd, path = tempfile.mkstemp(suffix=".dcm")
    os.close(fd)
    seg.save_as(path)
    return path
