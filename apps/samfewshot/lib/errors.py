"""The errors every layer raises for a client's mistake, and their HTTP answer.

A check anywhere (request fields, volumes, labels, archives, options) raises ``InvalidInput`` (HTTP 422) or
``NotFound`` (404) with a message that names the problem; ``http_errors`` turns it into FastAPI's answer where a
route or task meets it. The bottom of the layers (docs/architecture.md): it imports nothing of the app.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


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


def one_line(error: Exception) -> str:
    """``look_up_option``'s message on one line."""
    return " ".join(str(error).split())


def quoted(value: Any, limit: int = 80) -> str:
    """A client's value quoted for a message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
