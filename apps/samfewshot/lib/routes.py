"""Every route the server answers, and what the app does with it.

MONAI Label 0.8.5 serves its endpoints as they are: some read or write server paths a client names, some answer
500 for bad input or leave temporary files behind, some have no use in this app. Here each route is declared once
(``ROUTES``, keyed by method and path) as one of:

* open: its arguments are checked (``check``) before MONAI Label's endpoint, or the app's ``handler`` in its place
  (``lib.endpoint_bodies``), runs; a refused request answers 4xx naming the problem;
* optional: in a group of ``ENDPOINT_GROUPS``, served only when ``--conf endpoints`` names the group, then checked
  like the rest; otherwise it answers 404 naming the switch;
* closed: it answers 404 with the reason.

A route that is not declared (one a later MONAI Label adds, say) is closed, so nothing is served unexamined. Open
routes are listed in ``/openapi.json``, the hidden ones included, so the schema names everything a client can reach.

Two things hold for every open route. It runs in a worker thread unless it awaits I/O itself (``on_loop``): MONAI
Label runs inference, uploads and sampling inside ``async def`` endpoints, on the event loop, where one inference
stalled every other client. And the temporary files of a request are removed when it fails too: Starlette runs a
request's background tasks (MONAI Label's clean-up) only after a successful response.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel
from starlette.routing import BaseRoute, Mount
from starlette.routing import Route as StarletteRoute

from lib import endpoint_bodies, monailabel_compat
from lib.activelearning import strategies
from lib.checks.requests import (
    BOOLEAN,
    COMMON_OPTIONS,
    IGNORED_KEY,
    INFER_NAMES,
    INFER_PARAMS,
    SERVER_INFER_KEYS,
    SERVER_TRAIN_KEYS,
    TRAIN_OPTIONS,
    Option,
    accepted,
    check_checksum,
    check_choice,
    check_filename,
    check_infer_params,
    check_keys,
    check_label_info,
    check_name,
    check_options,
    check_same,
    check_train_options,
    integer,
    parse_json_object,
)
from lib.conf import DEFAULT_ENDPOINT_GROUPS, ENDPOINT_GROUPS
from lib.datastore import image_exists, label_exists
from lib.errors import InvalidInput, NotFound, http_errors

logger = logging.getLogger(__name__)

Args = Mapping[str, Any]


def parse_endpoint_groups(value: str | None) -> frozenset[str]:
    """``--conf endpoints``: group names, comma-separated, 'none' for none; unknown names are an error."""
    if value is None:
        return frozenset(DEFAULT_ENDPOINT_GROUPS)
    names = {n.strip() for n in value.split(",") if n.strip()} - {"none"}
    unknown = sorted(names - set(ENDPOINT_GROUPS))
    if unknown:
        raise ValueError(f"unknown endpoint group(s) {unknown} in --conf endpoints; valid: none, {', '.join(ENDPOINT_GROUPS)}")
    return frozenset(names)


@dataclass(frozen=True)
class Route:
    check: Callable[[Args], None] | None = None
    handler: Callable[..., Any] | None = None  # called with the endpoint's own arguments, by name
    group: str | None = None
    closed: str | None = None
    on_loop: bool = False  # an async endpoint that awaits I/O: stays on the event loop


# ---- argument checks (the bound arguments of MONAI Label's endpoint, by name) --------------------------------
def _app():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def served_model(args: Args) -> None:
    check_choice(args["model"], monailabel_compat.infers(_app()), "model")


def _datastore_image(image: Any, what: str = "image") -> str:
    check_name(image, f"{what} id")
    if not image_exists(_app().datastore(), image):
        raise NotFound(f"{what} {image!r} is not in the datastore")
    return image


def _stored_label(label: Any, tag: Any) -> None:
    check_name(label, "label id")
    check_name(tag, "label tag")
    if not label_exists(_app().datastore(), label, tag):
        raise NotFound(f"no label {label!r} with tag {tag!r} in the datastore")


def check_infer(args: Args) -> None:
    """A served model; the volume is a posted file, a known session or a datastore image, never a server path; params
    that keep the image and model the URL names (``check_infer_params``); DICOM SEG output only from a PACS."""
    from monailabel.datastore.dicom import DICOMWebDatastore

    app = _app()
    served_model(args)
    if args.get("label"):
        raise InvalidInput("no model of this server takes a label file as input; send the image (or its id) only")
    if args.get("file") and args.get("session_id"):
        raise InvalidInput("send the image as a file or name a session, not both")
    if args.get("file"):
        check_filename(args["file"].filename, "image")
    elif args.get("session_id"):
        _session(args["session_id"])
    else:
        _datastore_image(args.get("image"))
    params, ignored = check_infer_params(
        parse_json_object(args.get("params"), "params"), args.get("image"), args["model"], _task_options(args)
    )
    if ignored:
        params[IGNORED_KEY] = ignored  # the task lists them in its answer (lib.infers.resident)
    if args.get("params"):
        args["params"] = json.dumps(params)  # what MONAI Label's endpoint parses: the values as checked, known keys
    if args.get("output") == "dicom_seg":
        if args.get("file") or args.get("session_id"):
            raise InvalidInput("output=dicom_seg references a series of the PACS: name it with image=<series UID>, send no file or session")
        if not isinstance(app.datastore(), DICOMWebDatastore):
            raise InvalidInput("output=dicom_seg needs a DICOMweb datastore (--studies http://.../dicom-web); this one is local")
        if params.get("label_info") is None:
            raise InvalidInput("output=dicom_seg needs 'label_info' in params ([] names the segments after the model's labels)")


def _task_options(args: Args) -> list[str]:
    """The options the infer task the URL names shows in ``/info/`` (its config), which clients echo."""
    return list(monailabel_compat.infers(_app())[args["model"]].config())


def _session(session_id: Any) -> None:
    sessions = _app().sessions()
    check_name(session_id, "session id")
    if sessions is None or not sessions.get_session(session_id, update_ts=False):
        raise NotFound(f"session {session_id!r} does not exist (or has expired); create one with PUT /session/")


def check_session_id(args: Args) -> None:
    _session(args["session_id"])


def check_new_session(args: Args) -> None:
    files = args.get("files") or []
    if not files:
        raise InvalidInput("send the volume (a file, the files of a DICOM series, or one archive with uncompress=true)")
    for f in files:
        check_filename(f.filename, "session")
    if args.get("expiry") is not None and args["expiry"] < 0:
        raise InvalidInput(f"expiry must be >= 0 seconds (0: the server's default), got {args['expiry']}")
    if args.get("uncompress") and len(files) != 1:
        raise InvalidInput(f"uncompress=true takes one archive (.zip or .tar.gz), got {len(files)} files")


def check_image_upload(args: Args) -> None:
    check_filename(args["file"].filename, "image")
    if args.get("image"):
        check_name(args["image"], "image id")
    parse_json_object(args.get("params"), "params")


def check_label_upload(args: Args) -> None:
    check_filename(args["label"].filename, "label")
    check_name(args.get("image"), "image id")
    check_name(args.get("tag") or "final", "label tag")
    parse_json_object(args.get("params"), "params")


def image_arg(key: str) -> Callable[[Args], None]:
    return lambda args: _datastore_image(args[key])


def check_image_head(args: Args) -> None:
    _datastore_image(args["image"])
    check_checksum(args.get("check_sum"))


def check_image_info(args: Args) -> None:
    parse_json_object(args.get("info"), "info")
    _datastore_image(args["image"])


def label_arg(key: str, info_field: str | None = None) -> Callable[[Args], None]:
    def check(args: Args) -> None:
        if info_field:
            parse_json_object(args.get(info_field), info_field)
        _stored_label(args[key], args["tag"])

    return check


def check_dataset(args: Args) -> None:
    if args.get("limit_cases") is not None and args["limit_cases"] < 1:
        raise InvalidInput(f"limit_cases must be >= 1, got {args['limit_cases']}")


def check_train(args: Args) -> None:
    check_choice(args["model"], monailabel_compat.trainers(_app()), "model")
    options = check_options(args.get("params"), "train options")
    check_same(options, "model", args["model"], "train options")
    args["params"] = check_train_options(options)


def check_train_all(args: Args) -> None:
    """``POST /train/`` (3D Slicer and OHIF): options for every model, or per model under its name."""
    trainers = monailabel_compat.trainers(_app())
    options = check_options(args.get("params"), "train options")
    if "model" in options:
        raise InvalidInput("name a model in the URL (POST /train/{model}) or as a key of the options, not as 'model'")
    parsed = check_train_options({k: v for k, v in options.items() if k not in trainers})
    for model in trainers:
        if model in options:
            parsed[model] = check_train_options(check_options(options[model], f"train options of {model}"))
    args["params"] = parsed


def check_strategy(args: Args) -> None:
    check_choice(args["strategy"], monailabel_compat.strategies(_app()), "strategy")
    options = check_options(args.get("params"), "active learning options")
    check_same(options, "strategy", args["strategy"], "active learning options")
    args["params"] = check_keys(options, STRATEGY_OPTIONS, (), "active learning options", also=("strategy",))


STRATEGY_OPTIONS = {
    **COMMON_OPTIONS,
    "model": accepted("a model name", lambda v: isinstance(v, str) and 0 < len(v) <= 128),
    "seed": Option(strategies.SEED_WHAT, strategies.parse_seed),
}


def _scoring_options(options: Any, what: str) -> None:
    options = check_options(options, what)
    models = [m for m, c in _app().models.items() if c.scores_volumes]
    check_keys(options, COMMON_OPTIONS, SERVER_TRAIN_KEYS, what, also=("model", "method"))
    if "model" in options:
        check_choice(options["model"], models, "scoring model")


def check_scoring(args: Args) -> None:
    check_choice(args["method"], monailabel_compat.scoring_methods(_app()), "scoring method")
    options = check_options(args.get("params"), "scoring options")
    check_same(options, "method", args["method"], "scoring options")
    _scoring_options(options, "scoring options")


def check_scoring_all(args: Args) -> None:
    methods = monailabel_compat.scoring_methods(_app())
    options = check_options(args.get("params"), "scoring options")
    if "method" in options:
        raise InvalidInput("name a scoring method in the URL (POST /scoring/{method}) or as a key of the options")
    _scoring_options({k: v for k, v in options.items() if k not in methods}, "scoring options")
    for method in methods:
        if method in options:
            _scoring_options(options[method], f"scoring options of {method}")


BATCH_IMAGES = ("all", "labeled", "unlabeled")
# What MONAI Label's batch task reads besides the infer options it hands each volume, the images (named in the URL)
# and the label tag (checked as a name).
BATCH_OPTIONS = {
    "max_batch_size": integer("a non-negative integer (0: every volume)", low=0),
    "max_workers": integer("a non-negative integer (0: a quarter of the cores)", low=0),
    "multi_gpu": BOOLEAN,
    "gpus": TRAIN_OPTIONS["gpus"],
}


def check_batch(args: Args) -> None:
    """Like an infer request's params, plus the batch task's own options; no answer per volume lists ignored keys,
    so unknown ones are refused."""
    served_model(args)
    options = check_options(args.get("params"), "batch infer options")
    images = getattr(args.get("images"), "value", args.get("images"))
    check_same(options, "images", images, "batch infer options")
    # Batch inference stores a label per volume: under a plain tag, never over the annotators' final labels.
    tag = options.get("label_tag", "original")
    check_name(tag, "label tag")
    if tag == "final":
        raise InvalidInput("batch infer may not store its predictions as final labels; use label_tag 'original' or another tag")
    if "image" in options:
        raise InvalidInput("batch infer segments the datastore's images ('images': all, labeled or unlabeled), not one 'image'")
    server_keys = [k for k in SERVER_INFER_KEYS if k != "label_tag"]
    names = [*INFER_NAMES, *_task_options(args), "images", "label_tag"]
    params = check_keys(options, {**INFER_PARAMS, **BATCH_OPTIONS}, server_keys, "batch infer options", also=names)
    check_same(params, "model", args["model"], "batch infer options")
    if "label_info" in params:
        check_label_info(params["label_info"])
    if params.get("multi_gpu") and not torch.cuda.device_count():
        raise InvalidInput("multi_gpu spreads a batch over CUDA GPUs; this host has none (send multi_gpu false)")
    args["params"] = monailabel_compat.batch_devices(params)


def check_logs(args: Args) -> None:
    if not 0 <= (args.get("lines") or 0) <= 100_000:
        raise InvalidInput(f"lines must be in 0..100000 (0: the whole log), got {args['lines']}")
    if not 0 <= (args.get("refresh") or 0) <= 3600:
        raise InvalidInput(f"refresh must be in 0..3600 seconds, got {args['refresh']}")


def check_proxy(args: Args) -> None:
    endpoint_bodies.check_dicomweb_path(args["path"])


# ---- the routes ----------------------------------------------------------------------------------------------
_NO_WSI = "this app serves no whole-slide models: its models take 3D volumes (POST /infer/{model})"

ROUTES: dict[tuple[str, str], Route] = {
    # documentation and static files
    ("GET", "/"): Route(),
    ("GET", "/favicon.ico"): Route(),
    ("GET", "/docs"): Route(),
    ("GET", "/openapi.json"): Route(),
    ("MOUNT", "/static"): Route(),  # Starlette's StaticFiles keeps requests inside its folder
    ("POST", "/reload"): Route(closed="reloading would build a second copy of every model; restart the server instead"),
    # app and models
    ("GET", "/info/"): Route(),
    ("GET", "/model/{model}"): Route(check=served_model),
    ("GET", "/model/info/{model}"): Route(check=served_model),
    ("PUT", "/model/{model}"): Route(check=served_model, handler=endpoint_bodies.upload_adapter),
    ("DELETE", "/model/{model}"): Route(check=served_model),
    # inference
    ("POST", "/infer/{model}"): Route(check=check_infer, handler=endpoint_bodies.infer),
    ("POST", "/infer/wsi/{model}"): Route(closed=_NO_WSI),
    ("POST", "/infer/wsi_v2/{model}"): Route(closed=_NO_WSI),
    ("GET", "/batch/infer"): Route(group="batch_infer"),
    ("DELETE", "/batch/infer"): Route(group="batch_infer"),
    ("POST", "/batch/infer/{model}"): Route(check=check_batch, group="batch_infer"),
    # training, active learning, scoring
    ("GET", "/train/"): Route(),
    ("DELETE", "/train/"): Route(),
    ("POST", "/train/"): Route(check=check_train_all),
    ("POST", "/train/{model}"): Route(check=check_train),
    ("POST", "/activelearning/{strategy}"): Route(check=check_strategy),
    ("GET", "/scoring/"): Route(),
    ("DELETE", "/scoring/"): Route(),
    ("POST", "/scoring/"): Route(check=check_scoring_all),
    ("POST", "/scoring/{method}"): Route(check=check_scoring),
    # datastore
    ("GET", "/datastore/"): Route(),
    ("PUT", "/datastore/"): Route(check=check_image_upload),  # 3D Slicer's upload
    ("PUT", "/datastore/image"): Route(check=check_image_upload),
    ("DELETE", "/datastore/"): Route(check=image_arg("id")),
    ("DELETE", "/datastore/image"): Route(check=image_arg("id")),
    ("HEAD", "/datastore/image"): Route(check=check_image_head, handler=endpoint_bodies.check_image),
    ("GET", "/datastore/image"): Route(check=image_arg("image")),
    ("GET", "/datastore/image/info"): Route(check=image_arg("image")),
    ("PUT", "/datastore/image/info"): Route(check=check_image_info),
    ("PUT", "/datastore/label"): Route(check=check_label_upload),
    ("DELETE", "/datastore/label"): Route(check=label_arg("id")),
    ("HEAD", "/datastore/label"): Route(check=label_arg("image")),
    ("GET", "/datastore/label"): Route(check=label_arg("label")),
    ("GET", "/datastore/label/info"): Route(check=label_arg("label")),
    ("PUT", "/datastore/label/info"): Route(check=label_arg("label", "info")),
    ("PUT", "/datastore/updatelabelinfo"): Route(check=label_arg("label", "params")),
    ("GET", "/datastore/dataset"): Route(check=check_dataset, handler=endpoint_bodies.download_dataset),
    # sessions (3D Slicer, for a volume that is not in the datastore)
    ("PUT", "/session/"): Route(check=check_new_session, handler=endpoint_bodies.create_session, group="sessions"),
    ("GET", "/session/{session_id}"): Route(check=check_session_id, handler=endpoint_bodies.get_session, group="sessions"),
    ("DELETE", "/session/{session_id}"): Route(check=check_session_id, group="sessions"),
    # OHIF and the PACS behind the server
    ("GET", "/ohif/{path:path}"): Route(handler=endpoint_bodies.get_ohif),
    **{
        (method, f"/proxy/dicom/{op}{{path:path}}"): Route(check=check_proxy, handler=endpoint_bodies.proxy(op.rstrip("/")), on_loop=True)
        for method in ("GET", "POST")
        for op in ("wado/", "qido/", "stow/", "")
    },
    # administration
    ("GET", "/logs/"): Route(check=check_logs, group="logs"),
    ("GET", "/logs/gpu"): Route(check=endpoint_bodies.check_nvidia_smi, group="logs"),
    # login proxy (served when MONAI_LABEL_AUTH_ENABLE is set)
    ("GET", "/auth/"): Route(),
    ("POST", "/auth/token"): Route(handler=endpoint_bodies.access_token),
    ("GET", "/auth/token/valid"): Route(),
}


# ---- installing the policy on the FastAPI application --------------------------------------------------------
class Refusal(BaseModel):
    """Every client error of every route: the policy's own (a message naming what is wrong and what was expected)
    or FastAPI's when a parameter does not parse (its list of errors)."""

    detail: str | list[dict[str, Any]]


