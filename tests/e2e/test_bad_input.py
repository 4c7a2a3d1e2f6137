"""Hostile and broken input against one real server, route by route.

Every route the server lists in ``/openapi.json`` must have at least one case here (``test_every_route_has_a_case``
fails otherwise, so a route added later cannot slip through); the routes it does not list (closed, optional and
off, static files) have cases too. After each case:

* the status is the expected 4xx (never 500) and the answer names the problem;
* the server still answers ``/info/``;
* the datastore and the model folder are byte-identical, and nothing else changed: not the test's folders
  (the server's HOME and temporary folder included: a request's temporary files are gone once it is answered), not
  ``/tmp``, where the archive and NRRD cases aim.

The broken volumes come from the ``bad_volumes`` fixture (tests/conftest.py), the hostile archives, headers and
adapters from ``hostile_files`` below. The datastore also holds a volume with a NaN voxel placed there by hand
(``broken_stored``): files copied into a studies folder are checked when first used. Good requests are accepted
at the end, so the checks do not simply refuse everything.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import shutil
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nibabel as nib
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.e2e

BROKEN_STORED = "broken_stored"
LABEL_INFO = [{"name": "white matter", "idx": 1}, {"name": "grey matter", "idx": 2}]
ESCAPE = "/tmp/samfewshot-escape"  # where the archive and header cases aim (absolute, or by ../ from the temp folder)
UP = "../" * 16  # enough ../ to reach / from any temporary folder
DEEP = "[" * 10_000 + "]" * 10_000
# Routes that /openapi.json does not list: closed, optional groups that are off by default, static files.
UNLISTED = {
    "POST /infer/wsi/{model}",
    "POST /infer/wsi_v2/{model}",
    "POST /reload",
    "GET /logs/",
    "GET /logs/gpu",
    "GET /batch/infer",
    "DELETE /batch/infer",
    "POST /batch/infer/{model}",
    "GET /static/{path}",
    "GET /openapi.json",
    "GET /docs",
}


@dataclass(frozen=True)
class Case:
    id: str
    route: str  # "METHOD /path" as /openapi.json names it
    url: str  # path and query, sent byte for byte when ``raw`` (no client-side normalisation of '..')
    status: int
    match: str  # must appear in the answer
    files: tuple[tuple[str, str], ...] = ()  # (form field, key of the bad_volumes or hostile_files fixtures)
    form: dict[str, str] = field(default_factory=dict)
    body: Any = None  # JSON body; a str is sent as it is
    raw: bool = False

    @property
    def method(self) -> str:
        return self.route.split()[0]

    def send(self, server, volumes: dict[str, Path]):
        if self.raw:
            return raw_request(server.url, self.method, self.url)
        kwargs: dict[str, Any] = {"data": self.form}
        if self.files:
            kwargs["files"] = [(key, (upload_name(name), volumes[name.split("|")[0]].read_bytes())) for key, name in self.files]
        if isinstance(self.body, str):
            kwargs = {"data": self.body, "headers": {"Content-Type": "application/json"}}
        elif self.body is not None:
            kwargs = {"json": self.body}
        return server.session.request(self.method, server.url + self.url, timeout=120, **kwargs)


@dataclass
class RawResponse:
    status_code: int
    text: str


def raw_request(base: str, method: str, target: str) -> RawResponse:
    host = urlsplit(base)
    connection = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
    connection.request(method, target)
    response = connection.getresponse()
    return RawResponse(response.status, response.read().decode(errors="replace"))


def upload_name(key: str) -> str:
    """A fixture key may carry the name to upload under after '|' (names a file system will not hold)."""
    return key.split("|", 1)[1] if "|" in key else key


def image(id: str, volume: str, match: str, image_id: str = "uploaded", status: int = 422, route="PUT /datastore/image", **kw) -> Case:
    path = "/datastore/" if route == "PUT /datastore/" else "/datastore/image"
    return Case(f"image-{id}", route, f"{path}?image={image_id}", status, match, (("file", volume),), **kw)


def label(id: str, volume: str, match: str, image_id: str = "brain_002", tag: str = "final", status: int = 422, params: Any = None) -> Case:
    form = {"params": params if isinstance(params, str) else json.dumps(params or {})}
    return Case(
        f"label-{id}", "PUT /datastore/label", f"/datastore/label?image={image_id}&tag={tag}", status, match, (("label", volume),), form
    )


def infer_file(id: str, volume: str, match: str) -> Case:
    return Case(f"infer-file-{id}", "POST /infer/{model}", "/infer/hf_sam?output=json", 422, match, (("file", volume),))


def infer(id: str, query: str, status: int, match: str, params: Any = None, **kw) -> Case:
    if params is not None:
        kw["form"] = {"params": params if isinstance(params, str) else json.dumps(params)}
    return Case(f"infer-{id}", "POST /infer/{model}", f"/infer/{query}", status, match, **kw)


def train(id: str, url: str, body: Any, match: str, status: int = 422) -> Case:
    return Case(f"train-{id}", f"POST {url.split('?')[0] if url.endswith('/') else '/train/{model}'}", url, status, match, body=body)


def session(id: str, archive: str, match: str, status: int = 422, query: str = "?uncompress=true") -> Case:
    return Case(f"session-{id}", "PUT /session/", f"/session/{query}", status, match, (("files", archive),))


CASES = [
    # ---- PUT /datastore/image (and 3D Slicer's PUT /datastore/) -----------------------------------------------
    image("truncated-gz", "trunc.nii.gz", "truncated or corrupt?): Compressed file ended"),
    image("truncated-nii", "trunc.nii", "is truncated: its header promises"),
    image("corrupt-gz", "corrupt.nii.gz", "cannot read the header of 'uploaded' as NIFTI"),
    image("nrrd-wrong-sizes", "wrong_size.nrrd", "Size of the data does not equal the product of all the dimensions"),
    image("nrrd-bad-header", "bad_header.nrrd", "cannot read image 'uploaded' (NRRD"),
    image("nrrd-detached-relative", "detached_relative.nrrd", "whose voxels lie in another file"),
    image("nrrd-detached-absolute", "detached_absolute.nrrd", "never a file a header points to"),
    image("nhdr", "detached_relative.nrrd|volume.nhdr", "file type '.nhdr' is not stored"),
    image("dicom-file", "trunc.dcm", "file type '.dcm' is not stored by this datastore"),
    image("text-file", "notes.txt", "file type '.txt' is not stored by this datastore"),
    image("2d", "2d.nii.gz", "is 2D (118, 142)"),
    image("4d", "4d.nii.gz", "has 4 dimensions (40, 40, 20, 3)"),
    image("all-zero", "zeros.nii.gz", "is empty: every voxel is 0.0"),
    image("constant", "constant.nii.gz", "is empty: every voxel is 7.0"),
    image("nan", "nan.nii.gz", "has 1 NaN voxel value"),
    image("inf", "inf.nii.gz", "has 1 infinite voxel value"),
    image("affine-nan", "affine_nan.nii.gz", "has an affine that is not finite"),
    image("affine-zero", "affine_zero.nii.gz", "has an affine that is not invertible"),
    image("huge-header", "huge.nii", "declares 30000x30000x30000 = 27000000000000 voxels"),
    image("huge-header-gz", "huge.nii.gz", "declares 2048x2048x2048"),
    image("id-parent-dir", "image.nii.gz", "image id '../escape' is not a plain name", image_id="../escape"),
    image("id-subdir", "image.nii.gz", "image id 'sub/dir' is not a plain name", image_id="sub/dir"),
    image("id-hidden", "image.nii.gz", "image id '.hidden' is not a plain name", image_id=".hidden"),
    image("id-300-chars", "image.nii.gz", "is 300 bytes long; at most 128", image_id="a" * 300),
    image("id-control", "image.nii.gz", "is not a plain name", image_id="a%0Ab"),
    image("filename-nul", "image.nii.gz|a\x00b.nii.gz", "holds control characters"),
    image("filename-extension-200", "image.nii.gz|a." + "x" * 200, "at most 16 characters"),
    image("filename-id-from-name", "image.nii.gz|..%2F..%2Fx.nii.gz", "not a plain name", image_id=""),
    image("params-malformed", "image.nii.gz", "'params' is not valid JSON", form={"params": "{bad"}),
    image("params-list", "image.nii.gz", "'params' must be a JSON object, got list", form={"params": "[1]"}),
    image("params-deep", "image.nii.gz", "nested deeper than 32 levels", form={"params": '{"a":' + DEEP + "}"}),
    image(
        "params-2mb",
        "image.nii.gz",
        "Part exceeded maximum size of 1024KB",
        status=400,
        form={"params": json.dumps({"a": "x" * (2 << 20)})},
    ),
    image("slicer-parent-dir", "image.nii.gz", "image id '../escape' is not a plain name", image_id="../escape", route="PUT /datastore/"),
    image("slicer-affine-zero", "affine_zero.nii.gz", "has an affine that is not invertible", route="PUT /datastore/"),
    # ---- PUT /datastore/label --------------------------------------------------------------------------------
    label("shape", "label_shape.nii.gz", "shape (116, 142, 125) differs from the image's (118, 142, 125)"),
    label("origin", "label_shift.nii.gz", "does not match its image's grid: affine"),
    label("spacing", "label_spacing.nii.gz", "does not match its image's grid: affine"),
    label("affine-zero", "label_affine_zero.nii.gz", "has an affine that is not invertible"),
    label("id-7", "label_7.nii.gz", "holds ids [7] that are not in the model's labels (ids [1, 2]"),
    label("id-negative", "label_neg.nii.gz", "holds negative ids [-1]"),
    label("id-fraction", "label_half.nii.gz", "holds non-integer values [0.5]"),
    label("nan", "label_nan.nii.gz", "holds NaN or infinite values"),
    label("layers", "label_layers.seg.nrrd", "several layers"),
    label("slicer-segments", "label_segments_5.seg.nrrd", "holds ids [5] that are not in its segment names"),
    label("truncated", "trunc.nii.gz", "cannot read label 'brain_002 (final)'"),
    label("nrrd-detached", "detached_absolute.nrrd", "whose voxels lie in another file"),
    label("id-not-in-label-info", "label_3.nii.gz", "holds ids [3] that are not in its label_info", params={"label_info": LABEL_INFO}),
    label("label-info-malformed", "label.nii.gz", "label_info must be a list", params={"label_info": "grey matter"}),
    label("params-malformed", "label.nii.gz", "'params' is not valid JSON", params="{bad"),
    label("params-deep", "label.nii.gz", "nested deeper than 32 levels", params='{"a":' + DEEP + "}"),
    label("unknown-image", "label.nii.gz", "image 'nosuch' is not in the datastore", image_id="nosuch", status=404),
    label("image-id-path", "label.nii.gz", "image id '../brain_002' is not a plain name", image_id="../brain_002"),
    label("tag-parent-dir", "label.nii.gz", "label tag '../../evil' is not a plain name", tag="../../evil"),
    label("tag-subdir", "label.nii.gz", "label tag 'a/b' is not a plain name", tag="a/b"),
    label("tag-300-chars", "label.nii.gz", "is 300 bytes long", tag="t" * 300),
    label("filename-nul", "label.nii.gz|x\x00.nii.gz", "holds control characters"),
    label("broken-image", "label.nii.gz", "has 1 NaN voxel value", image_id=BROKEN_STORED),
    # ---- the other datastore routes --------------------------------------------------------------------------
    Case("datastore-output", "GET /datastore/", "/datastore/?output=../../etc", 422, "Input should be 'train', 'stats' or 'all'"),
    Case("image-delete-unknown", "DELETE /datastore/image", "/datastore/image?id=nosuch", 404, "image 'nosuch' is not in the datastore"),
    Case("image-delete-path", "DELETE /datastore/image", "/datastore/image?id=../brain_002", 422, "not a plain name"),
    Case("slicer-delete-path", "DELETE /datastore/", "/datastore/?id=/etc/hostname", 422, "not a plain name"),
    Case("image-head-unknown", "HEAD /datastore/image", "/datastore/image?image=nosuch", 404, ""),
    Case("image-head-algorithm", "HEAD /datastore/image", "/datastore/image?image=brain_002&check_sum=CRC32:abc", 422, ""),
    Case("image-head-digest", "HEAD /datastore/image", "/datastore/image?image=brain_002&check_sum=SHA256:xyz", 422, ""),
    Case("image-get-path", "GET /datastore/image", "/datastore/image?image=/etc/hostname", 422, "not a plain name"),
    Case("image-get-unknown", "GET /datastore/image", "/datastore/image?image=nosuch", 404, "image 'nosuch' is not in the datastore"),
    Case("image-info-get-unknown", "GET /datastore/image/info", "/datastore/image/info?image=nosuch", 404, "not in the datastore"),
    Case(
        "image-info-malformed",
        "PUT /datastore/image/info",
        "/datastore/image/info?image=brain_002",
        422,
        "'info' is not valid JSON",
        form={"info": "{bad"},
    ),
    Case(
        "image-info-deep",
        "PUT /datastore/image/info",
        "/datastore/image/info?image=brain_002",
        422,
        "nested deeper than 32",
        form={"info": DEEP},
    ),
    Case(
        "image-info-unknown",
        "PUT /datastore/image/info",
        "/datastore/image/info?image=nosuch",
        404,
        "image 'nosuch' is not in the datastore",
        form={"info": "{}"},
    ),
    Case(
        "label-delete-unknown", "DELETE /datastore/label", "/datastore/label?id=nosuch&tag=final", 404, "no label 'nosuch' with tag 'final'"
    ),
    Case(
        "label-delete-tag-path",
        "DELETE /datastore/label",
        "/datastore/label?id=brain_000&tag=../../x",
        422,
        "label tag '../../x' is not a plain name",
    ),
    Case("label-head-unknown", "HEAD /datastore/label", "/datastore/label?image=brain_005&tag=final", 404, ""),
    Case("label-get-tag-path", "GET /datastore/label", "/datastore/label?label=brain_000&tag=../images", 422, "not a plain name"),
    Case("label-get-unknown", "GET /datastore/label", "/datastore/label?label=nosuch&tag=final", 404, "no label 'nosuch'"),
    Case("label-info-get-unknown", "GET /datastore/label/info", "/datastore/label/info?label=nosuch&tag=final", 404, "no label 'nosuch'"),
    Case(
        "label-info-put-unknown",
        "PUT /datastore/label/info",
        "/datastore/label/info?label=nosuch&tag=final",
        404,
        "no label",
        form={"info": "{}"},
    ),
    Case(
        "label-info-put-deep",
        "PUT /datastore/label/info",
        "/datastore/label/info?label=brain_000&tag=final",
        422,
        "nested deeper",
        form={"info": DEEP},
    ),
    Case(
        "updatelabelinfo-unknown",
        "PUT /datastore/updatelabelinfo",
        "/datastore/updatelabelinfo?label=nosuch&tag=final",
        404,
        "no label",
        form={"params": "{}"},
    ),
    Case("dataset-limit-zero", "GET /datastore/dataset", "/datastore/dataset?limit_cases=0", 422, "limit_cases must be >= 1"),
    Case("dataset-limit-word", "GET /datastore/dataset", "/datastore/dataset?limit_cases=all", 422, "valid integer"),
    # ---- POST /infer/{model} ---------------------------------------------------------------------------------
    infer("unknown-model", "nosuch?image=brain_002", 404, "unknown model 'nosuch'; valid: hf_sam, hf_sam_interactive, masg_sam"),
    infer("unknown-image", "hf_sam?image=nosuch", 404, "image 'nosuch' is not in the datastore"),
    infer("server-path", "hf_sam?image=/etc/hostname", 422, "image id '/etc/hostname' is not a plain name"),
    infer("image-url", "hf_sam?image=http://127.0.0.1:1/x.nii.gz", 422, "is not a plain name"),
    infer("id-300-chars", "hf_sam?image=" + "b" * 300, 422, "is 300 bytes long"),
    infer(
        "params-image-path",
        "hf_sam?image=brain_002&output=json",
        422,
        "differs from the image 'brain_002' the URL names",
        params={"image": "/work/any/path.nii.gz"},
    ),
    infer("params-image-list", "hf_sam?image=brain_002", 422, "differs from the image", params={"image": ["brain_002"]}),
    infer("params-model", "hf_sam?image=brain_002", 422, "differs from the model 'hf_sam'", params={"model": "../x"}),
    infer("params-image-path-key", "hf_sam?image=brain_002", 422, "may not set image_path", params={"image_path": "/etc/hostname"}),
    infer(
        "params-save-final",
        "hf_sam?image=brain_002",
        422,
        "may not set label_tag, save_label",
        params={"save_label": True, "label_tag": "final"},
    ),
    infer("params-skip-writer", "hf_sam?image=brain_002", 422, "may not set skip_writer", params={"skip_writer": True}),
    infer("params-malformed", "hf_sam?image=brain_002", 422, "'params' is not valid JSON", params="{bad"),
    infer("params-string", "hf_sam?image=brain_002", 422, "'params' must be a JSON object, got str", params='"x"'),
    infer("params-deep", "hf_sam?image=brain_002", 422, "nested deeper than 32 levels", params='{"foreground":' + DEEP + "}"),
    infer("result-dtype", "hf_sam?image=brain_002", 422, "result_dtype must be one of uint8", params={"result_dtype": "object"}),
    infer(
        "result-extension",
        "hf_sam?image=brain_002",
        422,
        "result_extension must be one of .nii.gz",
        params={"result_extension": "/../../x.nii.gz"},
    ),
    infer("result-compress", "hf_sam?image=brain_002", 422, "result_compress must be true or false", params={"result_compress": "maybe"}),
    infer("device", "hf_sam?image=brain_002", 422, "device must be 'cpu', 'cuda' or 'cuda:N'", params={"device": "tpu:9"}),
    infer("logging", "hf_sam?image=brain_002", 422, "logging must be one of DEBUG", params={"logging": "LOUD"}),
    infer(
        "points-two", "hf_sam?image=brain_002", 422, "foreground must be a list of at most 1000 [i, j, k]", params={"foreground": [[1, 2]]}
    ),
    infer("points-word", "hf_sam?image=brain_002", 422, "background must be a list", params={"background": [["a", 1, 2]]}),
    infer("points-nan", "hf_sam?image=brain_002", 422, "foreground must be", params='{"foreground": [[NaN, 1, 2]]}'),
    infer("points-many", "hf_sam?image=brain_002", 422, "at most 1000", params={"foreground": [[1, 2, 3]] * 1001}),
    infer("roi", "hf_sam?image=brain_002", 422, "roi must be [i0, i1, j0, j1, k0, k1]", params={"roi": [1, 2]}),
    infer("interactive-outside", "hf_sam_interactive?image=brain_002", 422, "lie outside the volume", params={"foreground": [[1, 2, 999]]}),
    infer(
        "interactive-label",
        "hf_sam_interactive?image=brain_002",
        422,
        "label 'gray matter' is not one of hf_sam's labels but close to 'grey matter'",
        params={"label": "gray matter", "foreground": [[60, 70, 62]]},
    ),
    infer(
        "interactive-nothing",
        "hf_sam_interactive?image=brain_002",
        422,
        "send foreground or background points",
        params={"label": "grey matter"},
    ),
    infer(
        "segmentation-clicks", "hf_sam?image=brain_002", 422, "send foreground to hf_sam_interactive", params={"foreground": [[60, 70, 62]]}
    ),
    infer("label-info", "hf_sam?image=brain_002", 422, "label_info must be a list", params={"label_info": {"a": 1}}),
    infer("unknown-session", "hf_sam?image=x&session_id=nosuch", 404, "session 'nosuch' does not exist"),
    infer("session-path", "hf_sam?image=x&session_id=..", 422, "session id '..' is not a plain name"),
    infer("session-and-file", "hf_sam?session_id=nosuch", 422, "as a file or name a session, not both", files=(("file", "image.nii.gz"),)),
    infer(
        "dicom-seg-local",
        "hf_sam?image=brain_002&output=dicom_seg",
        422,
        "output=dicom_seg needs a DICOMweb datastore",
        params={"label_info": []},
    ),
    infer("output-unknown", "hf_sam?image=brain_002&output=../x", 422, "Input should be 'image', 'json', 'all' or 'dicom_seg'"),
    infer("label-file", "hf_sam?image=brain_002", 422, "takes a label file", files=(("label", "label.nii.gz"),)),
    infer("filename-nul", "hf_sam", 422, "holds control characters", files=(("file", "image.nii.gz|a\x00.nii.gz"),)),
    infer("filename-extension-200", "hf_sam", 422, "at most 16 characters", files=(("file", "image.nii.gz|a." + "y" * 200),)),
    infer("nrrd-detached", "hf_sam?output=json", 422, "whose voxels lie in another file", files=(("file", "detached_absolute.nrrd"),)),
    infer(
        "nhdr-detached", "hf_sam?output=json", 422, "whose voxels lie in another file", files=(("file", "detached_relative.nrrd|x.nhdr"),)
    ),
    infer("stored-nan", f"hf_sam?image={BROKEN_STORED}", 422, "has 1 NaN voxel value"),
    infer_file("truncated", "trunc.nii.gz", "truncated or corrupt?): Compressed file ended"),
    infer_file("2d", "2d.nii.gz", "is 2D (118, 142)"),
    infer_file("4d", "4d.nii.gz", "has 4 dimensions"),
    infer_file("nan", "nan.nii.gz", "NaN voxel value"),
    infer_file("affine-nan", "affine_nan.nii.gz", "affine that is not finite"),
    infer_file("all-zero", "zeros.nii.gz", "is empty: every voxel is 0.0"),
    infer_file("huge-header", "huge.nii", "declares 30000x30000x30000"),
    infer_file("dicom-truncated", "trunc.dcm", "(DICOM; truncated or corrupt?)"),
    infer_file("dicom-not-dicom", "not_dicom.dcm", "as DICOM: File is missing DICOM File Meta Information"),
    infer_file("dicom-one-slice", "slice.dcm", "is a single slice (142, 118, 1): a 2D image"),
    infer_file("text-file", "notes.txt", "is not a volume format this server reads"),
    Case(
        "wsi-v2",
        "POST /infer/wsi_v2/{model}",
        "/infer/wsi_v2/hf_sam?image=/etc/hostname",
        404,
        "serves no whole-slide models",
        form={"wsi": json.dumps({"params": {"image": "/etc/hostname"}})},
    ),
    Case("wsi", "POST /infer/wsi/{model}", "/infer/wsi/hf_sam?image=brain_002", 404, "serves no whole-slide models", body={}),
    Case("batch-infer", "POST /batch/infer/{model}", "/batch/infer/hf_sam", 404, "name 'batch_infer' in --conf endpoints", body={}),
    Case("batch-status", "GET /batch/infer", "/batch/infer", 404, "--conf endpoints"),
    Case("batch-stop", "DELETE /batch/infer", "/batch/infer", 404, "--conf endpoints"),
    # ---- /model/{model} ----------------------------------------------------------------------------------------
    Case("model-get-unknown", "GET /model/{model}", "/model/nosuch", 404, "unknown model 'nosuch'"),
    Case("model-get-path", "GET /model/{model}", "/model/..%2F..%2Fetc%2Fhostname", 404, "Not Found"),
    Case("model-info-unknown", "GET /model/info/{model}", "/model/info/..", 404, "unknown model '..'", raw=True),
    Case("model-delete-unknown", "DELETE /model/{model}", "/model/nosuch", 404, "unknown model 'nosuch'"),
    Case("adapter-shape", "PUT /model/{model}", "/model/hf_sam", 422, "has shape (1,), model", (("file", "adapter_shape.pt"),)),
    Case(
        "adapter-dtype",
        "PUT /model/{model}",
        "/model/hf_sam",
        422,
        "has dtype torch.float64, model torch.float32",
        (("file", "adapter_dtype.pt"),),
    ),
    Case("adapter-nan", "PUT /model/{model}", "/model/hf_sam", 422, "holds NaN or infinite values", (("file", "adapter_nan.pt"),)),
    Case("adapter-extra", "PUT /model/{model}", "/model/hf_sam", 422, "unknown tensors ['x.weight']", (("file", "adapter_extra.pt"),)),
    Case("adapter-pickle", "PUT /model/{model}", "/model/hf_sam", 422, "cannot read adapter", (("file", "adapter_pickle.pt"),)),
    Case("adapter-unknown-model", "PUT /model/{model}", "/model/nosuch", 404, "unknown model 'nosuch'", (("file", "adapter_shape.pt"),)),
    # ---- training ----------------------------------------------------------------------------------------------
    Case("train-status-flag", "GET /train/", "/train/?all=maybe", 422, "valid boolean"),
    Case("train-stop-idle", "DELETE /train/", "/train/?id=../x", 200, "null"),
    train("unknown-model", "/train/nosuch", {}, "unknown model 'nosuch'; valid: hf_sam, masg_sam", 404),
    train("epochs-word", "/train/hf_sam", {"max_epochs": "many"}, "max_epochs must be a positive integer, got 'many'"),
    train("epochs-zero", "/train/hf_sam", {"max_epochs": 0}, "max_epochs must be a positive integer, got 0"),
    train("lr-negative", "/train/hf_sam", {"lr": -1}, "lr must be a positive number, got -1"),
    train("val-split", "/train/hf_sam", {"val_split": 1.5}, "val_split must be a number in [0, 1), got 1.5"),
    train("json-malformed", "/train/hf_sam", "{bad", "JSON decode error"),
    train("json-deep", "/train/hf_sam", DEEP, "There was an error parsing the body", 400),
    train("body-model", "/train/hf_sam", {"model": "../x"}, "model '../x' in the train options differs from the model 'hf_sam'"),
    train("option-200kb", "/train/hf_sam", {"note": "x" * 200_000}, "bytes of JSON; at most 16384"),
    train("run-name", "/train/hf_sam", {"name": "../../escape"}, "name must be a plain name"),
    train("tracking-uri", "/train/hf_sam", {"tracking_uri": f"file://{ESCAPE}"}, "tracking_uri must be empty"),
    train("datalist", "/train/hf_sam", {"train_ds": "/etc/hostname"}, "may not set train_ds"),
    train("rendezvous", "/train/hf_sam", {"distributed_url": f"file://{ESCAPE}"}, "may not set distributed_url"),
    train("bundle-path", "/train/hf_sam", {"bundle_path": "/tmp"}, "may not set bundle_path"),
    train("gpus", "/train/hf_sam", {"gpus": "0; rm -rf /"}, "gpus must be 'all' or GPU indices"),
    train("all-model", "/train/", {"model": "../x"}, "name a model in the URL"),
    train("all-per-model", "/train/", {"hf_sam": {"name": "../../escape"}}, "name must be a plain name"),
    train("all-per-model-list", "/train/", {"masg_sam": [1]}, "train options of masg_sam must be a JSON object"),
    train("all-option", "/train/", {"max_epochs": -3}, "max_epochs must be a positive integer"),
    # ---- active learning and scoring ----------------------------------------------------------------------------
    Case(
        "al-unknown-strategy",
        "POST /activelearning/{strategy}",
        "/activelearning/nosuch",
        404,
        "unknown strategy 'nosuch'; valid: clasp_pe, diversity, first",
        body={},
    ),
    Case("al-json-malformed", "POST /activelearning/{strategy}", "/activelearning/random", 422, "JSON decode error", body="{bad"),
    Case(
        "al-strategy",
        "POST /activelearning/{strategy}",
        "/activelearning/random",
        422,
        "strategy '../x' in the active learning options differs",
        body={"strategy": "../x"},
    ),
    Case(
        "al-seed",
        "POST /activelearning/{strategy}",
        "/activelearning/random",
        422,
        "seed must be a non-negative integer or a string",
        body={"seed": {"a": 1}},
    ),
    Case("al-big", "POST /activelearning/{strategy}", "/activelearning/random", 422, "at most 16384", body={"client_id": "x" * 20_000}),
    Case("scoring-status-flag", "GET /scoring/", "/scoring/?check_if_running=perhaps", 422, "valid boolean"),
    Case("scoring-stop-idle", "DELETE /scoring/", "/scoring/", 200, "null"),
    Case(
        "scoring-unknown-method",
        "POST /scoring/{method}",
        "/scoring/nosuch",
        404,
        "unknown scoring method 'nosuch'; valid: embedding, uncertainty",
        body={},
    ),
    Case("scoring-json-malformed", "POST /scoring/{method}", "/scoring/uncertainty", 422, "JSON decode error", body="{bad"),
    Case(
        "scoring-method",
        "POST /scoring/{method}",
        "/scoring/uncertainty",
        422,
        "method '../x' in the scoring options differs",
        body={"method": "../x"},
    ),
    Case(
        "scoring-model",
        "POST /scoring/{method}",
        "/scoring/uncertainty?run_sync=true",
        404,
        "unknown scoring model 'nosuch'",
        body={"model": "nosuch"},
    ),
    Case("scoring-all-method", "POST /scoring/", "/scoring/", 422, "name a scoring method in the URL", body={"method": "../x"}),
    Case(
        "scoring-all-per-method", "POST /scoring/", "/scoring/", 422, "may not set bundle_path", body={"embedding": {"bundle_path": "/tmp"}}
    ),
    # ---- sessions (3D Slicer's upload of a volume that is not in the datastore) --------------------------------
    session("tar-parent-dir", "slip.tar.gz", "which points outside its folder"),
    session("tar-absolute", "absolute.tar.gz", "which points outside its folder"),
    session("tar-symlink", "symlink.tar.gz", "is a link or device, not a regular file"),
    session("tar-hardlink", "hardlink.tar.gz", "is a link or device, not a regular file"),
    session("tar-device", "device.tar", "is a link or device, not a regular file"),
    session("zip-parent-dir", "slip.zip", "which points outside its folder"),
    session("zip-symlink", "symlink.zip", "is not a regular file"),
    session("not-an-archive", "image.nii.gz|volume.zip", "is not a zip or tar archive"),
    session("archive-of-text", "text.zip", "is not a volume format this server reads"),
    session("not-a-volume", "notes.txt", "is not a volume format this server reads", query=""),
    session("nan-volume", "nan.nii.gz", "has 1 NaN voxel value", query=""),
    session("nrrd-detached", "detached_relative.nrrd", "whose voxels lie in another file", query=""),
    session("filename-nul", "image.nii.gz|v\x00.nii.gz", "holds control characters", query=""),
    session("filename-parent", "nan.nii.gz|..", "has 1 NaN voxel value", query=""),
    session("expiry-negative", "image.nii.gz", "expiry must be >= 0", query="?expiry=-1"),
    Case(
        "session-two-archives",
        "PUT /session/",
        "/session/?uncompress=true",
        422,
        "takes one archive",
        (("files", "slip.zip"), ("files", "slip.tar.gz")),
    ),
    Case("session-get-unknown", "GET /session/{session_id}", "/session/nosuch", 404, "session 'nosuch' does not exist"),
    Case("session-get-parent", "GET /session/{session_id}", "/session/..", 422, "session id '..' is not a plain name", raw=True),
    Case("session-delete-parent", "DELETE /session/{session_id}", "/session/..", 422, "session id '..' is not a plain name", raw=True),
    Case("session-delete-unknown", "DELETE /session/{session_id}", "/session/nosuch", 404, "does not exist"),
    # ---- OHIF, the DICOMweb proxy, static files, documentation ----------------------------------------------
    Case("ohif-parent", "GET /ohif/{path}", "/ohif/..", 404, "is outside the OHIF viewer", raw=True),
    Case("ohif-escape", "GET /ohif/{path}", "/ohif/../../../../../../etc/hostname", 404, "is outside the OHIF viewer", raw=True),
    Case("ohif-absolute", "GET /ohif/{path}", "/ohif//etc/hostname", 404, "is outside the OHIF viewer", raw=True),
    Case("ohif-encoded", "GET /ohif/{path}", "/ohif/%2e%2e/%2e%2e/%2e%2e/etc/hostname", 404, "is outside the OHIF viewer", raw=True),
    *[
        Case(
            f"proxy-{method.lower()}-{op or 'root'}",
            f"{method} /proxy/dicom/{op + '/' if op else ''}{{path}}",
            f"/proxy/dicom/{op + '/' if op else ''}../../tools/execute-script",
            404,
            "this server's datastore is a local folder",
            raw=True,
        )
        for method in ("GET", "POST")
        for op in ("wado", "qido", "stow", "")
    ],
    Case("static-escape", "GET /static/{path}", "/static/../../../../../../etc/hostname", 404, "Not Found", raw=True),
    Case("static-encoded", "GET /static/{path}", "/static/%2e%2e/%2e%2e/app.py", 404, "Not Found", raw=True),
    Case("docs-page", "GET /", "/?url=file:///etc/hostname", 200, "swagger-ui"),
    Case("favicon", "GET /favicon.ico", "/favicon.ico/../../etc/hostname", 404, "Not Found", raw=True),
    Case("redoc", "GET /docs", "/docs?spec=/etc/hostname", 200, "redoc"),
    Case("openapi", "GET /openapi.json", "/openapi.json?x=/etc/hostname", 200, '"openapi"'),
    Case("info-token", "GET /info/", "/info/?token=../../etc/hostname", 200, '"name":"samfewshot"'),
    Case("reload", "POST /reload", "/reload", 404, "restart the server instead"),
    Case("logs-huge", "GET /logs/", "/logs/?lines=99999999999999999999", 404, "name 'logs' in --conf endpoints"),
    Case("logs-gpu", "GET /logs/gpu", "/logs/gpu", 404, "name 'logs' in --conf endpoints"),
]


def digests(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under ``folder`` by content, but those under the ``skip`` folders (relative)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not str(p.relative_to(folder)).startswith(skip) and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory, bad_volumes) -> dict[str, Path]:
    """Archives that try to write outside their folder, NRRD headers pointing at other files, NIfTI headers with
    broken affines, and adapters that do not fit hf_sam (tiny), next to ``bad_volumes``."""
    out = tmp_path_factory.mktemp("hostile")
    files = dict(bad_volumes)
    volume = bad_volumes["image.nii.gz"].read_bytes()

    def put(name: str, content: bytes) -> None:
        files[name] = out / name
        files[name].write_bytes(content)

    def tar(name: str, *members: tuple[str, str]) -> None:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz" if name.endswith(".gz") else "w") as archive:
            for member, kind in members:
                info = tarfile.TarInfo(member)
                if kind == "file":
                    info.size = len(volume)
                    archive.addfile(info, io.BytesIO(volume))
                    continue
                info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[kind]
                info.linkname = "/etc/hostname"
                archive.addfile(info)
        put(name, buffer.getvalue())

    tar("slip.tar.gz", (f"{UP}{ESCAPE[1:]}-tar.nii.gz", "file"))
    tar("absolute.tar.gz", (f"{ESCAPE}-abs.nii.gz", "file"))
    tar("symlink.tar.gz", ("volume.nii.gz", "symlink"))
    tar("hardlink.tar.gz", ("volume.nii.gz", "hardlink"))
    tar("device.tar", ("volume.nii.gz", "device"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{UP}{ESCAPE[1:]}-zip.nii.gz", volume)
    put("slip.zip", buffer.getvalue())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("volume.nii.gz")
        link.external_attr = 0o120777 << 16  # a symbolic link, as Info-ZIP stores one
        archive.writestr(link, "/etc/hostname")
    put("symlink.zip", buffer.getvalue())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a volume")
    put("text.zip", buffer.getvalue())

    header = "NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: {}\n\n"
    put("detached_relative.nrrd", header.format(f"{UP}etc/hostname").encode())
    put("detached_absolute.nrrd", header.format("/etc/hostname").encode())

    ref = nib.load(bad_volumes["image.nii.gz"])
    data = np.asarray(ref.dataobj)
    label = np.asarray(nib.load(bad_volumes["label.nii.gz"]).dataobj)
    for name, fill, voxels in (
        ("affine_nan.nii.gz", np.nan, data),
        ("affine_zero.nii.gz", 0.0, data),
        ("label_affine_zero.nii.gz", 0.0, label),
    ):
        header = nib.Nifti1Image(voxels, ref.affine).header
        header.set_qform(None, code=0)
        header.set_sform(ref.affine, code=1)
        for row in ("srow_x", "srow_y", "srow_z") if fill == 0.0 else ("srow_x",):
            header[row][:3] = fill
        files[name] = out / name
        nib.save(nib.Nifti1Image(voxels, None, header), str(files[name]))  # no affine given: the header's is kept

    put("adapter_pickle.pt", b"\x80\x04cos\nsystem\n(Vtouch " + ESCAPE.encode() + b"-pickle\ntR.")
    for name, content in hf_sam_adapters(out).items():
        put(name, content)
    return files


def hf_sam_adapters(folder: Path) -> dict[str, bytes]:
    """Adapters in hf_sam's configuration (tiny backbone, the sample labels) that do not fit its network."""
    from lib.adapters import publish_adapter
    from lib.configs import MODEL_CONFIGS
    from lib.networks.lora import adapter_state_dict

    config = MODEL_CONFIGS["hf_sam"]()
    config.init("hf_sam", str(folder / "model"), {"backbone": "tiny"}, None)
    state = adapter_state_dict(config.model.build_network())
    first = next(iter(state))
    variants = {
        "adapter_shape.pt": {**state, first: torch.zeros(1)},
        "adapter_dtype.pt": {**state, first: state[first].double()},
        "adapter_nan.pt": {**state, first: torch.full_like(state[first], float("nan"))},
        "adapter_extra.pt": {**state, "x.weight": torch.zeros(2)},
    }
    adapters = {}
    for name, variant in variants.items():
        path = folder / "adapters" / name
        publish_adapter(str(path), variant, config.model.adapter_config())
        adapters[name] = path.read_bytes()
    return adapters


