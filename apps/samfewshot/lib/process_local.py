"""Objects that cross into the spawned processes of a multi-process training run (pickled with the train task)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar


class ProcessLocal:
    """Pickles without the attributes named in ``process_local`` (locks, resident networks, in-memory caches);
    the receiving process starts them afresh from the given factories."""

    process_local: ClassVar[dict[str, Callable[[], Any]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self.process_local}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, **{k: factory() for k, factory in self.process_local.items()})
