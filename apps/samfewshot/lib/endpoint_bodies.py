"""The app's own bodies for MONAI Label endpoints whose 0.8.5 code is unsafe as it stands (``lib.routes`` declares
which route each serves; the route's check has run before). Each takes the endpoint's arguments by name.

What MONAI Label does instead, and so why each exists:

* ``infer``: merges the client's ``params`` over the checked request (a params ``image`` named any server file),
  answers 500 for an unknown session, never removes a DICOM SEG result or a failed request's result file.
* ``upload_adapter``: copied any file over the served adapter, in place.
* ``check_image``: compared a checksum against the wrong string (every check failed) and answered 500 for an
  unknown algorithm.
* ``download_dataset``: left every dataset zip in the temporary folder.
* ``create_session`` / ``get_session``: unpacked tar members wherever they pointed (``../``, links), stored any
  file as a session volume, answered 500 for a session holding a folder.
* ``get_ohif``: served a folder (500) and never the viewer's nested files.
* ``proxy``: forwarded any path to the PACS (``..`` reaches its other APIs) and answered 500 on a local datastore.
* ``access_token``: answered 500 when the realm refused a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import requests
from fastapi import HTTPException
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from lib import archives
from lib.adapters import AdapterError, check_adapter_config, publish_adapter, read_adapter
from lib.checks.requests import parse_json_object
from lib.checks.volumes import check_image as check_volume
from lib.errors import InvalidInput, NotFound
from lib.networks.sam_backbone import CheckpointError

logger = logging.getLogger(__name__)


def _app():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _remove(path: str) -> None:
    from monailabel.utils.others.generic import remove_file

    remove_file(path)


def _save_upload(upload, folder: str | None = None, default_name: str = "volume.nii.gz") -> str:
    """Write an uploaded file into ``folder`` under its own (checked) name, or to a new temporary file with its
    suffixes; returns the path."""
    name = os.path.basename((upload.filename or "").replace("\\", "/"))
    name = default_name if name in ("", ".", "..") else name
    if folder:
        path = os.path.join(folder, name)
    else:
        fd, path = tempfile.mkstemp(suffix="".join(pathlib.PurePosixPath(name).suffixes))
        os.close(fd)
    with open(path, "wb") as out:
        shutil.copyfileobj(upload.file, out)
    return path


# ---- inference -----------------------------------------------------------------------------------------------
def infer(
    background_tasks, model: str, image: str = "", session_id: str = "", params: str = "{}", file=None, label=None, output=None, user=None
):
    """``POST /infer/{model}``: the image is the posted file, the session's volume or the datastore image the URL
    names; the result (and a DICOM SEG made of it) is removed once sent."""
    from monailabel.endpoints.infer import send_response

    app = _app()
    request: dict[str, Any] = {"model": model, "image": image}
    if file:
        request["image"] = _save_upload(file)
        background_tasks.add_task(_remove, request["image"])
    request.update(app.info().get("config", {}).get("infer", {}))
    options = parse_json_object(params, "params")
    request.update({k: v for k, v in options.items() if k not in ("image", "model")})  # the same by the route's check
    if session_id:
        session = app.sessions().get_session(session_id)
        request["image"], request["session"] = session.image, session.to_json()
    result = app.infer(request)
    if result.get("file"):
        background_tasks.add_task(_remove, result["file"])
    if output == "dicom_seg":
        result["dicom_seg"] = _dicom_seg(app, image, result["file"], options["label_info"])
        background_tasks.add_task(_remove, result["dicom_seg"])
    return send_response(app.datastore(), result, output, background_tasks)


def _dicom_seg(app, image: str, label: str, label_info: list) -> str:
    """A DICOM SEG of ``label`` referencing the series ``image`` (lib.dicom_seg's writer, installed in monailabel)."""
    from monailabel.datastore.utils import convert

    series = app.datastore().get_image_uri(image)
    for suffix in (".nii.gz", ".nii", ".nrrd"):
        series = series[: -len(suffix)] if series.endswith(suffix) else series
    return convert.nifti_to_dicom_seg(series, label, label_info, use_itk=True)


# ---- models --------------------------------------------------------------------------------------------------
def upload_adapter(background_tasks, model: str, file, user=None) -> dict[str, Any]:
    """``PUT /model/{model}``: the upload must be an adapter of this model's configuration whose every tensor has the
    name, shape and dtype of the served network's; it is published like a training run's (atomic, numbered, kept
    in the history), so a bad or half-sent file never replaces the served adapter."""
    from monailabel.utils.others.generic import file_checksum

    served = _app().models[model].model
    name = file.filename or "upload"
    with tempfile.NamedTemporaryFile(suffix=".pt") as upload:
        shutil.copyfileobj(file.file, upload)
        upload.flush()
        try:
            payload = read_adapter(upload.name)
            check_adapter_config(payload, served.adapter_config(), name)
            served.check_adapter_tensors(payload["state_dict"])
        except AdapterError as e:
            raise InvalidInput(f"not an adapter of {model}: {str(e).replace(upload.name, name)}") from e
        except CheckpointError as e:
            raise HTTPException(status_code=503, detail=f"{model} is unavailable, so no adapter can be checked against it: {e}") from e
    info = {**payload.get("info", {}), "uploaded": name, "uploaded_version": payload["version"]}
    version = publish_adapter(served.adapter_path, payload["state_dict"], payload["config"], info)
    logger.info(f"{model}: uploaded adapter published as version {version}")
    return {"checksum": file_checksum(served.adapter_path), "modified_time": int(os.stat(served.adapter_path).st_mtime), "version": version}


# ---- datastore -----------------------------------------------------------------------------------------------
def check_image(image: str, check_sum: str | None = None, user=None) -> dict:
    """``HEAD /datastore/image``: 200 when the image exists and, with ``check_sum`` ('[ALGO:]hexdigest'), its file
    has that digest; 404 otherwise."""
    from monailabel.utils.others.generic import file_checksum

    path = _app().datastore().get_image_uri(image)
    if not os.path.isfile(path):
        raise NotFound(f"image {image!r} has no file on the server")
    if check_sum:
        algo, _, digest = check_sum.rpartition(":") if ":" in check_sum else ("SHA256", ":", check_sum)
        if file_checksum(path, algo=algo).split(":", 1)[1] != digest.lower():
            raise NotFound(f"image {image!r} does not have the {algo} checksum {digest}")
    return {}


def download_dataset(limit_cases: int | None = None, user=None) -> FileResponse:
    """``GET /datastore/dataset``: the zip of the labelled volumes, removed from the temporary folder once sent."""
    datastore = _app().datastore()
    if not datastore.datalist():
        raise NotFound("the datastore holds no volume with a final label; there is no dataset to download")
    path = datastore.get_dataset_archive(limit_cases)
    return FileResponse(path, media_type="application/zip", filename="dataset.zip", background=BackgroundTask(_remove, path))


# ---- sessions ------------------------------------------------------------------------------------------------
def create_session(background_tasks, uncompress: bool = False, expiry: int = 0, files=None, user=None) -> dict[str, Any]:
    """``PUT /session/``: one volume file, the files of one DICOM series, or (``uncompress``) one archive of either,
    unpacked safely (``lib.archives``); the volume is checked like an upload before the session is stored."""
    sessions = _app().sessions()
    with tempfile.TemporaryDirectory(prefix="session-", ignore_cleanup_errors=True) as folder:
        received = os.path.join(folder, "received")
        os.makedirs(received)
        saved = [_save_upload(f, received) for f in files]
        volume = received if len(saved) > 1 else saved[0]
        if uncompress:
            unpacked = os.path.join(folder, "unpacked")
            archives.extract(saved[0], unpacked, os.path.basename(saved[0]))
            volume = _single_entry(unpacked)
        check_volume(volume, name=os.path.basename(volume))
        session_id, info = sessions.add_session(volume, expiry)
    logger.info(f"session {session_id} created: {info.image}")
    return {"session_id": session_id, "session_info": info.to_json()}


def _single_entry(folder: str) -> str:
    """The folder an archive was unpacked into, descending while it holds only one entry (a file or a folder)."""
    while os.path.isdir(folder) and len(entries := os.listdir(folder)) == 1:
        folder = os.path.join(folder, entries[0])
    return folder


def get_session(session_id: str, update_ts: bool = False, image: bool = False, user=None):
    info = _app().sessions().get_session(session_id, update_ts=update_ts)
    if not image:
        return info.to_json()
    if os.path.isdir(info.image):
        raise InvalidInput(f"session {session_id!r} holds a DICOM series (a folder of files), not one file to download")
    from monailabel.utils.others.generic import get_mime_type

    return FileResponse(info.image, media_type=get_mime_type(info.image), filename=os.path.basename(info.image))


# ---- OHIF and the DICOMweb proxy -----------------------------------------------------------------------------
def get_ohif(path: str, user=None) -> FileResponse:
    """``GET /ohif/{path}``: a file of the OHIF viewer monailabel ships; any other path inside it (the viewer's own
    routes, such as ``monai-label``) loads its page; a path outside it is 404."""
    import monailabel.endpoints
    from monailabel.utils.others.generic import get_mime_type

    root = os.path.realpath(os.path.join(os.path.dirname(monailabel.endpoints.__file__), "static", "ohif"))
    index = os.path.join(root, "index.html")
    target = os.path.realpath(os.path.join(root, path)) if path else index
    if os.path.commonpath([root, target]) != root:
        raise NotFound(f"{path!r} is outside the OHIF viewer")
    if not os.path.isfile(target):
        target = index
    if not os.path.isfile(target):
        raise NotFound("the OHIF viewer is not installed with this monailabel")
    return FileResponse(target, media_type=get_mime_type(target))


DICOMWEB_PATH = re.compile(r"[A-Za-z0-9._\-/]*")


def check_dicomweb_path(path: str) -> None:
    """The proxy forwards DICOMweb resource paths only (UIDs, 'studies', 'series', 'frames/1', ...): no '.' or '..'
    segment and no escape, so no request reaches another API of the PACS."""
    from monailabel.config import settings

    if not settings.MONAI_LABEL_STUDIES.startswith(("http://", "https://")):
        raise NotFound("the DICOMweb proxy serves a DICOMweb datastore; this server's datastore is a local folder")
    if not DICOMWEB_PATH.fullmatch(path) or any(part in (".", "..") for part in path.split("/")):
        raise InvalidInput(f"{path[:120]!r} is not a DICOMweb resource path (letters, digits, '.', '-', '_' and '/'; no '..')")


def proxy(op: str):
    """``/proxy/dicom/{op}/{path}``: MONAI Label's forwarding to the PACS, in a worker thread (its calls block) with
    the timeouts of ``monailabel_compat.PACS_TIMEOUT_S``: 504 when the PACS does not answer in time, 502 when it
    cannot be reached. The event loop, and so every other client, goes on meanwhile."""

    async def forward(request, path: str, user=None):
        from monailabel.endpoints.proxy import proxy_dicom

        await request.body()  # read here, on the server's loop; the thread's call finds it read
        with pacs_errors():
            return await asyncio.to_thread(asyncio.run, proxy_dicom(request, op, path))

    return forward


@contextlib.contextmanager
def pacs_errors() -> Iterator[None]:
    """A request to the PACS (the proxy's, the DICOMweb datastore's) that failed, as 504 when it timed out
    (``monailabel_compat.PACS_TIMEOUT_S``) and 502 otherwise, naming the PACS."""
    from monailabel.config import settings

    try:
        yield
    except requests.Timeout as e:
        raise HTTPException(status_code=504, detail=f"the PACS at {settings.MONAI_LABEL_STUDIES} did not answer in time: {e}") from e
    except requests.RequestException as e:
        raise HTTPException(status_code=502, detail=f"the PACS at {settings.MONAI_LABEL_STUDIES} did not answer: {e}") from e


# ---- administration ------------------------------------------------------------------------------------------
def check_nvidia_smi(args) -> None:
    if not shutil.which("nvidia-smi"):
        raise NotFound("nvidia-smi is not installed on this server (no NVIDIA driver)")


async def access_token(form_data):
    """``POST /auth/token``: MONAI Label's login proxy to the realm; a refused password is 401, an unreachable or
    failing realm 502."""
    from monailabel.endpoints.login import access_token as upstream

    try:
        return await upstream(form_data)
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        if status in (400, 401):
            raise HTTPException(status_code=401, detail="the realm refused this user name and password") from e
        raise HTTPException(status_code=502, detail=f"the realm's token endpoint answered {status}") from e
    except requests.RequestException as e:
        raise HTTPException(status_code=502, detail=f"the realm's token endpoint did not answer: {e}") from e