# What the schema declares a route answers besides its result: a refusal (400-499; 422 included, which FastAPI
# would otherwise declare as its validation error alone).
REFUSALS = {"4XX": {"model": Refusal, "description": "Refused: `detail` says what is wrong and what was expected"}}

# What a rebuilt route keeps of the original (APIRoute's constructor arguments of the same names).
ROUTE_SETTINGS = (
    "methods",
    "name",
    "summary",
    "description",
    "response_model",
    "response_class",
    "status_code",
    "tags",
    "dependencies",
    "responses",
    "dependency_overrides_provider",
)


def install(app: FastAPI, groups: frozenset[str]) -> dict[str, list[str]]:
    """Apply ``ROUTES`` to every route of ``app`` with the optional ``groups`` enabled; idempotent (a route keeps
    MONAI Label's endpoint underneath, so the app may be installed again with other groups). Returns the routes by
    what became of them: open, optional (disabled), closed."""
    report: dict[str, list[str]] = {"open": [], "disabled": [], "closed": []}
    for router in routers_of(app.router):
        routes = router.routes
        for i in reversed(range(len(routes))):
            route = routes[i]
            if isinstance(route, APIRoute):
                key, policy = _policy(route)
                original = getattr(route.endpoint, "__samfewshot_original__", route.endpoint)
                settings = {field: getattr(route, field) for field in ROUTE_SETTINGS}
                settings["responses"] = {**(settings["responses"] or {}), **REFUSALS}
                if policy.closed or (policy.group and policy.group not in groups):
                    reason = policy.closed or _disabled(policy.group)
                    endpoint, schema = _closed(route.path, reason), False
                    report["closed" if policy.closed else "disabled"].append(key)
                else:
                    endpoint, schema = _guarded(policy, original), True
                    report["open"].append(key)
                endpoint.__samfewshot_original__ = original
                routes[i] = APIRoute(route.path, endpoint, include_in_schema=schema, **settings)
            elif isinstance(route, (StarletteRoute, Mount)) and not _declared(route):
                logger.warning(f"closing {route.path}: not a route this app serves")
                del routes[i]
                report["closed"].append(route.path)
        if hasattr(router, "_mark_routes_changed"):  # FastAPI caches the routes of included routers
            router._mark_routes_changed()
    app.openapi_schema = None
    logger.info(f"routes: {len(report['open'])} open, {len(report['disabled'])} optional and off, {len(report['closed'])} closed")
    return report


