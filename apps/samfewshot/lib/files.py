"""Files the server writes while others read them: written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """A file opened with ``mode`` (``w`` or ``wb``) whose content replaces ``path`` in one step when the block ends:
    written to a temporary file in the same folder (``.tmp-*.tmp``, which listings skip), flushed to disk, renamed
    over ``path``. A reader never sees half a file, and a failure or a killed process leaves the old one; the
    temporary file is removed on error."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
