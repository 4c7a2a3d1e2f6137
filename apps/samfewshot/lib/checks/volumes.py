"""Volumes and labels a client sends or the datastore holds, checked before any voxel is used.

NIfTI, NRRD or DICOM (a file or a series folder), read by MONAI's ``LoadImage`` after a header-only look that
refuses more than ``MAX_VOXELS`` voxels before any voxel is read. An image must be 3D (at least 2 voxels along each
axis; trailing singleton axes are dropped), hold finite intensities and not be constant. A label must lie on its
image's voxel grid (same shape, affine within ``GRID_TOLERANCE`` of a voxel) and hold non-negative integer ids the
model knows. The datastore (``lib.datastore``) checks uploads with them, the infer base (``lib.infers.resident``)
the volume it is asked to segment, the trainer the labels it reads.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import pydicom

from lib.checks.requests import check_label_info
from lib.errors import InvalidInput, quoted

logger = logging.getLogger(__name__)

# 2^30 voxels = 1024^3, 4 GiB as float32: above any CT/MR volume (512 x 512 x 4096 fits) and what a 2-core
# annotation host can hold; a header claiming more is refused before a voxel is read.
MAX_VOXELS = 2**30
# Label and image affines may differ by this fraction of a voxel (float32 headers, NRRD/NIfTI round trips).
GRID_TOLERANCE = 0.01
# What a local datastore lists and stores (MONAI Label's file patterns that hold volumes).
STORED_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
NIFTI_SUFFIXES = (".nii.gz", ".nii", ".hdr", ".img")
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class Grid:
    """Where a volume's voxels are: spatial shape and 4x4 voxel-to-RAS affine (as MONAI reads it)."""

    shape: tuple[int, ...]
    affine: np.ndarray


def volume_format(path: str) -> str:
    """'nifti', 'nrrd' or 'dicom' from the file name (a folder is a DICOM series)."""
    name = os.path.basename(path).lower()
    if os.path.isdir(path):
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".nrrd") or name.endswith(".nhdr"):
        return "nrrd"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    raise InvalidInput(
        f"{os.path.basename(path)!r} is not a volume format this server reads: NIfTI (.nii, .nii.gz), NRRD (.nrrd) "
        "or DICOM (.dcm, or a series folder)"
    )


def header_shape(path: str, name: str | None = None, what: str = "volume") -> tuple[int, ...]:
    """The array shape a volume's header declares, read without its voxels (the size check comes before them). A
    NIfTI header's own affine is checked here too: readers differ in what they make of a broken one (MONAI falls
    back to the voxel sizes, nibabel and ITK keep it)."""
    fmt = volume_format(path)
    name = name or os.path.basename(path)
    try:
        if fmt == "nifti":
            image = nib.load(path)
            shape = tuple(int(n) for n in image.shape)
            check_affine(np.asarray(image.affine, dtype=np.float64), name, what)
            if path.endswith(".nii"):
                _check_payload(path, image, shape, name)
            return shape
        if fmt == "nrrd":
            header = nrrd.read_header(path)
            detached = header.get("data file", header.get("datafile"))
            if detached is not None or path.lower().endswith(".nhdr"):
                raise InvalidInput(
                    f"{name!r} is an NRRD header whose voxels lie in another file ({quoted(detached)}); the server reads "
                    "only NRRD files with their data attached (.nrrd), never a file a header points to"
                )
            return tuple(int(n) for n in header["sizes"])
        files = sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]
        if not files:
            raise InvalidInput(f"DICOM folder {name!r} is empty")
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        return (int(ds.Rows), int(ds.Columns), int(getattr(ds, "NumberOfFrames", 1) or 1) * len(files))
    except InvalidInput:
        raise
    except Exception as e:  # every reader has its own errors; the client needs the reason, not the class
        raise InvalidInput(f"cannot read the header of {name!r} as {fmt.upper()}: {_reason(e, path, name)}") from e