def _policy(route: APIRoute) -> tuple[str, Route]:
    keys = [(method, route.path) for method in sorted(route.methods)]
    policies = {ROUTES.get(key, Route(closed="not a route this app serves")) for key in keys}
    assert len(policies) == 1, f"{route.path}: one route, several policies"
    return f"{','.join(sorted(route.methods))} {route.path}", policies.pop()


def _declared(route: BaseRoute) -> bool:
    if isinstance(route, Mount):
        return ("MOUNT", route.path) in ROUTES
    return all((method, route.path) in ROUTES for method in route.methods - {"HEAD"})


def _disabled(group: str) -> str:
    default = ",".join(DEFAULT_ENDPOINT_GROUPS)
    return f"disabled on this server ({ENDPOINT_GROUPS[group]}); name '{group}' in --conf endpoints to serve it (default: {default})"


def _closed(path: str, reason: str) -> Callable[[], Any]:
    def closed() -> Any:
        raise HTTPException(status_code=404, detail=f"{path} is not served: {reason}")

    return closed


def _guarded(policy: Route, endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` (or ``policy.handler`` with its arguments) after ``policy.check``: a plain function FastAPI runs
    in a worker thread, or a coroutine function for ``on_loop``. No ``functools.wraps``: FastAPI follows
    ``__wrapped__`` and would read the original's signature and coroutine-ness."""
    signature = inspect.signature(endpoint, eval_str=True)
    target = policy.handler or endpoint

    def bind(args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with http_errors():
            if policy.check:
                policy.check(bound.arguments)
        return bound.arguments

    if policy.on_loop:

        async def run_on_loop(*args: Any, **kwargs: Any) -> Any:
            arguments = bind(args, kwargs)
            with http_errors():
                return await target(**arguments)

        run = run_on_loop
    else:

        def run_in_thread(*args: Any, **kwargs: Any) -> Any:
            arguments = bind(args, kwargs)
            try:
                with http_errors(), endpoint_bodies.pacs_errors():
                    result = target(**arguments)
                    result = asyncio.run(result) if inspect.iscoroutine(result) else result
                    return without_server_paths(result, _server_roots()) if isinstance(result, (dict, list)) else result
            except BaseException:
                _clean_up(arguments)
                raise

        run = run_in_thread
    run.__signature__ = signature
    run.__name__, run.__doc__ = endpoint.__name__, endpoint.__doc__
    return run


def without_server_paths(value: Any, roots: tuple[str, ...]) -> Any:
    """``value`` (an endpoint's JSON answer) without the entries that hold a path under one of ``roots`` (the
    datastore, the app and its model folder, the temporary folder), and with such paths inside texts made relative:
    a client names volumes, labels and sessions by id. 3D Slicer reads an image's ``path`` only to load a file it can
    see itself, and downloads it otherwise."""
    if isinstance(value, dict):
        return {k: without_server_paths(v, roots) for k, v in value.items() if not _server_path(v, roots)}
    if isinstance(value, list):
        return [without_server_paths(v, roots) for v in value if not _server_path(v, roots)]
    if isinstance(value, str):  # a path inside a text (a task's log line) becomes relative to its root
        for root in sorted(roots, key=len, reverse=True):
            value = value.replace(root + os.sep, "")
    return value


def _server_path(value: Any, roots: tuple[str, ...]) -> bool:
    return isinstance(value, str) and os.path.isabs(value) and any(value == r or value.startswith(r + os.sep) for r in roots)


def _server_roots() -> tuple[str, ...]:
    app = _app()
    folders = [getattr(app, "studies", ""), getattr(app, "app_dir", ""), getattr(app, "model_dir", ""), tempfile.gettempdir()]
    found = {os.path.abspath(f) for f in folders if f and "://" not in f}
    return tuple(found | {os.path.realpath(f) for f in found})


def _clean_up(arguments: Mapping[str, Any]) -> None:
    """Run a failed request's background tasks (the removal of its temporary files) now."""
    background = arguments.get("background_tasks")
    for task in getattr(background, "tasks", []):
        try:
            task.func(*task.args, **task.kwargs)
        except OSError as e:
            logger.warning(f"clean-up after a failed request: {e}")


def routers_of(router: APIRouter) -> list[APIRouter]:
    """``router`` and every router included in it (FastAPI keeps included routers as ``original_router``)."""
    found = [router]
    for route in router.routes:
        included = getattr(route, "original_router", None)
        if isinstance(included, APIRouter):
            found += routers_of(included)
    return found
