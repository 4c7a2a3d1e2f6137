"""What the server accepts from a client, checked before anything is stored or computed.

A shared annotation server meets truncated uploads, odd volumes and mistyped requests. Every check here raises
``InvalidInput`` (HTTP 422) or ``NotFound`` (404) with a message that names the problem; nothing is written
before the checks pass. The datastore (``lib.datastore``) checks uploads, the infer base (``lib.infers.resident``)
checks the volume it is asked to segment, and ``install_request_checks`` guards MONAI Label's endpoints where the
request is parsed before the app sees it (JSON form fields, train and scoring names, infer image ids).

Volumes: NIfTI, NRRD or DICOM (a file or a series folder), read by MONAI's ``LoadImage`` after a header-only look
that refuses more than ``MAX_VOXELS`` voxels before any voxel is read. An image must be 3D (at least 2 voxels along
each axis; trailing singleton axes are dropped), hold finite intensities and not be constant. A label must lie on its
image's voxel grid (same shape, affine within ``GRID_TOLERANCE`` of a voxel) and hold non-negative integer ids the
model knows.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import pydicom

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
# Image ids and label tags become file and folder names inside the datastore.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InvalidInput(ValueError):
    """The request is at fault; ``status_code`` is what the client gets."""

    status_code = 422


class NotFound(InvalidInput):
    status_code = 404


@contextlib.contextmanager
def http_errors() -> Iterator[None]:
    """Raise an ``InvalidInput`` from the block as FastAPI's HTTPException with its status code and message."""
    from fastapi import HTTPException

    try:
        yield
    except InvalidInput as e:
        raise HTTPException(status_code=e.status_code, detail=str(e)) from e


