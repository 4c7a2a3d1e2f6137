"""Keep the server answering while a request computes.

MONAI Label 0.8.5 declares its endpoints ``async def`` but runs inference, uploads, sampling and scoring
synchronously inside them, on the event loop: while one volume is segmented, ``/info``, datastore reads and every
other client wait. Those endpoints are rebuilt here as plain functions, which FastAPI runs in its worker threads,
so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, APIRouter

logger = logging.getLogger(__name__)

# What a rebuilt route keeps of the original (APIRoute's constructor arguments of the same names).
ROUTE_SETTINGS = (
    "methods", "name", "summary", "description", "response_model", "response_class", "status_code", "tags",
    "dependencies", "responses", "include_in_schema", "dependency_overrides_provider",
)
# Endpoints whose bodies do their work without awaiting (the proxy routes await I/O and stay on the loop).
BLOCKING_PREFIXES = ("/infer/", "/datastore/", "/activelearning/", "/scoring/", "/train/", "/session/", "/batch/")


def in_worker_thread(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """A plain function with ``endpoint``'s signature that runs the coroutine to completion in the calling thread.

    No ``functools.wraps``: FastAPI follows ``__wrapped__`` and would see a coroutine function again.
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(endpoint(*args, **kwargs))

    run.__signature__ = inspect.signature(endpoint, eval_str=True)
    run.__name__, run.__doc__ = endpoint.__name__, endpoint.__doc__
    return run


def serve_blocking_endpoints_in_threads(app: FastAPI, prefixes: tuple[str, ...] = BLOCKING_PREFIXES) -> list[str]:
    """Replace the ``async def`` routes under ``prefixes``, in ``app`` and the routers it includes, by threaded
    ones; returns the paths changed."""
    changed: list[str] = []
    for router in routers_of(app.router):
        routes = router.routes
        for i, route in enumerate(routes):
            if not (isinstance(route, APIRoute) and route.path.startswith(prefixes)):
                continue
            if not inspect.iscoroutinefunction(route.endpoint):
                continue
            settings = {field: getattr(route, field) for field in ROUTE_SETTINGS}
            routes[i] = APIRoute(route.path, in_worker_thread(route.endpoint), **settings)
            changed.append(f"{','.join(sorted(route.methods))} {route.path}")
        if hasattr(router, "_mark_routes_changed"):  # FastAPI caches the routes of included routers
            router._mark_routes_changed()
    logger.info(f"endpoints served from worker threads: {len(changed)}")
    return changed


def routers_of(router: APIRouter) -> list[APIRouter]:
    """``router`` and every router included in it (FastAPI keeps included routers as ``original_router``)."""
    found = [router]
    for route in router.routes:
        included = getattr(route, "original_router", None)
        if isinstance(included, APIRouter):
            found += routers_of(included)
    return found
