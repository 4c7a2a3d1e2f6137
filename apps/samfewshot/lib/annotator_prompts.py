"""The clicks and boxes annotators placed on a volume, kept with the label they saved for it.

Every interactive request on a datastore volume is remembered (per volume: the latest prompts of each segment,
since 3D Slicer resends all of a segment's points with every click). When a final label is saved for the volume
they are stored in that label's info in the datastore (``INTERACTIONS_KEY``), so they are removed with it and never
reach another volume; training replays them as prompts (``lib.trainers.simulated_prompts``).

Until then they are also kept in the model folder (``model/interactions/``, one JSON file per volume, replaced
atomically on every change), so a server restart between the clicks and the save loses nothing. The log is bounded:
the latest ``max_per_volume`` segments per volume, the ``max_volumes`` volumes clicked on last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

from lib.files import atomic_write

logger = logging.getLogger(__name__)

INTERACTIONS_KEY = "interactions"
PROMPT_KEYS = ("foreground", "background", "roi")


def check_interactions(value: Any) -> list[dict[str, Any]]:
    """``value`` as a label's stored prompts (``INTERACTIONS_KEY``): a list of objects, each with a ``label`` (a
    segment name or null) and no keys but ``PROMPT_KEYS``, whose values are lists; raises ``ValueError`` naming the
    first problem. The points themselves are checked where they are used (``lib.transforms.prompts``)."""
    if not isinstance(value, list):
        raise ValueError(f"'{INTERACTIONS_KEY}' must be a list of prompt objects, got {type(value).__name__}")
    for i, entry in enumerate(value):
        where = f"'{INTERACTIONS_KEY}'[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), (str, type(None))):
            raise ValueError(f"{where} must be an object with a 'label' (a segment name or null)")
        extra = sorted(set(entry) - {"label", *PROMPT_KEYS})
        if extra:
            raise ValueError(f"{where} has keys {extra}; a stored prompt has only label, {', '.join(PROMPT_KEYS)}")
        wrong = [k for k in PROMPT_KEYS if k in entry and not isinstance(entry[k], list)]
        if wrong:
            raise ValueError(f"{where}: {', '.join(wrong)} must be a list")
    return value


class InteractionLog:
    """Per volume, the latest prompts of each segment (``label``; None for a client that names none) of the last
    ``max_volumes`` volumes clicked on.

    Args:
        store_dir: folder that keeps the log across restarts (created on the first prompt); None keeps it in memory.
        max_volumes: volumes held; a new one pushes out the one clicked on longest ago.
        max_per_volume: segments held per volume; a new one pushes out the segment prompted longest ago.
    """

    def __init__(self, store_dir: str | None = None, max_volumes: int = 1000, max_per_volume: int = 64):
        self.store_dir = store_dir
        self.max_volumes = max_volumes
        self.max_per_volume = max_per_volume
        self._volumes: OrderedDict[str, OrderedDict[Any, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()
        if store_dir and os.path.isdir(store_dir):
            self._load()

    def record(self, image_id: str, request: dict[str, Any]) -> None:
        prompts = {k: request[k] for k in PROMPT_KEYS if request.get(k)}
        if not prompts:
            return
        with self._lock:
            volume = self._volumes.setdefault(image_id, OrderedDict())
            self._volumes.move_to_end(image_id)
            label = request.get("label")
            volume.pop(label, None)
            volume[label] = {"label": label, **prompts}
            while len(volume) > self.max_per_volume:
                volume.popitem(last=False)
            self._store(image_id)
            while len(self._volumes) > self.max_volumes:
                self._forget(self._volumes.popitem(last=False)[0])

    def take(self, image_id: str) -> list[dict[str, Any]]:
        """The prompts held for ``image_id``, forgotten here (they now belong to a saved label)."""
        with self._lock:
            prompts = list(self._volumes.pop(image_id, {}).values())
            self._forget(image_id)
            return prompts

    # ---- the files ------------------------------------------------------------------------------------------
    def _path(self, image_id: str) -> str:
        """The volume's file: named by a hash of its id, so no id (``../x``, a DICOM UID) leaves the folder."""
        return os.path.join(self.store_dir, hashlib.sha256(image_id.encode()).hexdigest()[:32] + ".json")

    def _store(self, image_id: str) -> None:
        """Write the volume's prompts; a failed write is logged and the prompts stay in memory (the answer to the
        request that made them was already computed)."""
        if not self.store_dir:
            return
        stored = {"image": image_id, "updated": time.time(), "prompts": list(self._volumes[image_id].values())}
        try:
            with atomic_write(self._path(image_id)) as f:
                json.dump(stored, f)
        except OSError as e:
            logger.warning(f"interaction log: the prompts on {image_id!r} are kept in memory only: {e}")

    def _forget(self, image_id: str) -> None:
        if self.store_dir:
            try:
                os.unlink(self._path(image_id))
            except FileNotFoundError:
                pass

    def _load(self) -> None:
        """Read the folder back, oldest volume first; an unreadable file is reported and left alone."""
        volumes = []
        for name in os.listdir(self.store_dir):
            path = os.path.join(self.store_dir, name)
            if not name.endswith(".json") or name.startswith(".tmp-"):
                continue
            try:
                with open(path) as f:
                    stored = json.load(f)
                image_id, prompts = stored["image"], stored["prompts"]
                if self._path(image_id) != path or not all(isinstance(p, dict) and "label" in p for p in prompts):
                    raise ValueError("not a volume's prompts")
                volumes.append((float(stored["updated"]), image_id, prompts))
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning(f"interaction log: {path} is not read: {e}")
        for _, image_id, prompts in sorted(volumes, key=lambda v: v[0]):
            self._volumes[image_id] = OrderedDict((p["label"], p) for p in prompts[-self.max_per_volume :])
        while len(self._volumes) > self.max_volumes:
            self._forget(self._volumes.popitem(last=False)[0])