@pytest.fixture(scope="module")
def server(module_server_factory, module_studies, module_tmp, bad_volumes):
    """The brain-MRI server with its HOME and temporary folder inside the module's folder, so that whatever a
    request leaves there is seen."""
    shutil.copyfile(bad_volumes["nan.nii.gz"], module_studies / f"{BROKEN_STORED}.nii.gz")
    for folder in ("home", "tmp"):
        (module_tmp / folder).mkdir(exist_ok=True)
    env = {"HOME": str(module_tmp / "home"), "TMPDIR": str(module_tmp / "tmp")}
    server = module_server_factory(env=env)
    import requests

    server.session = requests.Session()
    return server


def outside(server) -> dict[str, str]:
    """Everything the server might write to besides its datastore and model folder: the test's folders (its HOME
    and temporary folder among them), and /tmp where the hostile cases aim."""
    root = server.studies.parent
    skip = (server.studies.name, "app/model", "app/logs", "server-")
    return {**digests(root, skip), **{str(p): "" for p in Path("/tmp").glob(f"{Path(ESCAPE).name}*")}}


def settled(server, before: dict[str, str], timeout_s: float = 5.0) -> dict[str, str]:
    """``outside`` once a request's background clean-up has run (it runs after the answer is sent)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = outside(server)
        if now == before or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def test_every_route_has_a_case(server):
    """A route /openapi.json lists without a hostile case fails here; so does a case naming no route the server
    has (a typo would test nothing)."""
    schema = server.get("/openapi.json").json()
    listed = {f"{method.upper()} {path}" for path, operations in schema["paths"].items() for method in operations}
    covered = {case.route for case in CASES}
    assert not listed - covered, f"routes without a hostile case: {sorted(listed - covered)}"
    assert not covered - listed - UNLISTED, f"cases for routes the server does not have: {sorted(covered - listed - UNLISTED)}"
    assert not listed & UNLISTED, f"listed routes marked unlisted: {sorted(listed & UNLISTED)}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request_is_refused_and_nothing_changes(case, server, hostile_files):
    before = {"datastore": digests(server.studies), "model": digests(server.app_dir / "model"), "outside": outside(server)}
    response = case.send(server, hostile_files)
    assert response.status_code == case.status, f"{case.id}: {response.status_code} {response.text[:500]}\n{server.log_tail(20)}"
    assert case.match in response.text, f"{case.id}: {response.text[:500]}"
    server.info()  # still serving
    assert digests(server.studies) == before["datastore"], f"{case.id} changed the datastore"
    assert digests(server.app_dir / "model") == before["model"], f"{case.id} changed the model folder"
    after = settled(server, before["outside"])
    assert after == before["outside"], (
        f"{case.id} wrote outside the datastore and model folder: {sorted(set(after.items()) ^ set(before['outside'].items()))}"
    )
    task = case.url.split("/")[1]
    if task in ("train", "scoring") and case.status != 200:
        assert server.get(f"/{task}/").status_code == 404, f"{case.id} started a {task} task"


def test_good_requests_are_still_served(server, bad_volumes):
    """The same endpoints take sound input: an image with a trailing singleton axis, a label with label_info, an LPS
    NRRD label on a RAS NIfTI image's grid, inference (the refused adapters left the model serving), a session
    from an archive, and the dataset zip, whose temporary file is gone once it has been sent."""
    before = outside(server)
    with open(bad_volumes["singleton_4d.nii.gz"], "rb") as f:
        response = server.put("/datastore/image?image=added", files={"file": ("added.nii.gz", f)})
    assert response.status_code == 200, response.text
    assert (server.studies / "added.nii.gz").is_file()
    for image_id, name in (("brain_002", "label.nii.gz"), ("brain_003", "label_lps.nrrd")):
        with open(bad_volumes[name], "rb") as f:
            response = server.put(
                f"/datastore/label?image={image_id}&tag=final",
                files={"label": (name, f)},
                data={"params": json.dumps({"label_info": LABEL_INFO})},
            )
        assert response.status_code == 200, response.text
    labels = server.get("/datastore/?output=all").json()["objects"]
    assert "final" in labels["brain_002"]["labels"] and "final" in labels["brain_003"]["labels"]

    response = server.post("/infer/hf_sam?image=brain_003&output=json", data={"params": json.dumps({"image": "brain_003"})})
    assert response.status_code == 200 and response.json()["adapter_version"] == 0, response.text

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(bad_volumes["image.nii.gz"], arcname="series/volume.nii.gz")
    response = server.put("/session/?uncompress=true", files={"files": ("volume.tar.gz", archive.getvalue())})
    assert response.status_code == 200, response.text
    session_id = response.json()["session_id"]
    assert (server.app_dir / "model" / "sessions" / session_id / "volume.nii.gz").is_file()
    response = server.post(f"/infer/hf_sam?image=volume&session_id={session_id}&output=json")
    assert response.status_code == 200, response.text
    assert server.session.delete(f"{server.url}/session/{session_id}").status_code == 200

    response = server.get("/datastore/dataset")
    assert response.status_code == 200 and zipfile.ZipFile(io.BytesIO(response.content)).namelist(), response.text[:200]
    assert settled(server, before) == before, "a good request left files outside the datastore and model folder"