def _check_payload(path: str, image: nib.Nifti1Image, shape: tuple[int, ...], name: str) -> None:
    """An uncompressed NIfTI must hold the bytes its header promises (a truncated upload is caught unread)."""
    expected = int(image.header.get_data_offset()) + math.prod(shape) * image.get_data_dtype().itemsize
    size = os.path.getsize(path)
    if math.prod(shape) <= MAX_VOXELS and size < expected:
        raise InvalidInput(f"{name!r} is truncated: its header promises {expected} bytes, the file holds {size}")


def _reason(error: BaseException, path: str, name: str) -> str:
    """A reader's message, short, naming the volume rather than the server's (temporary) path."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text.replace(path, name)[:300]


def spatial_shape(shape: tuple[int, ...], name: str, what: str, sizes: bool = True) -> tuple[int, ...]:
    """A volume's (X, Y, Z): 3D, or 3D with trailing singleton axes; with ``sizes``, at least 2 voxels per axis."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) < 3:
        raise InvalidInput(f"{what} {name!r} is {len(dims)}D {tuple(shape)}; the models take 3D volumes (X, Y, Z)")
    if len(dims) > 3:
        raise InvalidInput(
            f"{what} {name!r} has {len(dims)} dimensions {tuple(shape)}; send one 3D volume (X, Y, Z), "
            "not a time series, multi-channel image or a segmentation with several layers"
        )
    if sizes and min(dims) < 1:
        raise InvalidInput(f"{what} {name!r} is empty: shape {tuple(shape)}")
    if sizes and min(dims) < 2:
        raise InvalidInput(f"{what} {name!r} is a single slice {tuple(shape)}: a 2D image; the models take 3D volumes")
    return tuple(dims)


def read_volume(path: str, what: str, name: str | None = None) -> tuple[np.ndarray, Grid, Mapping[str, Any]]:
    """Voxels (X, Y, Z) in the file's own dtype, grid and header metadata; refuses what is unreadable, too large or
    not 3D with a message naming the volume (``name``, else the file name) and the problem."""
    from monai.transforms import LoadImage

    name = name or os.path.basename(path.rstrip("/"))
    declared = header_shape(path, name, what)
    voxels = math.prod(declared)
    if voxels > MAX_VOXELS:
        raise InvalidInput(f"{what} {name!r} declares {'x'.join(map(str, declared))} = {voxels} voxels; limit {MAX_VOXELS}")
    # The number of axes from the header: MONAI's NRRD reader fails on a multi-layer segmentation's header.
    spatial_shape(declared, name, what, sizes=False)
    try:
        # The header as a dict, not the MetaTensor's: MONAI's meta tracking is process-wide, and a training run in
        # this process turns it off (plain tensors) while other threads read volumes.
        volume, meta = LoadImage(image_only=False, dtype=None)(path)
    except Exception as e:
        raise InvalidInput(
            f"cannot read {what} {name!r} ({volume_format(path).upper()}; truncated or corrupt?): {_reason(e, path, name)}"
        ) from e
    shape = spatial_shape(tuple(volume.shape), name, what)
    affine = np.asarray(meta["affine"], dtype=np.float64)
    check_affine(affine, name, what)
    data = np.asarray(volume).reshape(shape)
    return data, Grid(shape, affine), dict(meta)


