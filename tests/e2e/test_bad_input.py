"""Bad input against one real server: every refused request answers 4xx naming the problem, the server keeps
serving, and the datastore (its JSON index and every stored file) stays byte-identical.

The broken and odd volumes come from the `bad_volumes` fixture (tests/conftest.py); the datastore also holds a
volume with a NaN voxel placed there by hand (``broken_stored``), as files copied into a studies folder are never
checked on the way in. Good uploads are accepted at the end, so the checks do not simply refuse everything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

BROKEN_STORED = "broken_stored"
LABEL_INFO = [{"name": "white matter", "idx": 1}, {"name": "grey matter", "idx": 2}]


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    status: int
    match: str  # must appear in the response text
    upload: tuple[str, str] | None = None  # (form field, bad_volumes key)
    form: dict[str, str] = field(default_factory=dict)
    body: Any = None  # JSON body; a str is sent as it is

    def send(self, server, volumes: dict[str, Path]):
        kwargs: dict[str, Any] = {"data": self.form}
        if self.upload:
            key, name = self.upload
            kwargs["files"] = {key: (volumes[name].name, volumes[name].read_bytes())}
        if isinstance(self.body, str):
            kwargs = {"data": self.body, "headers": {"Content-Type": "application/json"}}
        elif self.body is not None:
            kwargs = {"json": self.body}
        return getattr(server, self.method)(self.path, **kwargs)


def image(id: str, volume: str, match: str, image_id: str = "uploaded", status: int = 422, **kw) -> Case:
    return Case(f"image-{id}", "put", f"/datastore/image?image={image_id}", status, match, ("file", volume), **kw)


def label(id: str, volume: str, match: str, image_id: str = "brain_002", tag: str = "final", status: int = 422,
          params: Any = None) -> Case:
    form = {"params": params if isinstance(params, str) else json.dumps(params or {})}
    return Case(f"label-{id}", "put", f"/datastore/label?image={image_id}&tag={tag}", status, match, ("label", volume), form)


def infer_file(id: str, volume: str, match: str) -> Case:
    return Case(f"infer-file-{id}", "post", "/infer/hf_sam?output=json", 422, match, ("file", volume))


def infer_id(id: str, query: str, status: int, match: str, **kw) -> Case:
    return Case(f"infer-{id}", "post", f"/infer/{query}&output=json", status, match, **kw)


CASES = [
    # PUT /datastore/image
    image("truncated-gz", "trunc.nii.gz", "truncated or corrupt?): Compressed file ended"),
    image("truncated-nii", "trunc.nii", "is truncated: its header promises"),
    image("corrupt-gz", "corrupt.nii.gz", "cannot read the header of 'uploaded' as NIFTI"),
    image("nrrd-wrong-sizes", "wrong_size.nrrd", "Size of the data does not equal the product of all the dimensions"),
    image("nrrd-bad-header", "bad_header.nrrd", "cannot read image 'uploaded' (NRRD"),
    image("dicom-file", "trunc.dcm", "file type '.dcm' is not stored by this datastore"),
    image("text-file", "notes.txt", "file type '.txt' is not stored by this datastore"),
    image("2d", "2d.nii.gz", "is 2D (118, 142)"),
    image("4d", "4d.nii.gz", "has 4 dimensions (40, 40, 20, 3)"),
    image("all-zero", "zeros.nii.gz", "is empty: every voxel is 0.0"),
    image("constant", "constant.nii.gz", "is empty: every voxel is 7.0"),
    image("nan", "nan.nii.gz", "has 1 NaN voxel value"),
    image("inf", "inf.nii.gz", "has 1 infinite voxel value"),
    image("huge-header", "huge.nii", "declares 30000x30000x30000 = 27000000000000 voxels"),
    image("huge-header-gz", "huge.nii.gz", "declares 2048x2048x2048"),
    image("id-parent-dir", "image.nii.gz", "image id '../escape' is not a plain name", image_id="../escape"),
    image("id-subdir", "image.nii.gz", "image id 'sub/dir' is not a plain name", image_id="sub/dir"),
    image("id-hidden", "image.nii.gz", "image id '.hidden' is not a plain name", image_id=".hidden"),
    image("params-malformed", "image.nii.gz", "'params' is not valid JSON", form={"params": "{bad"}),
    image("params-list", "image.nii.gz", "'params' must be a JSON object, got list", form={"params": "[1]"}),
    # PUT /datastore/label
    label("shape", "label_shape.nii.gz", "shape (116, 142, 125) differs from the image's (118, 142, 125)"),
    label("origin", "label_shift.nii.gz", "does not match its image's grid: affine"),
    label("spacing", "label_spacing.nii.gz", "does not match its image's grid: affine"),
    label("id-7", "label_7.nii.gz", "holds ids [7] that are not in the model's labels (ids [1, 2]"),
    label("id-negative", "label_neg.nii.gz", "holds negative ids [-1]"),
    label("id-fraction", "label_half.nii.gz", "holds non-integer values [0.5]"),
    label("nan", "label_nan.nii.gz", "holds NaN or infinite values"),
    label("layers", "label_layers.seg.nrrd", "several layers"),
    label("slicer-segments", "label_segments_5.seg.nrrd", "holds ids [5] that are not in its segment names"),
    label("truncated", "trunc.nii.gz", "cannot read label 'brain_002 (final)'"),
    label("id-not-in-label-info", "label_3.nii.gz", "holds ids [3] that are not in its label_info", params={"label_info": LABEL_INFO}),
    label("label-info-malformed", "label.nii.gz", "label_info must be a list", params={"label_info": "grey matter"}),
    label("params-malformed", "label.nii.gz", "'params' is not valid JSON", params="{bad"),
    label("unknown-image", "label.nii.gz", "image 'nosuch' is not in the datastore", image_id="nosuch", status=404),
    label("image-id-path", "label.nii.gz", "image '../brain_002' is not in the datastore", image_id="../brain_002", status=404),
    label("tag-parent-dir", "label.nii.gz", "label tag '../../evil' is not a plain name", tag="../../evil"),
    label("tag-subdir", "label.nii.gz", "label tag 'a/b' is not a plain name", tag="a/b"),
    label("broken-image", "label.nii.gz", "has 1 NaN voxel value", image_id=BROKEN_STORED),
    # POST /infer/{model}
    infer_id("unknown-model", "nosuch?image=brain_002", 404, "unknown model 'nosuch'; valid: hf_sam, masg_sam"),
    infer_id("unknown-image", "hf_sam?image=nosuch", 404, "image 'nosuch' is not in the datastore"),
    infer_id("server-path", "hf_sam?image=/etc/hostname", 422, "image id '/etc/hostname' is not a plain name"),
    infer_id("params-malformed", "hf_sam?image=brain_002", 422, "'params' is not valid JSON", form={"params": "{bad"}),
    infer_id("params-string", "hf_sam?image=brain_002", 422, "'params' must be a JSON object, got str", form={"params": '"x"'}),
    infer_id("stored-nan", f"hf_sam?image={BROKEN_STORED}", 422, "has 1 NaN voxel value"),
    infer_file("truncated", "trunc.nii.gz", "truncated or corrupt?): Compressed file ended"),
    infer_file("2d", "2d.nii.gz", "is 2D (118, 142)"),
    infer_file("4d", "4d.nii.gz", "has 4 dimensions"),
    infer_file("nan", "nan.nii.gz", "NaN voxel value"),
    infer_file("all-zero", "zeros.nii.gz", "is empty: every voxel is 0.0"),
    infer_file("huge-header", "huge.nii", "declares 30000x30000x30000"),
    infer_file("dicom-truncated", "trunc.dcm", "(DICOM; truncated or corrupt?)"),
    infer_file("dicom-not-dicom", "not_dicom.dcm", "as DICOM: File is missing DICOM File Meta Information"),
    infer_file("dicom-one-slice", "slice.dcm", "is a single slice (142, 118, 1): a 2D image"),
    infer_file("text-file", "notes.txt", "is not a volume format this server reads"),
    # POST /train/{model}
    Case("train-unknown-model", "post", "/train/nosuch", 404, "unknown model 'nosuch'; valid: hf_sam, masg_sam", body={}),
    Case("train-epochs-word", "post", "/train/hf_sam", 422, "max_epochs must be a positive integer, got 'many'", body={"max_epochs": "many"}),
    Case("train-epochs-zero", "post", "/train/hf_sam", 422, "max_epochs must be a positive integer, got 0", body={"max_epochs": 0}),
    Case("train-lr-negative", "post", "/train/hf_sam", 422, "lr must be a positive number, got -1", body={"lr": -1}),
    Case("train-val-split", "post", "/train/hf_sam", 422, "val_split must be a number in [0, 1), got 1.5", body={"val_split": 1.5}),
    Case("train-json-malformed", "post", "/train/hf_sam", 422, "JSON decode error", body="{bad"),
    # POST /activelearning/{strategy}
    Case("al-unknown-strategy", "post", "/activelearning/nosuch", 404, "unknown strategy 'nosuch'; valid: diversity, first", body={}),
    Case("al-json-malformed", "post", "/activelearning/random", 422, "JSON decode error", body="{bad"),
    # POST /scoring/{method}
    Case("scoring-unknown-method", "post", "/scoring/nosuch", 404, "unknown scoring method 'nosuch'; valid: embedding, uncertainty", body={}),
    Case("scoring-json-malformed", "post", "/scoring/uncertainty", 422, "JSON decode error", body="{bad"),
    # PUT /datastore/image/info
    Case("image-info-malformed", "put", "/datastore/image/info?image=brain_002", 422, "'info' is not valid JSON", form={"info": "{bad"}),
    Case("image-info-unknown", "put", "/datastore/image/info?image=nosuch", 404, "image 'nosuch' is not in the datastore", form={"info": "{}"}),
]


def digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (datastore_v2.json included) by content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def server(module_server_factory, module_studies, bad_volumes):
    shutil.copyfile(bad_volumes["nan.nii.gz"], module_studies / f"{BROKEN_STORED}.nii.gz")
    return module_server_factory()


def test_the_datastore_is_indexed(server):
    datastore = server.get("/datastore/?output=all").json()
    assert {"brain_002", BROKEN_STORED} <= set(datastore["objects"]), datastore["objects"].keys()
    assert (server.studies / "datastore_v2.json").is_file()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_refused_and_nothing_changes(case, server, bad_volumes):
    before = digests(server.studies)
    response = case.send(server, bad_volumes)
    assert response.status_code == case.status, f"{case.id}: {response.status_code} {response.text}\n{server.log_tail(20)}"
    assert case.match in response.text, f"{case.id}: {response.text}"
    server.info()  # still serving
    assert digests(server.studies) == before, f"{case.id} changed the datastore"
    outside = server.studies.parent
    assert not list(outside.glob("escape*")) and not (outside / "evil").exists(), "a request wrote outside the datastore"
    task = case.path.split("/")[1]
    if task in ("train", "scoring"):
        assert server.get(f"/{task}/").status_code == 404, f"{case.id} started a {task} task"


def test_good_uploads_are_accepted(server, bad_volumes):
    """The same endpoints take sound input: an image with a trailing singleton axis, a label with label_info, and an
    LPS NRRD label on a RAS NIfTI image's grid (the sample volumes share one grid)."""
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