# ---- names and request fields --------------------------------------------------------------------------------
def check_name(value: Any, what: str) -> str:
    """An image id or label tag: a plain file name, never a path (no separators, no leading dot, no control
    characters), so nothing can be written outside the datastore."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be a non-empty name, got {value!r}")
    if "/" in value or "\\" in value or value.startswith(".") or _CONTROL.search(value):
        raise InvalidInput(f"{what} {value!r} is not a plain name: no '/', '\\', leading '.' or control characters")
    return value


def check_choice(value: Any, valid: Collection[str], what: str) -> str:
    """``value`` must be one of ``valid`` (a model, strategy or scoring method name): NotFound lists them."""
    if value not in valid:
        names = ", ".join(sorted(valid)) or "none"
        raise NotFound(f"unknown {what} {value!r}; valid: {names}")
    return value


def parse_json_object(text: Any, field: str) -> dict[str, Any]:
    """A form field that must hold a JSON object (MONAI Label's ``params`` / ``info``)."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"'{field}' is not valid JSON ({e}); send a JSON object such as {{}}") from e
    if not isinstance(value, dict):
        raise InvalidInput(f"'{field}' must be a JSON object, got {type(value).__name__}: {text[:80]!r}")
    return value


def check_label_info(label_info: Any) -> dict[int, str]:
    """Slicer's ``label_info`` ([{name, idx}, ...]) -> {idx: name}."""
    if label_info is None:
        return {}
    if not isinstance(label_info, list):
        raise InvalidInput(f"label_info must be a list of {{'name', 'idx'}} objects, got {type(label_info).__name__}")
    ids = {}
    for entry in label_info:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise InvalidInput(f"label_info entries need a 'name' string and an integer 'idx', got {entry!r}")
        idx = _integer(entry.get("idx"))
        if idx is None or idx < 0:
            raise InvalidInput(f"label_info 'idx' must be a non-negative integer, got {entry.get('idx')!r} for {entry['name']!r}")
        ids[idx] = entry["name"]
    return ids


# Training options a client may set and what they must be; other keys pass to the trainer unchecked.
TRAIN_OPTIONS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "max_epochs": ("a positive integer", lambda v: (_integer(v) or 0) >= 1),
    "train_batch_size": ("a positive integer", lambda v: (_integer(v) or 0) >= 1),
    "val_batch_size": ("a positive integer", lambda v: (_integer(v) or 0) >= 1),
    "early_stop_patience": ("an integer", lambda v: _integer(v) is not None),
    "lr": ("a positive number", lambda v: (_number(v) or 0) > 0),
    "val_split": ("a number in [0, 1)", lambda v: _number(v) is not None and 0 <= _number(v) < 1),
    "multi_gpu": ("true or false", lambda v: isinstance(v, bool) or str(v).lower() in ("true", "false", "1", "0")),
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def check_train_options(options: Mapping[str, Any]) -> None:
    wrong = [f"{k} must be {what}, got {options[k]!r}" for k, (what, ok) in TRAIN_OPTIONS.items() if k in options and not ok(options[k])]
    if wrong:
        raise InvalidInput("; ".join(wrong))


# ---- volumes -------------------------------------------------------------------------------------------------
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


def header_shape(path: str, name: str | None = None) -> tuple[int, ...]:
    """The array shape a volume's header declares, read without its voxels (the size check comes before them)."""
    fmt = volume_format(path)
    name = name or os.path.basename(path)
    try:
        if fmt == "nifti":
            image = nib.load(path)
            shape = tuple(int(n) for n in image.shape)
            if path.endswith(".nii"):
                _check_payload(path, image, shape, name)
            return shape
        if fmt == "nrrd":
            header = nrrd.read_header(path)
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
    declared = header_shape(path, name)
    voxels = math.prod(declared)
    if voxels > MAX_VOXELS:
        raise InvalidInput(f"{what} {name!r} declares {'x'.join(map(str, declared))} = {voxels} voxels; limit {MAX_VOXELS}")
    # The number of axes from the header: MONAI's NRRD reader fails on a multi-layer segmentation's header.
    spatial_shape(declared, name, what, sizes=False)
    try:
        volume = LoadImage(image_only=True, dtype=None)(path)
    except Exception as e:
        raise InvalidInput(
            f"cannot read {what} {name!r} ({volume_format(path).upper()}; truncated or corrupt?): {_reason(e, path, name)}"
        ) from e
    shape = spatial_shape(tuple(volume.shape), name, what)
    affine = np.asarray(volume.affine, dtype=np.float64)
    data = volume.numpy().reshape(shape)
    return data, Grid(shape, affine), dict(volume.meta)


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
        raise InvalidInput(
            f"label {name!r} holds ids {unknown} that are not in {source} (ids {sorted(allowed)}; 0 is background)"
        )


# ---- MONAI Label's endpoints -----------------------------------------------------------------------------------
def _checked(function: Callable[..., Any], check: Callable[[inspect.BoundArguments], None]) -> Callable[..., Any]:
    """``function`` preceded by ``check`` of its bound arguments; InvalidInput answers with its status code.

    MONAI Label removes an upload's temporary copy in a background task, which Starlette runs only after a
    successful response: for a refused request the tasks run here, so bad uploads do not pile up in the temp dir.
    """
    if getattr(function, "__samfewshot_checked__", False):
        return function
    signature = inspect.signature(function)

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        try:
            with http_errors():
                check(bound)
            return function(*args, **kwargs)
        except Exception:
            background = bound.arguments.get("background_tasks")
            for task in getattr(background, "tasks", []):
                task.func(*task.args, **task.kwargs)
            raise

    run.__samfewshot_checked__ = True
    return run


def _json_fields(*fields: str) -> Callable[[inspect.BoundArguments], None]:
    def check(bound: inspect.BoundArguments) -> None:
        for field in fields:
            value = bound.arguments.get(field)
            parse_json_object(value if isinstance(value, str) else None, field)

    return check


def _infer_request(bound: inspect.BoundArguments) -> None:
    """Infer: JSON params; an image named by id (no file posted) must be one of the datastore's."""
    from monailabel.interfaces.utils.app import app_instance

    _json_fields("params")(bound)
    args = bound.arguments
    if not args.get("file") and not args.get("session_id"):
        image = check_name(args.get("image"), "image id")
        if image not in app_instance().datastore().list_images():
            raise NotFound(f"image {image!r} is not in the datastore")


def _task_request(run: Callable[..., Any]) -> Callable[..., Any]:
    """MONAI Label's AsyncTask.run: a train request names a served trainer and sensible options, a scoring request
    a served method; checked here because both run in a subprocess that would only fail later."""
    if getattr(run, "__samfewshot_checked__", False):
        return staticmethod(run)

    def checked(method: str, request=None, params=None, force_sync=False, enqueue=False):
        from monailabel.interfaces.utils.app import app_instance

        app = app_instance()
        options = {**(request or {}), **(params or {})}
        with http_errors():
            if method == "train" and "model" in (request or {}):
                check_choice(request["model"], app.info()["trainers"], "model")
                check_train_options(options)
            elif method == "scoring" and "method" in (request or {}):
                check_choice(request["method"], app.info()["scoring"], "scoring method")
        return run(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

    checked.__samfewshot_checked__ = True
    return staticmethod(checked)


def publish_uploaded_adapter(background_tasks, model: str, file) -> dict[str, Any]:
    """``PUT /model/{model}``: MONAI Label copies any upload over the served file, in place. Here the upload must be an
    adapter of this model's configuration, and it is published like a training run's (atomic, numbered, kept in
    the history), so a bad or half-sent file never replaces the served adapter."""
    import tempfile

    from monailabel.interfaces.utils.app import app_instance
    from monailabel.utils.others.generic import file_checksum

    from lib.networks.lora import AdapterError, check_adapter_config, publish_adapter, read_adapter

    app = app_instance()
    with http_errors():
        check_choice(model, list(app.models), "model")
    served = app.models[model].model
    with tempfile.NamedTemporaryFile(suffix=".pt") as upload:
        for chunk in iter(lambda: file.file.read(1 << 20), b""):
            upload.write(chunk)
        upload.flush()
        with http_errors():
            try:
                payload = read_adapter(upload.name)
                check_adapter_config(payload, served.adapter_config(), file.filename or "upload")
            except AdapterError as e:
                raise InvalidInput(f"not an adapter of {model}: {e}") from e
    info = {**payload.get("info", {}), "uploaded": file.filename, "uploaded_version": payload["version"]}
    version = publish_adapter(served.adapter_path, payload["state_dict"], payload["config"], info)
    logger.info(f"{model}: uploaded adapter published as version {version}")
    return {"checksum": file_checksum(served.adapter_path), "modified_time": int(os.stat(served.adapter_path).st_mtime), "version": version}


def install_request_checks() -> None:
    """Check what MONAI Label's endpoints parse themselves before the app is called (idempotent)."""
    from monailabel.endpoints import datastore, infer, model
    from monailabel.utils.async_tasks.task import AsyncTask

    model.update_model = publish_uploaded_adapter

    infer.run_inference = _checked(infer.run_inference, _infer_request)
    datastore.add_image = _checked(datastore.add_image, _json_fields("params"))
    datastore.save_label = _checked(datastore.save_label, _json_fields("params"))
    datastore.update_image_info = _checked(datastore.update_image_info, _json_fields("info"))
    datastore.update_label_info = _checked(datastore.update_label_info, _json_fields("info"))
    AsyncTask.run = _task_request(AsyncTask.__dict__["run"].__func__)