def check_affine(affine: np.ndarray, name: str, what: str) -> None:
    """A voxel-to-world affine the models and viewers can use: finite, and invertible (no zero voxel size)."""
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InvalidInput(f"{what} {name!r} has an affine that is not finite: {affine.round(4).tolist()}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if spacing.min() <= 0 or abs(np.linalg.det(affine[:3, :3] / spacing)) < 1e-6:
        raise InvalidInput(
            f"{what} {name!r} has an affine that is not invertible (voxel size {spacing.round(6).tolist()}); "
            "fix its header's spacing and direction"
        )


def check_image_data(data: np.ndarray, name: str) -> None:
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            kinds = [k for k, m in (("NaN", np.isnan(data)), ("infinite", np.isinf(data))) if m.any()]
            count = int(bad.sum())
            raise InvalidInput(f"image {name!r} has {count} {' and '.join(kinds)} voxel value(s); intensities must be finite")
    elif data.dtype.kind not in "iub":
        raise InvalidInput(f"image {name!r} has voxels of type {data.dtype}; expected numbers")
    low, high = data.min(), data.max()
    if low == high:
        raise InvalidInput(f"image {name!r} is empty: every voxel is {low.item()}")


def check_image(path: str, name: str | None = None) -> Grid:
    """A volume the models can segment; returns its grid."""
    name = name or os.path.basename(path.rstrip("/"))
    data, grid, _ = read_volume(path, "image", name)
    check_image_data(data, name)
    return grid


@functools.lru_cache(maxsize=256)
def _stored_image_grid(path: str, mtime_ns: int, size: int) -> Grid:
    return check_image(path)


def stored_image_grid(path: str) -> Grid:
    """``check_image`` for a file that is read again and again (a datastore image at every infer and label save);
    a file changed on disk is checked again."""
    stat = os.stat(path)
    return _stored_image_grid(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


def same_grid(label: Grid, image: Grid) -> str | None:
    """None when the label's voxels lie on the image's, else what differs."""
    if label.shape != image.shape:
        return f"shape {label.shape} differs from the image's {image.shape}"
    if label.affine.shape != (4, 4) or image.affine.shape != (4, 4):
        return "its affine is not a 3D affine"
    # The label's voxel grid in the image's voxel coordinates: the identity when the two coincide.
    offset = np.linalg.solve(image.affine, label.affine) - np.eye(4)
    if np.abs(offset).max() > GRID_TOLERANCE:
        mine, theirs = label.affine[:3].round(3).tolist(), image.affine[:3].round(3).tolist()
        return f"affine {mine} differs from the image's {theirs}"
    return None


def check_label(
    path: str,
    image: Grid,
    known_ids: Collection[int] | None,
    label_info: Any = None,
    ids: bool = True,
    name: str | None = None,
) -> None:
    """A label for ``image``: on its grid, finite, and, when ``ids``, non-negative integer ids that are either
    named in ``label_info`` (or a 3D Slicer ``.seg.nrrd`` header) or, without names, among ``known_ids``
    (None: any id, as instance labels are). ``ids=False`` for per-voxel maps stored as labels (uncertainty)."""
    from lib.transforms.labels import slicer_label_info

    name = name or os.path.basename(path)
    named = check_label_info(label_info)
    data, grid, meta = read_volume(path, "label", name)
    problem = same_grid(grid, image)
    if problem:
        raise InvalidInput(f"label {name!r} does not match its image's grid: {problem}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InvalidInput(f"label {name!r} holds NaN or infinite values")
    if not ids:
        return
    if data.dtype.kind == "f" and (data != np.round(data)).any():
        fractions = np.unique(data[data != np.round(data)])[:5].tolist()
        raise InvalidInput(f"label {name!r} holds non-integer values {fractions}; label ids are integers")
    if data.dtype.kind not in "fiub":
        raise InvalidInput(f"label {name!r} has voxels of type {data.dtype}; label ids are integers")
    present = np.unique(data)
    if present.size and present[0] < 0:
        negative = present[present < 0][:5].astype(int).tolist()
        raise InvalidInput(f"label {name!r} holds negative ids {negative}; 0 is background, ids are 1..N")
    if not named:
        named = {e["idx"]: e["name"] for e in slicer_label_info(meta)}
    allowed = set(named) if named else (None if known_ids is None else set(known_ids))
    if allowed is None:
        return
    unknown = sorted(int(v) for v in present if v != 0 and int(v) not in allowed)
    if unknown:
        source = "its label_info" if label_info else ("its segment names" if named else "the model's labels")
        raise InvalidInput(f"label {name!r} holds ids {unknown} that are not in {source} (ids {sorted(allowed)}; 0 is background)")
