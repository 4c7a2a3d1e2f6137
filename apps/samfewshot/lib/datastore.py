"""The local datastore, checking every upload before anything is stored (``lib.checks``).

MONAI Label's LocalDatastore copies whatever arrives: a truncated file, a 4D series, a label on another grid, or an
image id such as ``../x`` that lands outside the datastore. Here an upload is read and checked first; a refused one
leaves the datastore JSON and every stored file as they were.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection
from typing import Any

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore

from lib.annotator_prompts import INTERACTIONS_KEY, check_interactions
from lib.checks.requests import check_label_info, check_name
from lib.checks.volumes import STORED_SUFFIXES, check_image, check_label, stored_image_grid
from lib.errors import InvalidInput, NotFound, http_errors
from lib.label_check import CHECK_KEY, CONFIRM_KEY

SAVED_KEY = "saved_ns"  # in every label's info: when this server stored it, in nanoseconds
# Per-voxel maps the app stores beside labels (main.py: the uncertainty map of an infer request), not label ids.
MAP_TAGS = frozenset({"uncertainty"})


class CheckedDatastore(LocalDatastore):
    """``known_ids``: the label ids a label may hold without label_info (the served segmentation models' ids), or
    None when instance labels (any non-negative id) are served."""

    def __init__(self, *args: Any, known_ids: Collection[int] | None = None, **kwargs: Any):
        self.known_ids = None if known_ids is None else frozenset(known_ids)
        self._refresh_lock = threading.RLock()
        super().__init__(*args, **kwargs)

    def refresh(self) -> None:
        # One reconciliation at a time: the file watcher's thread refreshes on the very deletion remove_label makes,
        # while the request's thread refreshes too, and two rebuilding one index fail (compat)
        with self._refresh_lock:
            super().refresh()

    def _stored_suffix(self, filename: str, what: str) -> str:
        suffix = self._to_id(os.path.basename(filename))[1]
        if suffix not in STORED_SUFFIXES:
            raise InvalidInput(
                f"{what} file type {suffix or '(none)'!r} is not stored by this datastore; send NIfTI (.nii.gz, .nii) "
                "or NRRD (.nrrd); convert a DICOM series first (e.g. with SimpleITK or dcm2niix)"
            )
        return suffix

    def _image_path(self, image_id: str) -> str:
        if image_id not in self._datastore.objects:
            raise NotFound(f"image {image_id!r} is not in the datastore")
        return self.get_image_uri(image_id)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        with http_errors():
            check_name(image_id or self._to_id(os.path.basename(image_filename))[0], "image id")
            self._stored_suffix(image_filename, "image")
            check_image(image_filename, name=image_id)
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        with http_errors():
            check_name(label_tag, "label tag")
            image = stored_image_grid(self._image_path(image_id))
            self._stored_suffix(label_filename, "label")
            ids = label_tag not in MAP_TAGS
            info = (label_info or {}).get("label_info")
            check_label(label_filename, image, self.known_ids, info, ids=ids, name=f"{image_id} ({label_tag})")
            check_label_metadata(label_info or {})
        # MONAI Label stamps a label in whole seconds: two saves within one would look like one (main.py).
        return super().save_label(image_id, label_filename, label_tag, {**(label_info or {}), SAVED_KEY: time.time_ns()})

    def remove_image(self, image_id: str) -> None:
        with http_errors():
            self._image_path(image_id)
        super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        super().remove_label(label_id, label_tag)
        if self._auto_reload:  # upstream leaves it to the file watcher: until then the label is still listed (compat)
            self.refresh()

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        with http_errors():
            self._image_path(image_id)
        return super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        with http_errors():
            if not self._datastore.label(label_id, label_tag):
                raise NotFound(f"no label {label_id!r} with tag {label_tag!r} in the datastore")
            check_label_metadata(info or {})
        return super().update_label_info(label_id, label_tag, info)

    def record_label_check(self, label_id: str, records: dict[str, Any]) -> None:
        """The server's label-quality records ({model: record}, ``lib.label_check``) into a final label's info."""
        super().update_label_info(label_id, "final", {CHECK_KEY: records})


def check_label_metadata(info: dict[str, Any]) -> None:
    """What training reads from a label's info, checked before it is stored: ``label_info``, the prompts
    (``INTERACTIONS_KEY``) and an annotator's confirmation (``CONFIRM_KEY``); one malformed entry would otherwise
    fail every later training run. The label-quality record (``CHECK_KEY``) is the server's to write."""
    if CHECK_KEY in info:
        raise InvalidInput(f"'{CHECK_KEY}' is the server's label-quality record; to confirm a flagged label send {CONFIRM_KEY}: true")
    if CONFIRM_KEY in info and not isinstance(info[CONFIRM_KEY], bool):
        raise InvalidInput(f"{CONFIRM_KEY} must be true or false (a JSON boolean), got {info[CONFIRM_KEY]!r}")
    if "label_info" in info:
        check_label_info(info["label_info"])
    if INTERACTIONS_KEY in info:
        try:
            check_interactions(info[INTERACTIONS_KEY])
        except ValueError as e:
            raise InvalidInput(str(e)) from e


def image_exists(datastore: Datastore, image_id: str) -> bool:
    return image_id in datastore.list_images()


def label_exists(datastore: Datastore, label_id: str, tag: str) -> bool:
    """Whether the datastore holds label ``label_id`` under ``tag`` (MONAI Label's local index; a DICOMweb datastore
    keeps its labels in the same index, as a cache)."""
    return bool(datastore._datastore.label(label_id, tag))
