"""The clicks and boxes annotators placed on a volume, kept with the label they saved for it.

Every interactive request on a datastore volume is remembered (in memory, per volume: the latest prompts of each
segment, since 3D Slicer resends all of a segment's points with every click). When a final label is saved for the
volume they are stored in that label's info in the datastore (``INTERACTIONS_KEY``), so they are removed with it
and never reach another volume; training replays them as prompts (``lib.trainers.interaction``). Prompts still
held when the server stops are lost: they belong to a label that was never saved.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

INTERACTIONS_KEY = "interactions"
PROMPT_KEYS = ("foreground", "background", "roi")


class InteractionLog:
    """Per volume, the latest prompts of each segment (``label``; None for a client that names none) of the last
    ``max_volumes`` volumes clicked on."""

    def __init__(self, max_volumes: int = 1000, max_per_volume: int = 64):
        self.max_volumes = max_volumes
        self.max_per_volume = max_per_volume
        self._volumes: OrderedDict[str, OrderedDict[Any, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

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
            while len(self._volumes) > self.max_volumes:
                self._volumes.popitem(last=False)

    def take(self, image_id: str) -> list[dict[str, Any]]:
        """The prompts held for ``image_id``, forgotten here (they now belong to a saved label)."""
        with self._lock:
            return list(self._volumes.pop(image_id, {}).values())
